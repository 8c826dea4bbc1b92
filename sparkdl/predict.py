"""Batch inference: score a Delta table with a published model version through Spark.

Scoring runs in ``mapInArrow``: each Python worker loads a model version once (Spark reuses
workers), cuts the Arrow batches into ``batch_size`` rows, decodes them with the loader's own
code (``sparkdl.data.decode``) and runs the model on the executor's GPU when the task was given
one. The model's Task (``sparkdl.tasks``) turns its outputs into the prediction columns, so the
predictions' schema is the same from the pipeline, the predict job or a notebook. Inputs that
are still raw (not yet encoded) are encoded on the way in with the preprocessing spec saved
with the model, so training and inference share one encoding.

The driver does not load the model: the input columns are those recorded at publish
(``model_config.json``; only a model published without them is loaded to ask its class),
and image codecs and tensor shapes come from the dataset schemas (the scored table's, else
the training table's), so array columns reach the model as tensors of their declared shape.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sparkdl.errors import MissingColumnsError
from sparkdl.lakehouse import Lakehouse, normalize_uri, read_table, snapshot, write_table
from sparkdl.session import on_storage

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from sparkdl.schema import DatasetSchema
    from sparkdl.tasks import Task

__all__ = ["PredictConfig", "PredictResult", "evaluate_dataframe", "predict_dataframe", "predict_table",
           "predictions_schema", "task_of"]


@dataclass(kw_only=True)
class PredictConfig:
    """What to score, with which model, and where the predictions go."""

    lakehouse: str = "lakehouse"
    """Lakehouse root holding ``models/`` and the tables."""
    model_name: str
    """Published model name (``models/<name>/``)."""
    model_version: int | None = None
    """Model version to use; None = the latest published version."""
    input_table: str
    """Table name under the lakehouse or a Delta table URI to score."""
    input_version: int | None = None
    """Version of the input table; None = latest (the resolved version is recorded)."""
    output_table: str
    """Table name or URI of the predictions table."""
    batch_size: int = 1024
    """Rows per model call inside each Python worker."""
    mode: str = "append"
    """Write mode of the predictions table: append (keep earlier scorings) or overwrite."""
    keep_columns: list[str] | None = None
    """Input columns copied next to the predictions; None = the id columns (role=id) when present."""

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}; try 1024")
        if self.mode not in ("append", "overwrite"):
            raise ValueError(f"mode must be 'append' or 'overwrite', got {self.mode!r}")
        if self.model_version is not None and self.model_version < 1:
            raise ValueError(f"model_version starts at 1, got {self.model_version}")


@dataclass(frozen=True)
class PredictResult:
    """Where the predictions landed and what produced them."""

    output_uri: str
    output_version: int
    rows: int
    model_name: str
    model_version: int
    input_uri: str
    input_version: int
    seconds: float


def _table_uri(lakehouse: str, name_or_uri: str) -> str:
    from sparkdl.lakehouse import table_uri

    return table_uri(lakehouse, name_or_uri)


def _prepare_inputs(df: "DataFrame", input_columns: list[str], preprocessing: dict | None) -> "DataFrame":
    """Return ``df`` with the model's input columns, encoding raw columns with the saved spec
    when the encoded ones are absent; raise naming the missing columns otherwise."""
    missing = [c for c in input_columns if c not in df.columns]
    if not missing:
        return df
    if preprocessing:
        from sparkdl.preprocess import PreprocessingSpec

        spec = PreprocessingSpec.from_json(preprocessing if isinstance(preprocessing, str) else _dumps(preprocessing))
        raw_missing = [c for c in spec.raw_columns if c not in df.columns]
        if not raw_missing:
            return spec.encode(df)
        raise MissingColumnsError(
            "the model (directly, or through its preprocessing spec's raw columns "
            f"{spec.raw_columns})",
            missing if len(missing) <= len(raw_missing) else raw_missing,
            list(df.columns),
        )
    raise MissingColumnsError("the model", missing, list(df.columns))


def _dumps(obj: Any) -> str:
    import json

    return json.dumps(obj)


_MODELS: dict[tuple[str, str, int], Any] = {}
"""Models loaded in this Python worker: Spark reuses workers, so each loads a model version once."""


def _cached_model(lakehouse: str, model_name: str, version: int, trusted_modules: list[str] | None = None):
    key = (lakehouse, model_name, version)
    if key not in _MODELS:
        from sparkdl.registry import load_model

        device = _worker_device()
        model, _ = load_model(lakehouse, model_name, version, map_location=str(device),
                              trusted_modules=trusted_modules)
        _MODELS[key] = (model.to(device).eval(), device)
    return _MODELS[key]


def _input_schema_meta(field: Any, codec: str, shape: list[int] | None) -> Any:
    """``field`` carrying the codec and shape the loader's decoders read (sparkdl.schema metadata)."""
    import json

    meta = {"sparkdl.codec": codec}
    if shape:
        meta["sparkdl.shape"] = json.dumps(list(shape))
    return field.with_metadata(meta)


def score_batches(batches: Any, *, lakehouse: str, model_name: str, version: int, task: "Task",
                  input_columns: list[str], keep_columns: list[str], specs: dict[str, dict[str, Any]],
                  batch_size: int, trusted_modules: list[str] | None = None) -> Any:
    """Arrow record batches in, ``keep_columns`` + the task's prediction columns out.

    The inputs are decoded by ``sparkdl.data.decode``, the loader's own code (declared shapes,
    channels first or last, palette and grey images), so a row is scored with the tensors it
    was trained on."""
    import pyarrow as pa
    import torch

    from sparkdl.data.decode import build_decoders, cut_batch, decode_block

    model, device = _cached_model(lakehouse, model_name, version, trusted_modules)
    for record_batch in batches:
        for lo in range(0, record_batch.num_rows, batch_size):
            part = record_batch.slice(lo, batch_size)
            n = part.num_rows
            if n == 0:
                continue
            schema = pa.schema([_input_schema_meta(part.schema.field(c), specs[c]["codec"], specs[c]["shape"])
                                for c in input_columns])
            table = pa.Table.from_arrays([part.column(c) for c in input_columns], schema=schema)
            decoders = build_decoders(table.schema, input_columns, None, {})

            def where(row: int, lo: int = lo) -> str:
                return f"row {lo + row} of a scored batch"

            batch = cut_batch(decode_block(table, decoders, where), decoders, 0, n, where, None, 1)
            for name, value in batch.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point() and torch.isnan(value).any():
                    # Nulls reach a float tensor as NaN: they would score as NaN, so they are refused.
                    raise ValueError(f"input column {name!r} has {int(torch.isnan(value).sum())} null/NaN values in "
                                     "a batch; fill them (or filter those rows) before scoring")
                if isinstance(value, torch.Tensor):
                    batch[name] = value.to(device, non_blocking=True)
            with torch.inference_mode():
                out = task.predictions(model(batch))
            arrays = [part.column(c) for c in keep_columns] + [out[name] for name, _ in task.output_columns]
            names = keep_columns + [name for name, _ in task.output_columns]
            yield pa.RecordBatch.from_arrays(arrays, names=names)


def _worker_device():
    """The task's GPU when Spark gave it one (its address mapped through CUDA_VISIBLE_DEVICES),
    else the first visible GPU, else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    from pyspark import TaskContext

    from sparkdl._gpu import cuda_ordinal

    ctx = TaskContext.get()
    gpus = ctx.resources().get("gpu") if ctx is not None else None
    if gpus is not None and gpus.addresses:
        return torch.device(f"cuda:{cuda_ordinal(gpus.addresses[0])}")
    return torch.device("cuda:0")


def _input_specs(mv: Any, input_schema: "DatasetSchema | None") -> dict[str, dict[str, Any]]:
    """Codec and tensor shape of each model input, from the first source that declares them:
    the scored table's schema, what the model version recorded, the schema of its training table."""
    train_schema = None
    train = (mv.lineage or {}).get("train_table") or {}
    if train.get("uri"):
        try:
            train_schema = snapshot(train["uri"], train.get("version")).dataset_schema
        except Exception:  # the training table may be gone or unreachable: the other sources remain
            pass
    recorded_codecs = mv.model_config.get("input_codecs") or {}
    recorded_shapes = mv.model_config.get("input_shapes") or {}
    specs: dict[str, dict[str, Any]] = {}
    for name in mv.model_config.get("input_columns") or []:
        found = [_declared(input_schema, name), (recorded_codecs.get(name), recorded_shapes.get(name)),
                 _declared(train_schema, name)]
        codec = next((c for c, _ in found if c), "raw")
        shape = next((list(s) for _, s in found if s), None)
        specs[name] = {"codec": codec, "shape": shape}
    return specs


def _declared(schema: "DatasetSchema | None", name: str) -> tuple[str | None, Any]:
    """(codec, shape) that ``schema`` declares for column ``name``; raw counts as undeclared."""
    if schema is None or name not in schema.names:
        return None, None
    col = schema.column(name)
    return (col.codec if col.codec != "raw" else None), col.shape


def task_of(model_config: dict[str, Any]) -> "Task":
    """The Task a published model was trained for (its predictions' columns)."""
    from sparkdl.tasks import make_task

    return make_task(model_config.get("task") or "binary", num_classes=model_config.get("num_classes"))


def predictions_schema(model_config: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, Spark SQL type) of the columns a model's predictions add, before model_name/model_version."""
    from pyspark.sql.pandas.types import from_arrow_type

    return [(name, from_arrow_type(t).simpleString()) for name, t in task_of(model_config).output_columns]


def predict_dataframe(
    df: "DataFrame",
    *,
    lakehouse: str,
    model_name: str,
    model_version: int | None = None,
    batch_size: int = 1024,
    keep_columns: list[str] | None = None,
    input_schema: "DatasetSchema | None" = None,
    trusted_modules: list[str] | None = None,
) -> "DataFrame":
    """Score ``df`` with a published model: returns ``keep_columns``, the prediction columns of
    the model's task (``sparkdl.tasks``: binary ``prediction`` int + ``score`` = P(1); multiclass
    ``prediction`` + ``score`` = P(prediction) + ``probabilities`` array; multilabel
    ``prediction`` and ``probabilities`` arrays; regression ``prediction`` float), then
    ``model_name`` and ``model_version``. Lazy, like any Spark transformation.

    ``keep_columns`` None keeps the id columns: role=id in ``input_schema``, else the training
    table's id columns recorded with the model, when ``df`` has them. The model's input columns
    are those recorded when it was published; image codecs and tensor shapes come from
    ``input_schema`` (the dataset schema of ``df``; ``predict_table`` passes the scored
    table's), else from the model version and its training table.
    ``trusted_modules``: modules whose ``module:attr`` factory the model config may name (added to
    ``SPARKDL_TRUSTED_MODULES`` and ``spark.sparkdl.trustedModules``; see ``sparkdl.registry``)."""
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_type
    from pyspark.sql.types import StructField, StructType

    from sparkdl.models import ship_to_executors
    from sparkdl.registry import check_model_factory, get_model_version
    from sparkdl.registry import trusted_modules as _trusted

    # Resolved here (argument, env, Spark conf) and shipped: executors trust exactly what the driver does.
    spark = df.sparkSession
    trusted = _trusted(trusted_modules, spark=spark)
    mv = on_storage(spark, get_model_version, lakehouse, model_name, model_version)
    check_model_factory(mv, trusted)  # fail here, not in every Python worker
    input_columns = list(mv.model_config.get("input_columns") or [])
    if not input_columns:
        # Published without a record of its inputs: ask the model class (loads it once here).
        from sparkdl.registry import load_model

        model, _ = load_model(lakehouse, model_name, mv.version, trusted_modules=trusted)
        input_columns = list(getattr(model, "input_columns", []))
        del model
        if not input_columns:
            raise ValueError(
                f"model {model_name} v{mv.version} records no input_columns in its model_config.json and "
                "its class declares none; give the class an `input_columns` attribute listing the batch keys "
                "forward() reads, or publish it with model_config['input_columns']"
            )
        mv.model_config["input_columns"] = input_columns
    task = task_of(mv.model_config)
    specs = on_storage(spark, _input_specs, mv, input_schema)
    prepared = _prepare_inputs(df, input_columns, mv.preprocessing)
    if keep_columns is None:
        ids = [c.name for c in input_schema.with_role("id")] if input_schema is not None else []
        ids = ids or list(mv.model_config.get("id_columns") or [])
        keep_columns = [c for c in ids if c in prepared.columns]
    missing_keep = [c for c in keep_columns if c not in prepared.columns]
    if missing_keep:
        raise MissingColumnsError("keep_columns", missing_keep, list(prepared.columns))
    outputs = [name for name, _ in task.output_columns]
    clash = [c for c in keep_columns if c in outputs + ["model_name", "model_version", "input_version"]]
    if clash:
        raise ValueError(f"keep_columns {clash} would collide with the prediction columns {outputs}; rename them "
                         "or leave them out of keep_columns")
    factory = str(mv.model_config.get("factory", ""))
    ship_to_executors(prepared.sparkSession, [factory], what="model")
    out_schema = StructType([prepared.schema[c] for c in keep_columns]
                            + [StructField(name, from_arrow_type(t), True) for name, t in task.output_columns])
    version = mv.version
    cols = list(dict.fromkeys(keep_columns + input_columns))

    def score(batches: Any) -> Any:
        return score_batches(batches, lakehouse=lakehouse, model_name=model_name, version=version, task=task,
                             input_columns=input_columns, keep_columns=keep_columns, specs=specs,
                             batch_size=batch_size, trusted_modules=trusted)

    scored = prepared.select(*cols).mapInArrow(score, out_schema)
    return scored.select(
        *keep_columns, *outputs,
        F.lit(model_name).alias("model_name"),
        F.lit(mv.version).cast("int").alias("model_version"),
    )


def evaluate_dataframe(
    df: "DataFrame",
    *,
    lakehouse: str,
    model_name: str,
    model_version: int | None = None,
    label_column: str | None = None,
    batch_size: int = 1024,
    input_schema: "DatasetSchema | None" = None,
) -> dict[str, float]:
    """Score ``df`` (which holds the labels) and compute the model's task metrics in Spark,
    independently of training: exact aggregations, the same metric names as training without
    ``val_`` (binary auc/accuracy/log_loss, multiclass accuracy/top-k/macro_f1/log_loss,
    multilabel accuracy/subset_accuracy/macro_f1, regression rmse/mae/r2) plus ``rows``."""
    from sparkdl.registry import get_model_version

    mv = on_storage(df.sparkSession, get_model_version, lakehouse, model_name, model_version)
    label = label_column or mv.model_config.get("label_column")
    if not label or label not in df.columns:
        raise MissingColumnsError("evaluation (the label column; pass label_column=)", [str(label)], list(df.columns))
    scored = predict_dataframe(df, lakehouse=lakehouse, model_name=model_name, model_version=mv.version,
                               batch_size=batch_size, keep_columns=[label], input_schema=input_schema).cache()
    try:
        return task_of(mv.model_config).spark_metrics(scored, label)
    finally:
        scored.unpersist()


def predict_table(config: PredictConfig, *, spark: "SparkSession") -> PredictResult:
    """Score a version of a Delta table and write the predictions as a new version of
    ``config.output_table``; the commit records model name/version and input table version."""
    from pyspark.sql import functions as F

    start = time.perf_counter()
    input_uri = _table_uri(config.lakehouse, config.input_table)
    output_uri = _table_uri(config.lakehouse, config.output_table)
    from sparkdl.registry import get_model_version

    # Resolve "latest" once, so the rows and the commit name the same model version.
    mv = on_storage(spark, get_model_version, config.lakehouse, config.model_name, config.model_version).version
    snap = on_storage(spark, snapshot, input_uri, config.input_version)
    df = read_table(spark, input_uri, snap.version)
    scored = predict_dataframe(
        df, lakehouse=config.lakehouse, model_name=config.model_name, model_version=mv,
        batch_size=config.batch_size, keep_columns=config.keep_columns, input_schema=snap.dataset_schema,
    ).withColumn("input_version", F.lit(snap.version).cast("long"))
    result = write_table(
        scored, output_uri, mode=config.mode,
        commit_metadata={
            "sparkdl.model": f"{config.model_name}/v{mv}",
            "sparkdl.input": f"{input_uri}@{snap.version}",
        },
    )
    return PredictResult(
        output_uri=output_uri, output_version=result.version,
        # Without file stats (non-local tables) count the written version: reading Parquet
        # footers, not scoring every row a second time.
        rows=int(result.num_rows) if result.num_rows is not None else read_table(spark, output_uri, result.version).count(),
        model_name=config.model_name, model_version=mv, input_uri=input_uri,
        input_version=snap.version, seconds=time.perf_counter() - start,
    )
