"""Driver side of training: check the config, table and model, launch the ranks, publish the model."""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable

from sparkdl import _fs
from sparkdl.errors import NoSpecRecordedError
from sparkdl.lakehouse import Lakehouse, normalize_uri, snapshot
from sparkdl.models import ship_to_executors
from sparkdl.session import on_storage
from sparkdl.train.checkpoint import latest_checkpoint, load_checkpoint
from sparkdl.train.config import TrainConfig
from sparkdl.train.elastic import allowed_sizes, check_resizable, resize_settings
from sparkdl.train.handoff import RankSetup
from sparkdl.train.launcher import LaunchConfig, check_capacity, run_distributed
from sparkdl.train.loop import train_rank
from sparkdl.train.metrics import read_step_metrics
from sparkdl.train.progress import DriverProgress

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = ["TrainResult", "fit"]


@dataclass
class TrainResult:
    """What ``fit`` trained and where it put it."""

    run_id: str
    run_dir: str
    """The run's folder (a local path or a URI): checkpoints, metrics.jsonl, curves.png."""
    model_name: str | None
    model_version: int | None
    """Published version; None when model_name was not set."""
    metrics: dict[str, Any]
    """The last epoch's row of ``history``."""
    history: list[dict[str, Any]]
    """One row per epoch: epoch, step, train_loss, val_* (a max_steps stop adds partial=True)."""
    steps: int
    curves_png: str | None
    checkpoint: str | None
    """The last checkpoint (load it with ``sparkdl.train.checkpoint.load_checkpoint``)."""
    elapsed: float
    lineage: dict[str, Any] = field(default_factory=dict)
    step_metrics: str | None = None
    """The run's per-step rows (metrics.jsonl: epoch, step, loss, lr, samples_per_s)."""


def _uri(root: str, name: str) -> str:
    from sparkdl.lakehouse import table_uri

    return table_uri(root, name)


def _spec_json(train_uri: str, version: int) -> dict[str, Any] | None:
    """The preprocessing spec the ETL linked to this table version, as JSON; None when none."""
    from sparkdl.preprocess import load_spec_for_table

    try:
        return json.loads(load_spec_for_table(train_uri, version).to_json())
    except NoSpecRecordedError:  # a table not written by the ETL; a spec that fails its checks stops the run
        return None


def _columns(cfg: TrainConfig, uri: str, schema: Any) -> tuple[str, list[str], str | None]:
    """(label, feature columns, weight column) of the training table, by the config or the roles."""
    labels = [c.name for c in schema.with_role("label")]
    label = cfg.label_column or (labels[0] if labels else None)
    if label is None or label not in schema.names:
        raise ValueError(f"label column {label!r} not in {uri}; columns: {schema.names}; pass label_column=")
    weights = [c.name for c in schema.with_role("weight")]
    weight = cfg.weight_column or (weights[0] if weights else None)
    if weight is not None and weight not in schema.names:
        raise ValueError(f"weight_column {weight!r} is not in {uri}; columns: {schema.names}")
    features = cfg.feature_columns or [c.name for c in schema.with_role("feature")]
    missing = [c for c in features if c not in schema.names]
    if missing:
        raise ValueError(f"feature_columns {missing} are not in {uri}; columns: {schema.names}")
    if not features:
        raise ValueError(f"{uri} has no role=feature columns; pass feature_columns=")
    clash = [c for c in features if c in (label, weight)]
    if clash:
        raise ValueError(f"feature_columns {clash} include the label/weight column; the model would see its "
                         "target: leave it out of feature_columns")
    return label, features, weight


def _setup(cfg: TrainConfig, train_version: int | None) -> tuple[RankSetup, dict[str, Any], Any, Any]:
    """Resolve tables, columns and the task, check the data, build the model here: a bad config,
    label or feature column fails before launch, naming the column and the fix."""
    from sparkdl.features import LabelInfo, TableFeatures, check_table, feature_of, infer_task, scan_columns
    from sparkdl.tasks import make_task

    train_uri = _uri(cfg.lakehouse, cfg.train_table)
    snap = snapshot(train_uri, train_version)
    spec = _spec_json(train_uri, snap.version)  # before any scan: a tampered spec stops the run here
    schema = snap.dataset_schema
    label, features, weight = _columns(cfg, train_uri, schema)
    feats = [feature_of(schema.column(c), table=train_uri) for c in features]
    scanned = [label] + ([weight] if weight else []) + [f.name for f in feats if f.kind != "image"]
    stats = scan_columns(snap, list(dict.fromkeys(scanned)))
    task_name, num_classes = infer_task(schema.column(label), stats[label], task=cfg.task,
                                        num_classes=cfg.num_classes)
    task = make_task(task_name, num_classes=num_classes, loss=cfg.loss)
    check_table(snap, label=label, task=task, features=feats, weight=weight, stats=stats)
    valid_uri = _uri(cfg.lakehouse, cfg.valid_table) if cfg.valid_table else None
    valid_version = None
    if valid_uri:
        vsnap = snapshot(valid_uri, cfg.valid_version)
        valid_version = vsnap.version
        absent = [c for c in [label, *features] + ([weight] if weight else []) if c not in vsnap.schema.names]
        if absent:
            raise ValueError(f"validation table {valid_uri} lacks columns {absent} of the training table")
        check_table(vsnap, label=label, task=task, features=feats, weight=weight)
    table = TableFeatures(features=tuple(feats), spec=spec,
                          label=LabelInfo(name=label, task=task.name, num_classes=task.num_classes,
                                          output_dim=task.output_dim))
    setup = RankSetup(train_uri=train_uri, train_version=snap.version, valid_uri=valid_uri,
                      valid_version=valid_version, feature_columns=features, label_column=label,
                      model_kwargs=dict(cfg.model_kwargs), task=task.name, num_classes=task.num_classes,
                      loss=cfg.loss, weight_column=weight, features=table,
                      # Recorded with the published model, so inference decodes its inputs as training
                      # did even when the training table is gone and the scored one declares nothing.
                      input_codecs={f.name: f.codec for f in feats if f.codec != "raw"},
                      input_shapes={f.name: list(f.shape) for f in feats if f.shape})
    batch = _sample_batch(setup)
    shapes = {f.name: tuple(batch[f.name].shape[1:]) for f in feats if hasattr(batch[f.name], "shape")}
    setup = replace(setup, features=table.with_shapes(shapes))
    model = _build_model(cfg, setup.features)
    needs = [c for c in getattr(model, "input_columns", None) or [] if c not in features]
    if needs:
        raise ValueError(f"model {cfg.model!r} reads columns {needs} that are not among the feature columns "
                         f"{features}; pass feature_columns=")
    _dry_run(cfg, setup, model, task, batch)
    lineage = {"train_table": {"uri": train_uri, "version": snap.version}}
    if valid_uri:
        lineage["valid_table"] = {"uri": valid_uri, "version": valid_version}
    setup = replace(setup, id_columns=[c.name for c in schema.with_role("id")])
    return setup, lineage, table.spec, model


def _build_model(cfg: TrainConfig, features: Any):
    from sparkdl.models import build_model

    try:
        return build_model(cfg.model, features=features, **cfg.model_kwargs)
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"model={cfg.model!r} cannot be built with model_kwargs {cfg.model_kwargs}: "
                         f"{type(e).__name__}: {e}") from e


def _sample_batch(setup: RankSetup) -> dict[str, Any]:
    from sparkdl.data import LoaderConfig, TableLoader

    with TableLoader(setup.train_uri, version=setup.train_version,
                     config=LoaderConfig(batch_size=2, columns=setup.loader_columns, shuffle=False, drop_last=False,
                                         prefetch_batches=1)) as loader:
        return next(iter(loader))


def _dry_run(cfg: TrainConfig, setup: RankSetup, model: Any, task: Any, batch: dict[str, Any]) -> None:
    """One forward pass and loss on two training rows: wrong columns, shapes, kwargs or a custom
    loss fail here, not on N ranks."""
    import torch

    try:
        with torch.inference_mode():
            out = model.eval()(batch)
    except Exception as e:
        raise ValueError(f"model {cfg.model!r} fails on a batch of {setup.train_uri} (columns "
                         f"{setup.loader_columns}): {type(e).__name__}: {e}") from e
    n = len(batch[setup.label_column])
    if not isinstance(out, torch.Tensor) or out.shape[0] != n or out.numel() != n * task.output_dim:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        want = "[n] or [n, 1]" if task.output_dim == 1 else f"[n, {task.output_dim}]"
        raise ValueError(f"model {cfg.model!r} returns {got} for a batch of {n} rows, but task={task.name!r} needs "
                         f"{want} (features.output_dim = {task.output_dim})")
    try:
        with torch.inference_mode():
            loss = task.loss(out, batch[setup.label_column], batch.get(setup.weight_column))
    except Exception as e:
        raise ValueError(f"the loss of task={task.name!r} (loss={cfg.loss!r}) fails on the model's outputs "
                         f"{list(out.shape)}: {type(e).__name__}: {e}") from e
    if loss.dim() != 0:
        raise ValueError(f"loss={cfg.loss!r} returns shape {list(loss.shape)}; return one loss per row ([n]) or a "
                         "scalar")
    if cfg.parallelism != "data":
        from sparkdl.train.parallel import check_model_parallelism

        check_model_parallelism(cfg, model.train(), {c: batch[c] for c in setup.feature_columns})


def _resume_state(cfg: TrainConfig, run_dir: str) -> dict[str, Any]:
    """The latest checkpoint of the run to continue, checked against the config before launch."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise ValueError(f"resume=True but run {cfg.run_id} has no checkpoint under {run_dir} (it stopped before "
                         "its first one); start again under a new run_id, or delete the run folder")
    state = load_checkpoint(ckpt)
    loader = state["loaders"][0]
    saved_ranks = len(state["loaders"])
    base_ranks = int((state.get("elastic") or {}).get("base_ranks", saved_ranks))
    if saved_ranks != cfg.num_ranks and cfg.resize_policy is None:
        raise ValueError(f"run {cfg.run_id} was checkpointed with num_ranks={saved_ranks} but the config has "
                         f"num_ranks={cfg.num_ranks}; resume with num_ranks={saved_ranks}, or set resize_policy="
                         f"'scale_lr' or 'keep_global_batch' to continue on {cfg.num_ranks} ranks (docs/elastic.md)")
    if saved_ranks != cfg.num_ranks:  # another world size: refused here, before launch, when it cannot work
        strategy = ((state.get("strategy") or {}).get("describe") or {}).get("name", "allreduce")
        try:
            check_resizable(cfg, strategy, saved_ranks=saved_ranks, world=cfg.num_ranks)
            resize_settings(cfg, base_ranks=base_ranks, world=cfg.num_ranks)
        except ValueError as e:
            raise ValueError(f"run {cfg.run_id} cannot continue on num_ranks={cfg.num_ranks}: {e}") from e
    for name, saved, now in (("batch_size", loader["batch_size"], cfg.batch_size),
                             ("shuffle", loader["shuffle"], cfg.shuffle), ("seed", loader["seed"], cfg.seed),
                             ("shuffle_buffer_rows", loader["shuffle_buffer_rows"], cfg.shuffle_buffer_rows),
                             ("train_version", loader["version"], cfg.train_version or loader["version"])):
        if saved != now:
            raise ValueError(f"run {cfg.run_id} was checkpointed with {name}={saved!r} but the config has "
                             f"{name}={now!r}; resume with {name}={saved!r}")
    return {"history": state["history"], "train_version": loader["version"], "step": state["step"],
            "base_ranks": base_ranks}


def _curves(run_dir: str, steps: list[dict[str, Any]], history: list[dict[str, Any]]) -> str | None:
    # No pyplot: it would switch the process's backend and break inline plots in notebooks.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not steps:
        return None
    fig = Figure(figsize=(10, 3.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    axes[0].plot([s["step"] for s in steps], [s["loss"] for s in steps], lw=0.8)
    axes[0].set(title="training loss", xlabel="step")
    keys = ["train_loss"] + sorted({k for h in history for k in h if k.startswith("val_")})
    for key in keys:
        pts = [(h["epoch"], h[key]) for h in history if key in h]
        if pts:
            axes[1].plot(*zip(*pts), marker="o", label=key)
    axes[1].set(title="per epoch", xlabel="epoch")
    if axes[1].lines:
        axes[1].legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    out = _fs.join(run_dir, "curves.png")
    _fs.write_bytes(out, buf.getvalue())
    return out


def _nonfinite_error(bad: dict[str, Any]) -> Exception:
    from sparkdl.errors import NonFiniteGradientError, NonFiniteLossError

    if bad["what"] == "loss":
        return NonFiniteLossError(bad["step"], bad["value"], bad["checkpoint"])
    return NonFiniteGradientError(bad["step"], bad["what"], bad["value"], bad["checkpoint"])


def _prepare(config: TrainConfig, log_row_ids: str | None
             ) -> tuple[str, bool, dict[str, Any] | None, RankSetup, dict[str, Any], Any]:
    """The driver's checks before launch, where the lakehouse is reachable: the run folder, the
    checkpoint to resume, tables, columns, task and one forward pass of the model."""
    run_dir = Lakehouse(config.lakehouse).run(config.run_id)
    exists = _fs.exists(run_dir)
    if exists and not config.resume:
        raise ValueError(f"run {config.run_id} already exists at {run_dir}; pass resume=True to continue it")
    if config.resume and not exists:
        raise ValueError(f"resume=True but there is no run {config.run_id} at {run_dir}; drop resume to start it")
    if log_row_ids and _fs.local_path(run_dir) is None:
        raise ValueError("log_row_ids needs a local lakehouse (it appends to files in the run folder)")
    earlier = _resume_state(config, run_dir) if config.resume else None
    setup, lineage, spec, _model = _setup(config, earlier["train_version"] if earlier else config.train_version)
    setup = replace(setup, run_dir=run_dir, run_dir_local=_fs.local_path(run_dir), log_row_ids=log_row_ids)
    return run_dir, exists, earlier, setup, lineage, spec


def _finish(config: TrainConfig, setup: RankSetup, lineage: dict[str, Any], spec: Any, out: dict[str, Any],
            run_dir: str) -> tuple[dict[str, Any], str | None, str, int | None]:
    """After the ranks, where the lakehouse is reachable: the step log, the curves and the
    published model; (lineage, curves path, step log path, model version)."""
    steps = read_step_metrics(run_dir)
    step_log = _fs.join(run_dir, "metrics.jsonl")
    _fs.write_text(step_log, "".join(json.dumps(r) + "\n" for r in steps))
    if "nonfinite" in out:  # raised by the caller: the error class travels back from a cluster task as is
        return lineage, None, step_log, None
    curves = _curves(run_dir, steps, out["history"])
    if out.get("strategy"):  # the strategy and its parameters, as it ran
        lineage = {**lineage, "strategy": out["strategy"]}
    if out.get("resizes"):  # every change of world size, with its policy and resulting lr/accumulation
        lineage = {**lineage, "resizes": out["resizes"]}
        _fs.write_text(_fs.join(run_dir, "resizes.json"), json.dumps(out["resizes"], indent=2))
    version = None
    if config.model_name:
        import torch

        from sparkdl.registry import publish_model

        model = None
        if out.get("weights_uri") is None:
            model = _build_model(config, setup.features)
            model.load_state_dict(out["state_dict"])
        mv = publish_model(
            config.lakehouse, config.model_name,
            # Sharded runs staged their full weights in the run folder from the ranks themselves.
            **({"weights_uri": out["weights_uri"]} if out.get("weights_uri") else {"model": model}),
            model_config={"factory": config.model, "kwargs": setup.model_kwargs,
                          # the spec is published once, as preprocessing.json; load_model puts it back
                          "features": {**setup.features.to_dict(), "spec": None},
                          "input_columns": setup.feature_columns, "label_column": setup.label_column,
                          "task": setup.task, "num_classes": setup.num_classes, "loss": setup.loss,
                          "weight_column": setup.weight_column, "id_columns": setup.id_columns,
                          "input_codecs": setup.input_codecs, "input_shapes": setup.input_shapes,
                          "torch": torch.__version__},
            training_config=asdict(config), lineage={**lineage, "run_id": config.run_id},
            metrics=out["metrics"], preprocessing=spec, extra_files={"curves.png": curves} if curves else None,
        )
        version = mv.version
    return lineage, curves, step_log, version


def fit(config: TrainConfig, *, spark: "SparkSession | None" = None, log_row_ids: str | None = None,
        on_epoch: Callable[[dict], None] | None = None, progress: bool = True) -> TrainResult:
    """Train ``config.model`` on the ranks and publish it when ``config.model_name`` is set.

    The table, columns and model are checked (one forward pass) on the driver before any rank
    starts. A failed rank relaunches the stage (``max_attempts``) and training resumes from the
    last checkpoint of the run; ``resume=True`` continues an earlier ``run_id`` the same way.
    ``on_epoch(row)`` is called on the driver with each epoch's history row as it arrives (on a
    background thread; an exception in it is logged, not raised); ``progress`` shows a tqdm bar.
    ``log_row_ids`` (tests): a column whose values each rank logs per step to the run folder.

    From a Spark Connect client, the checks before launch and the publishing after it run in a
    task on the cluster (``sparkdl.session.on_storage``), so the client needs no access to the
    lakehouse; progress then travels through the run folder (read from the client when it can reach
    the storage), and the epochs' rows arrive with the result at the latest."""
    start = time.perf_counter()
    if not config.local_mode and spark is None:
        raise ValueError("fit needs spark= for barrier mode, or TrainConfig(local_mode=True)")
    cluster = None if config.local_mode else spark
    if cluster is not None:
        ship_to_executors(cluster, [config.model, config.loss or ""], what="model/loss")
    run_dir, exists, earlier, setup, lineage, spec = on_storage(cluster, _prepare, config, log_row_ids)
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"} if config.deterministic and config.use_gpu else {}
    sizes = allowed_sizes(config, base_ranks=earlier["base_ranks"] if earlier else config.num_ranks)
    if config.num_ranks not in sizes:
        sizes = sorted(set(sizes) | {config.num_ranks})  # the start size was checked above (resume) or is the base
    launch = LaunchConfig(num_ranks=config.num_ranks, local_mode=config.local_mode, use_gpu=config.use_gpu,
                          max_attempts=config.max_attempts, start_timeout_s=config.start_timeout_s, env=env,
                          pg_timeout_s=config.collective_timeout_s, world_sizes=tuple(sizes),
                          progress_dir=_fs.join(run_dir, "progress"))
    if cluster is not None:
        check_capacity(cluster, replace(launch, num_ranks=min(sizes)))
    if not exists:  # only now: a config that fails the checks above leaves no run folder behind
        on_storage(cluster, _fs.write_text, _fs.join(run_dir, "config.json"),
                   json.dumps(asdict(config), indent=2, default=str))
    display = DriverProgress(on_epoch=on_epoch, earlier=earlier["history"] if earlier else [], show=progress)
    out: dict[str, Any] | None = None
    try:
        out = run_distributed(train_rank, config, setup, spark=cluster, on_progress=display, config=launch)
    finally:
        display.finish(out.get("history") if out and "nonfinite" not in out else None)
    lineage, curves, step_log, version = on_storage(cluster, _finish, config, setup, lineage, spec, out, run_dir)
    if "nonfinite" in out:
        raise _nonfinite_error(out["nonfinite"])
    return TrainResult(run_id=config.run_id, run_dir=run_dir, model_name=config.model_name,
                       model_version=version, metrics=out["metrics"], history=out["history"], steps=out["steps"],
                       curves_png=curves, checkpoint=out["checkpoint"], elapsed=time.perf_counter() - start,
                       lineage=lineage, step_metrics=step_log)
