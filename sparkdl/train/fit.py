"""Driver side of training: resolve tables and model, launch the ranks, publish the model."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparkdl.lakehouse import Lakehouse, normalize_uri, snapshot
from sparkdl.train.config import TrainConfig
from sparkdl.train.launcher import LaunchConfig, run_distributed
from sparkdl.train.loop import train_rank

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = ["TrainResult", "fit"]


@dataclass
class TrainResult:
    run_id: str
    run_dir: str
    model_name: str | None
    model_version: int | None
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    steps: int
    curves_png: str | None
    checkpoint: str | None
    elapsed: float
    lineage: dict[str, Any] = field(default_factory=dict)


def _uri(root: str, name: str) -> str:
    return normalize_uri(name) if ("/" in name or "://" in name) else Lakehouse(root).table(name)


def _setup(cfg: TrainConfig) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    train_uri = _uri(cfg.lakehouse, cfg.train_table)
    snap = snapshot(train_uri, cfg.train_version)
    schema = snap.dataset_schema
    labels = [c.name for c in schema.with_role("label")]
    label = cfg.label_column or (labels[0] if labels else None)
    if label is None or label not in schema.names:
        raise ValueError(f"label column {label!r} not in {train_uri}; columns: {schema.names}; pass label_column=")
    features = cfg.feature_columns or [c.name for c in schema.with_role("feature")]
    missing = [c for c in features if c not in schema.names]
    if missing:
        raise ValueError(f"feature_columns {missing} are not in {train_uri}; columns: {schema.names}")
    kwargs = dict(cfg.model_kwargs)
    spec_json = None
    if cfg.model == "flights_mlp":
        from sparkdl.preprocess import load_spec_for_table

        spec = load_spec_for_table(train_uri, snap.version)
        spec_json = json.loads(spec.to_json())
        kwargs.setdefault("numeric_features", spec.numeric_features)
        kwargs.setdefault("categorical_cardinalities", spec.cardinalities)
        features = spec.numeric_features + spec.categorical_features
    valid_uri = _uri(cfg.lakehouse, cfg.valid_table) if cfg.valid_table else None
    valid_version = snapshot(valid_uri, cfg.valid_version).version if valid_uri else None
    setup = {"train_uri": train_uri, "train_version": snap.version, "valid_uri": valid_uri,
             "valid_version": valid_version, "feature_columns": features, "label_column": label,
             "model_kwargs": kwargs}
    lineage = {"train_table": {"uri": train_uri, "version": snap.version}}
    if valid_uri:
        lineage["valid_table"] = {"uri": valid_uri, "version": valid_version}
    return setup, lineage, spec_json


def _follow(path: Path, stop: threading.Event) -> None:
    """Driver-side progress bar fed by rank 0's metrics log (terminal and notebook)."""
    from tqdm.auto import tqdm

    bar, pos = None, 0
    while not stop.is_set():
        time.sleep(0.5)
        if not path.exists():
            continue
        with open(path) as f:
            f.seek(pos)
            lines = f.readlines()
            pos = f.tell()
        for line in lines:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if bar is None:
                bar = tqdm(total=ev["total_steps"], desc="train", unit="step", initial=ev["step"] - 1)
            bar.n = ev["step"]
            bar.set_postfix(epoch=ev["epoch"], loss=f"{ev['loss']:.4f}", samples_s=f"{ev['samples_per_s']:.0f}")
    if bar is not None:
        bar.close()


def _curves(run_dir: Path, history: list[dict[str, Any]]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = run_dir / "metrics.jsonl"
    steps = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    if not steps:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].plot([s["step"] for s in steps], [s["loss"] for s in steps], lw=0.8)
    axes[0].set(title="training loss", xlabel="step")
    for key in ("val_loss", "val_accuracy", "val_auc"):
        pts = [(h["epoch"], h[key]) for h in history if key in h]
        if pts:
            axes[1].plot(*zip(*pts), marker="o", label=key)
    axes[1].set(title="validation", xlabel="epoch")
    if axes[1].lines:
        axes[1].legend()
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return str(out)


def fit(config: TrainConfig, *, spark: "SparkSession | None" = None, log_row_ids: str | None = None) -> TrainResult:
    """Train ``config.model`` on the ranks and publish it when ``config.model_name`` is set.

    A failed rank relaunches the stage (``max_attempts``) and training resumes from the last
    checkpoint of the run; ``resume=True`` continues an earlier ``run_id`` the same way."""
    start = time.perf_counter()
    run_dir = Path(Lakehouse(config.lakehouse).run(config.run_id))
    if run_dir.exists() and not config.resume:
        raise ValueError(f"run {config.run_id} already exists at {run_dir}; pass resume=True to continue it")
    run_dir.mkdir(parents=True, exist_ok=True)
    setup, lineage, spec = _setup(config)
    setup["run_dir"] = str(run_dir)
    setup["log_row_ids"] = log_row_ids
    (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2, default=str))
    stop = threading.Event()
    follower = threading.Thread(target=_follow, args=(run_dir / "metrics.jsonl", stop), daemon=True)
    follower.start()
    try:
        out = run_distributed(
            train_rank, config, setup, spark=None if config.local_mode else spark,
            config=LaunchConfig(num_ranks=config.num_ranks, local_mode=config.local_mode, use_gpu=config.use_gpu,
                                max_attempts=config.max_attempts),
        )
    finally:
        stop.set()
        follower.join(timeout=5)
    if "nonfinite" in out:
        from sparkdl.errors import NonFiniteLossError

        bad = out["nonfinite"]
        raise NonFiniteLossError(bad["step"], bad["loss"], bad["checkpoint"])
    curves = _curves(run_dir, out["history"])
    version = None
    if config.model_name:
        import torch

        from sparkdl.models import build_model
        from sparkdl.registry import publish_model

        model = build_model(config.model, **setup["model_kwargs"])
        model.load_state_dict(out["state_dict"])
        mv = publish_model(
            config.lakehouse, config.model_name, model=model,
            model_config={"factory": config.model, "kwargs": setup["model_kwargs"],
                          "input_columns": setup["feature_columns"], "label_column": setup["label_column"],
                          "torch": torch.__version__},
            training_config=asdict(config), lineage={**lineage, "run_id": config.run_id},
            metrics=out["metrics"], preprocessing=spec, extra_files={"curves.png": curves} if curves else None,
        )
        version = mv.version
    return TrainResult(run_id=config.run_id, run_dir=str(run_dir), model_name=config.model_name,
                       model_version=version, metrics=out["metrics"], history=out["history"], steps=out["steps"],
                       curves_png=curves, checkpoint=out["checkpoint"], elapsed=time.perf_counter() - start,
                       lineage=lineage)
