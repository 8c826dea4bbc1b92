"""The scheduled batch job for any dataset: ETL -> train -> evaluate -> predict, with a summary.

One dataset YAML (``PipelineConfig.config``; default the bundled flights config) drives every
stage: its description feeds the ETL, its ``train:`` section the training (TrainConfig
fields; the pipeline's flags override it), its table names the evaluate and predict stages.
Evaluation metrics follow the label's kind in the validation table (binary: AUC, accuracy;
multiclass: accuracy; regression: RMSE, MAE; multilabel: per-label accuracy).

Re-runs are safe: the ETL stage is skipped when the raw inputs, the ETL settings and the ETL
code and schemas are unchanged (their fingerprint names a marker file,
``<lakehouse>/pipeline/etl-<fingerprint>.json``, holding the table versions that run wrote)
and the tables are still at those versions; training publishes a new model version, and
predictions are a new version of the predictions table. Nothing earlier is rewritten, so a
failed stage leaves every earlier table and model version readable.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from sparkdl import _fs
from sparkdl.errors import failure_reason
from sparkdl.lakehouse import Lakehouse, read_table, table_exists, table_version
from sparkdl.session import on_storage
from sparkdl.tracking import Tracker, TrackingConfig, epoch_metrics, log_train_result, make_tracker

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from sparkdl.etl import ETLConfig
    from sparkdl.train import TrainConfig

__all__ = [
    "PipelineConfig",
    "PipelineResult",
    "PipelineStageError",
    "run_pipeline",
    "format_summary",
    "check_stages",
    "train_config",
    "failure_reason",
    "STAGES",
]

STAGES = ("etl", "train", "evaluate", "predict")


class PipelineStageError(RuntimeError):
    """A stage failed; ``stage`` names it and the message gives the one-line reason."""

    def __init__(self, stage: str, reason: str) -> None:
        self.stage = stage
        self.reason = reason
        super().__init__(f"pipeline stage '{stage}' failed: {reason}")


@dataclass(kw_only=True)
class PipelineConfig:
    """Settings of the pipeline: a dataset config plus overrides (defaults: the bundled flights demo)."""

    lakehouse: str = "lakehouse"
    """Lakehouse root (local folder, or a Hadoop URI such as s3a://bucket/path)."""
    config: str | None = None
    """Dataset YAML file (docs/preprocessing.md); None = the bundled flights config."""
    model_name: str | None = None
    """Name under which the model is published; default the config's train.model_name, else the dataset name."""
    epochs: int | None = None
    """Training epochs; None = the config's train section (else TrainConfig's default)."""
    batch_size: int | None = None
    """Per-rank batch size; None = the config's train section."""
    lr: float | None = None
    """Learning rate; None = the config's train section."""
    num_ranks: int | None = None
    """Training ranks; None = the config's train section."""
    local_mode: bool = False
    """Run ranks as processes on the driver machine instead of Spark executors."""
    use_gpu: bool = False
    """Train with NCCL on the executors' GPUs."""
    train: dict[str, Any] = field(default_factory=dict)
    """Further TrainConfig fields (model, optimizer, ...), over the config's train section."""
    min_count: int | None = None
    """ETL: min count of every vocabulary transform; None = as in the config."""
    valid_fraction: float | None = None
    """ETL: fraction hashed into the validation split (train gets the rest); None = as in the config."""
    sample_fraction: float = 1.0
    """ETL: keep this fraction of the rows (hashed on the id, deterministic); 1.0 = all."""
    force_etl: bool = False
    """Run the ETL even when its inputs and settings are unchanged."""
    score_table: str | None = None
    """Table scored by the predict stage; default the clean table (raw rows) if the config writes one, else valid."""
    predictions_table: str | None = None
    """Predictions table written by the predict stage; default <dataset>_predictions."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow tracking (off by default)."""
    seed: int = 0
    """Seed of training and of the loader's shuffles."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "num_ranks"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.valid_fraction is not None and not 0.0 < self.valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in (0, 1), got {self.valid_fraction}; try 0.2")
        if not 0.0 < self.sample_fraction <= 1.0:
            raise ValueError(f"sample_fraction must be in (0, 1], got {self.sample_fraction}; use 1.0 for all rows")
        if self.min_count is not None and self.min_count < 1:
            raise ValueError(f"min_count must be at least 1, got {self.min_count}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.config is not None and not Path(self.config).is_file():
            raise ValueError(f"config {self.config} does not exist; pass --config with a dataset YAML file")


@dataclass
class PipelineResult:
    """What the run produced, stage by stage."""

    lakehouse: str
    seconds: dict[str, float] = field(default_factory=dict)
    etl: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)
    predict: dict[str, Any] = field(default_factory=dict)
    tracking_run: str | None = None
    total_seconds: float = 0.0


def _config_path(config: PipelineConfig) -> str:
    if config.config is not None:
        return config.config
    from sparkdl.examples import config_path

    return str(config_path("flights"))


def _etl_config(config: PipelineConfig) -> "ETLConfig":
    """The dataset config with the pipeline's ETL overrides applied."""
    from dataclasses import replace

    from sparkdl.etl import ETLConfig

    etl = ETLConfig.from_yaml(_config_path(config))
    changes: dict[str, Any] = {"mode": "overwrite", "sample_fraction": config.sample_fraction}
    if config.min_count is not None:
        changes["features"] = [replace(t, min_count=config.min_count) if t.type in ("vocabulary", "tokens") else t
                               for t in etl.features]
    if config.valid_fraction is not None:
        ratios = etl.split.ratios
        if ratios is None:
            raise ValueError("valid_fraction applies to a hash split (split.ratios); the config splits by time")
        rest = 1.0 - config.valid_fraction - sum(v for k, v in ratios.items() if k not in ("train", "valid"))
        if rest <= 0:
            raise ValueError(f"valid_fraction {config.valid_fraction} leaves no rows for train; lower it")
        ratios = {k: (config.valid_fraction if k == "valid" else rest if k == "train" else v) for k, v in ratios.items()}
        if "valid" not in ratios:
            ratios = {"valid": config.valid_fraction, **ratios}
        changes["split"] = replace(etl.split, ratios=ratios)
    return replace(etl, **changes)


def _names(config: PipelineConfig) -> tuple["ETLConfig", dict[str, str]]:
    etl = _etl_config(config)
    return etl, etl.table_names()


def _etl_fingerprint(config: PipelineConfig) -> str:
    """Hash of what the ETL output depends on: every ETL setting (the config with overrides), the
    local source files (name, size, mtime), and the ETL code and declared schemas."""
    import sparkdl.etl.analyzers
    import sparkdl.etl.config
    import sparkdl.etl.engine
    import sparkdl.etl.sources
    import sparkdl.etl.transforms
    import sparkdl.preprocess as preprocess
    from sparkdl.schema import DatasetSchema

    etl = _etl_config(config)
    h = hashlib.sha256()
    settings = {k: v for k, v in asdict(etl).items() if k not in ("mode", "train")}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    root = Lakehouse(config.lakehouse).root
    for src in etl.sources.values():
        if src.path is None:
            continue
        path = etl.resolve(src.path, root)
        if _fs.is_local(path) and Path(path).exists():
            files = [Path(path)] if Path(path).is_file() else sorted(p for p in Path(path).rglob("*") if p.is_file())
            for f in files:
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    for module in (sparkdl.etl.analyzers, sparkdl.etl.config, sparkdl.etl.engine, sparkdl.etl.sources,
                   sparkdl.etl.transforms, preprocess):
        h.update(inspect.getsource(module).encode())
    for name in etl.output.schemas.values():
        h.update(json.dumps(DatasetSchema.load(name).to_dict(), sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _etl_marker(config: PipelineConfig) -> str:
    return _fs.join(Lakehouse(config.lakehouse).root, "pipeline", f"etl-{_etl_fingerprint(config)}.json")


def _etl_is_current(lh: Lakehouse, done: dict[str, Any]) -> bool:
    """The tables are still the versions the marked ETL run wrote (nothing rewrote them since)."""
    versions = done.get("table_versions") or {}
    if not versions:
        return False
    return all(table_exists(lh.table(t)) and table_version(lh.table(t)) == int(v) for t, v in versions.items())


def _stage_etl(spark: "SparkSession", config: PipelineConfig) -> dict[str, Any]:
    from sparkdl.etl import load_etl_config, run_etl_config

    lh = Lakehouse(config.lakehouse)
    load_etl_config(_config_path(config), lh.root)  # a bundled config: its raw files, before the fingerprint
    marker = _etl_marker(config)
    if not config.force_etl:
        done = on_storage(spark, _current_etl, lh, marker)
        if done is not None:
            return {**done, "skipped": True}
    result = run_etl_config(_etl_config(config), spark=spark, lakehouse=lh.root)
    summary = _jsonable(result)
    summary.update(rows_train=result.rows_train, rows_valid=result.rows_valid)
    # atomic: a crash leaves the old marker or none
    on_storage(spark, _fs.write_text, marker, json.dumps(summary, indent=2))
    return {**summary, "skipped": False}


def _current_etl(lh: Lakehouse, marker: str) -> dict[str, Any] | None:
    """The marked ETL run's summary when its tables are still the versions it wrote, else None."""
    if not _fs.exists(marker):
        return None
    done = json.loads(_fs.read_text(marker))
    return done if _etl_is_current(lh, done) else None


def _model_name(config: PipelineConfig, etl: "ETLConfig") -> str:
    return config.model_name or etl.train.get("model_name") or etl.dataset


def train_config(config: PipelineConfig) -> "TrainConfig":
    """The TrainConfig of the train stage: the config's train section, then the pipeline's overrides."""
    from sparkdl.train import TrainConfig

    etl, names = _names(config)
    options: dict[str, Any] = {**etl.train, **config.train}
    for key in ("epochs", "batch_size", "lr", "num_ranks"):
        if getattr(config, key) is not None:
            options[key] = getattr(config, key)
    options.update(lakehouse=Lakehouse(config.lakehouse).root, train_table=names["train"],
                   valid_table=names.get("valid"), local_mode=config.local_mode, use_gpu=config.use_gpu,
                   model_name=_model_name(config, etl), seed=config.seed)
    try:
        return TrainConfig(**options)
    except TypeError as e:
        raise ValueError(f"train options of {_config_path(config)}: {e}; use TrainConfig field names") from e


def _stage_train(spark: "SparkSession", config: PipelineConfig, tracker: "Tracker") -> dict[str, Any]:
    from sparkdl.train import fit

    cfg = train_config(config)

    def on_epoch(row: dict[str, Any]) -> None:  # per-epoch metrics reach the tracker while training runs
        metrics, step = epoch_metrics(row)
        tracker.log_metrics(metrics, step=step)

    result = fit(cfg, spark=None if config.local_mode else spark, on_epoch=on_epoch)
    log_train_result(tracker, lakehouse=cfg.lakehouse, train_config=cfg, result=result, history_logged=True)
    out = _jsonable(result)
    out["config"] = _jsonable(cfg)
    return out


def _label_and_id(schema: Any) -> tuple[Any, str | None]:
    label = next((c for c in schema.columns if c.role == "label"), None)
    if label is None:
        raise ValueError(f"table {schema.name} has no column with role label; write it with the ETL")
    ident = next((c.name for c in schema.columns if c.role == "id"), None)
    return label, ident


def _stage_evaluate(spark: "SparkSession", config: PipelineConfig, model_version: int) -> dict[str, Any]:
    """Score the validation table with Spark and compute the task's metrics there, independently of training."""
    from pyspark.sql import functions as F

    from sparkdl.lakehouse import snapshot
    from sparkdl.predict import predict_dataframe

    etl, names = _names(config)
    lh = Lakehouse(config.lakehouse)
    uri = lh.table(names["valid"])
    label, ident = _label_and_id(on_storage(spark, snapshot, uri).dataset_schema)
    task = label.kind or ("binary" if label.type.startswith("int") else "regression")
    scored = predict_dataframe(
        read_table(spark, uri), lakehouse=lh.root, model_name=_model_name(config, etl), model_version=model_version,
        keep_columns=[c for c in (ident, label.name) if c],
    ).withColumnRenamed(label.name, "_label").cache()
    try:
        return _metrics(task, scored)
    finally:
        scored.unpersist()


def _metrics(task: str, scored: Any) -> dict[str, Any]:
    from pyspark.sql import functions as F

    y = F.col("_label")
    if task == "binary":
        from pyspark.ml.evaluation import BinaryClassificationEvaluator

        row = scored.agg(F.count("*").alias("rows"),
                         F.avg((F.col("prediction") == y).cast("double")).alias("accuracy"),
                         F.avg(y.cast("double")).alias("positive_rate")).first()
        auc = BinaryClassificationEvaluator(rawPredictionCol="score", labelCol="label").evaluate(
            scored.select(y.cast("double").alias("label"), F.col("score").cast("double")))
        return {"task": task, "rows": int(row["rows"]), "auc": float(auc), "accuracy": float(row["accuracy"]),
                "majority_baseline_accuracy": float(max(row["positive_rate"], 1 - row["positive_rate"]))}
    if task == "multiclass":
        row = scored.agg(F.count("*").alias("rows"),
                         F.avg((F.col("prediction") == y).cast("double")).alias("accuracy")).first()
        top = scored.groupBy(y).count().orderBy(F.col("count").desc()).first()
        return {"task": task, "rows": int(row["rows"]), "accuracy": float(row["accuracy"]),
                "majority_baseline_accuracy": float(top["count"]) / max(int(row["rows"]), 1)}
    if task == "regression":
        err = F.col("prediction").cast("double") - y.cast("double")
        row = scored.agg(F.count("*").alias("rows"), F.sqrt(F.avg(err * err)).alias("rmse"),
                         F.avg(F.abs(err)).alias("mae"), F.stddev_pop(y.cast("double")).alias("std")).first()
        return {"task": task, "rows": int(row["rows"]), "rmse": float(row["rmse"]), "mae": float(row["mae"]),
                "mean_baseline_rmse": float(row["std"] or 0.0)}
    match = F.expr("aggregate(zip_with(prediction, _label, (p, l) -> cast(cast(p as int) = cast(l as int) as double)),"
                   " 0D, (a, x) -> a + x) / size(_label)")
    row = scored.agg(F.count("*").alias("rows"), F.avg(match).alias("label_accuracy")).first()
    return {"task": task, "rows": int(row["rows"]), "label_accuracy": float(row["label_accuracy"])}


def _stage_predict(spark: "SparkSession", config: PipelineConfig, model_version: int) -> dict[str, Any]:
    from sparkdl.lakehouse import snapshot
    from sparkdl.predict import PredictConfig, predict_table

    etl, names = _names(config)
    lh = Lakehouse(config.lakehouse)
    _, ident = _label_and_id(on_storage(spark, snapshot, lh.table(names["train"])).dataset_schema)
    res = predict_table(
        PredictConfig(
            lakehouse=config.lakehouse, model_name=_model_name(config, etl), model_version=model_version,
            input_table=config.score_table or names.get("clean", names["valid"]),
            output_table=config.predictions_table or f"{etl.dataset}_predictions", mode="append",
            keep_columns=[ident] if ident else None,
        ),
        spark=spark,
    )
    return _jsonable(res)


def check_stages(stages: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The stages as a tuple, or ``ValueError`` naming the unknown ones (before any work)."""
    stages = tuple(stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; choose from {list(STAGES)}")
    if not stages:
        raise ValueError(f"no stages to run; choose from {list(STAGES)}")
    return stages


def run_pipeline(
    config: PipelineConfig,
    *,
    spark: "SparkSession",
    stages: tuple[str, ...] = STAGES,
    log: Callable[[str], None] = print,
) -> PipelineResult:
    """Run the stages in order; raise ``PipelineStageError`` naming the failed stage."""
    stages = check_stages(stages)
    started = time.perf_counter()
    lh = Lakehouse(config.lakehouse)
    result = PipelineResult(lakehouse=lh.root)
    tracker = make_tracker(config.tracking, lakehouse=lh.root,
                           run_name=f"pipeline-{_model_name(config, _etl_config(config))}")
    result.tracking_run = getattr(tracker, "run_id", None)
    status = "FAILED"
    try:
        tracker.log_params({"pipeline": {k: v for k, v in _jsonable(config).items() if k != "tracking"}})
        for stage in stages:
            log(f"[sparkdl] stage {stage} ...")
            t0 = time.perf_counter()
            try:
                if stage == "etl":
                    result.etl = _stage_etl(spark, config)
                    tracker.log_params({"etl": {"skipped": result.etl["skipped"],
                                                "table_versions": result.etl.get("table_versions")}})
                elif stage == "train":
                    result.train = _stage_train(spark, config, tracker)
                elif stage == "evaluate":
                    result.evaluate = _stage_evaluate(spark, config, _model_version(result, config))
                    tracker.log_metrics({f"eval_{k}": v for k, v in _numbers(result.evaluate).items()})
                elif stage == "predict":
                    result.predict = _stage_predict(spark, config, _model_version(result, config))
                    tracker.set_tags({"predictions": f"{result.predict['output_uri']}@v{result.predict['output_version']}"})
            except PipelineStageError:
                raise
            except Exception as e:
                raise PipelineStageError(stage, failure_reason(e)) from e
            result.seconds[stage] = round(time.perf_counter() - t0, 2)
        status = "FINISHED"
    finally:
        result.total_seconds = round(time.perf_counter() - started, 2)
        tracker.end(status)
    return result


def _model_version(result: PipelineResult, config: PipelineConfig) -> int:
    if result.train.get("model_version"):
        return int(result.train["model_version"])
    from sparkdl.registry import get_model_version

    return get_model_version(config.lakehouse, _model_name(config, _etl_config(config))).version


def _numbers(d: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return _jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def format_summary(result: PipelineResult) -> str:
    """The human summary printed at the end of a run."""
    lines = ["", "=" * 72, "sparkdl pipeline summary", "=" * 72, f"lakehouse      {result.lakehouse}"]
    etl = result.etl
    if etl:
        lines.append(
            f"etl            {'skipped (inputs unchanged)' if etl.get('skipped') else 'ran'}: rows in "
            f"{etl.get('rows_in')}, out {etl.get('rows_out')}, rejected {etl.get('rows_rejected')}"
        )
        versions = dict(etl.get("table_versions") or {})
        versions.update({k: v for k, v in etl.items() if k.endswith("version") and isinstance(v, int)})
        if versions:
            lines.append("               table versions " + ", ".join(f"{t} v{v}" for t, v in versions.items()))
    tr = result.train
    if tr:
        lines.append(f"train          model {tr.get('model_name')} v{tr.get('model_version')}  run {tr.get('run_id')}")
        metrics = tr.get("metrics") or {}
        lines.append("               " + ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))
    ev = result.evaluate
    if ev:
        if "auc" in ev:
            lines.append(
                f"evaluate       AUC {_fmt(ev['auc'])}, accuracy {_fmt(ev['accuracy'])} "
                f"(majority baseline {_fmt(ev['majority_baseline_accuracy'])}) on {ev['rows']} validation rows"
            )
        else:
            shown = ", ".join(f"{k} {_fmt(v)}" for k, v in ev.items() if k not in ("task", "rows"))
            lines.append(f"evaluate       {ev.get('task', '')}: {shown} on {ev.get('rows')} validation rows")
    pr = result.predict
    if pr:
        lines.append(
            f"predict        {pr.get('rows')} rows -> {pr.get('output_uri')} v{pr.get('output_version')} "
            f"(input v{pr.get('input_version')})"
        )
    lines.append("time per stage " + ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())
                 + (f"; total {result.total_seconds:.1f}s" if result.total_seconds else ""))
    if result.tracking_run:
        lines.append(f"mlflow run     {result.tracking_run}")
    if tr.get("curves_png"):
        lines.append(f"curves         {tr['curves_png']}")
    lines.append("=" * 72)
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)
