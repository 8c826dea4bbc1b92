"""Batch inference: score a Delta table with a published model version through Spark.

Scoring runs in pyspark's ``predict_batch_udf``: each Python worker loads the model once
(the UDF caches ``make_predict_fn`` per worker), receives Arrow batches of ``batch_size``
rows and runs the model on the executor's GPU when the task was given one. Inputs that
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
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from sparkdl.errors import MissingColumnsError
from sparkdl.lakehouse import Lakehouse, normalize_uri, read_table, snapshot, write_table

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from sparkdl.schema import DatasetSchema

__all__ = ["PredictConfig", "PredictResult", "predict_dataframe", "predict_table"]


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
    """Input columns copied next to the predictions; None = id and label columns when present."""

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


def _make_predict_fn_factory(
    lakehouse: str, model_name: str, model_version: int, input_columns: list[str], codecs: dict[str, str],
    trusted_modules: list[str] | None = None,
) -> Callable[[], Callable[..., dict[str, np.ndarray]]]:
    """The factory ``predict_batch_udf`` calls once per Python worker."""

    def make_predict_fn() -> Callable[..., dict[str, np.ndarray]]:
        import torch

        from sparkdl.registry import load_model

        device = _worker_device()
        model, _ = load_model(lakehouse, model_name, model_version, map_location=str(device),
                              trusted_modules=trusted_modules)
        model.to(device).eval()
        task = getattr(model, "task", "binary")

        def predict(*arrays: np.ndarray) -> dict[str, np.ndarray]:
            batch = {}
            for name, arr in zip(input_columns, arrays):
                batch[name] = _to_tensor(name, arr, codecs.get(name, "raw")).to(device, non_blocking=True)
            with torch.inference_mode():
                logits = model(batch).float()
            if task == "binary":
                score = torch.sigmoid(logits.reshape(-1))
                pred = (score >= 0.5).to(torch.int32)
            else:
                prob = torch.softmax(logits, dim=-1)
                score, pred = prob.max(dim=-1)
                pred = pred.to(torch.int32)
            return {"prediction": pred.cpu().numpy(), "score": score.cpu().numpy().astype(np.float32)}

        # predict_batch_udf counts the function's parameters to decide how many column
        # arrays to pass: give it one named parameter per input column.
        import inspect

        predict.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter(f"c{i}", inspect.Parameter.POSITIONAL_ONLY) for i in range(len(input_columns))]
        )
        return predict

    return make_predict_fn


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


def _to_tensor(name: str, arr: np.ndarray, codec: str):
    import torch

    if codec in ("png", "jpeg"):
        import io

        from PIL import Image

        return torch.from_numpy(np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in arr]))
    if arr.dtype == object:  # array columns without a shape arrive as an object array of 1-D arrays
        arr = np.stack(arr)
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        # Nulls reach pandas as NaN (integer columns turn float): they would become garbage
        # embedding ids or NaN scores, so they are refused rather than scored.
        raise ValueError(
            f"input column {name!r} has {int(np.isnan(arr).sum())} null/NaN values in a batch; "
            "fill them (or filter those rows) before scoring"
        )
    return torch.from_numpy(np.ascontiguousarray(arr))


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
    """Score ``df`` with a published model: returns ``keep_columns`` + ``prediction`` (int) +
    ``score`` (probability of class 1 for binary models, of the predicted class otherwise)
    + ``model_name`` + ``model_version``. Lazy, like any Spark transformation.

    The model's input columns are those recorded when it was published; image codecs and
    tensor shapes come from ``input_schema`` (the dataset schema of ``df``; ``predict_table``
    passes the scored table's), else from the model version and its training table.
    ``trusted_modules``: modules whose ``module:attr`` factory the model config may name (added to
    ``SPARKDL_TRUSTED_MODULES`` and ``spark.sparkdl.trustedModules``; see ``sparkdl.registry``)."""
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql import functions as F
    from pyspark.sql.types import ArrayType, FloatType, IntegerType, StructField, StructType

    from sparkdl.registry import check_model_factory, get_model_version
    from sparkdl.registry import trusted_modules as _trusted

    # Resolved here (argument, env, Spark conf) and shipped: executors trust exactly what the driver does.
    trusted = _trusted(trusted_modules, spark=df.sparkSession)
    mv = get_model_version(lakehouse, model_name, model_version)
    check_model_factory(mv, trusted)  # fail here, not in every Python worker
    input_columns = list(mv.model_config.get("input_columns") or [])
    extra_codecs: dict[str, str] = {}
    if not input_columns:
        # Published without a record of its inputs: ask the model class (loads it once here).
        from sparkdl.registry import load_model

        model, _ = load_model(lakehouse, model_name, mv.version, trusted_modules=trusted)
        input_columns = list(getattr(model, "input_columns", []))
        extra_codecs = dict(getattr(model, "input_codecs", {}) or {})
        del model
        if not input_columns:
            raise ValueError(
                f"model {model_name} v{mv.version} records no input_columns in its model_config.json and "
                "its class declares none; give the class an `input_columns` attribute listing the batch keys "
                "forward() reads, or publish it with model_config['input_columns']"
            )
        mv.model_config["input_columns"] = input_columns
    specs = _input_specs(mv, input_schema)
    codecs = {**extra_codecs, **{c: s["codec"] for c, s in specs.items() if s["codec"] != "raw"}}
    prepared = _prepare_inputs(df, input_columns, mv.preprocessing)
    if keep_columns is None:
        keep_columns = [c for c in ("flight_id", "id", "label") if c in prepared.columns]
    missing_keep = [c for c in keep_columns if c not in prepared.columns]
    if missing_keep:
        raise MissingColumnsError("keep_columns", missing_keep, list(prepared.columns))
    # Array columns reach the model as tensors of their recorded shape (predict_batch_udf
    # reshapes the flat arrays); an array column with no recorded shape is taken as 1-D.
    shapes: list[list[int] | None] = []
    for c in input_columns:
        shape = specs.get(c, {}).get("shape")
        if isinstance(prepared.schema[c].dataType, ArrayType) and not shape:
            first = prepared.where(F.col(c).isNotNull()).select(F.size(c).alias("n")).first()
            shape = [int(first["n"])] if first is not None else [1]
        shapes.append(shape if isinstance(prepared.schema[c].dataType, ArrayType) else None)
    udf = predict_batch_udf(
        _make_predict_fn_factory(lakehouse, model_name, mv.version, input_columns, codecs, trusted),
        return_type=StructType([StructField("prediction", IntegerType()), StructField("score", FloatType())]),
        batch_size=batch_size,
        input_tensor_shapes=shapes if any(shapes) else None,
    )
    scored = prepared.select(*keep_columns, udf(*[F.col(c) for c in input_columns]).alias("_p"))
    return scored.select(
        *keep_columns,
        F.col("_p.prediction").alias("prediction"),
        F.col("_p.score").alias("score"),
        F.lit(model_name).alias("model_name"),
        F.lit(mv.version).cast("int").alias("model_version"),
    )


def predict_table(config: PredictConfig, *, spark: "SparkSession") -> PredictResult:
    """Score a version of a Delta table and write the predictions as a new version of
    ``config.output_table``; the commit records model name/version and input table version."""
    from pyspark.sql import functions as F

    start = time.perf_counter()
    input_uri = _table_uri(config.lakehouse, config.input_table)
    output_uri = _table_uri(config.lakehouse, config.output_table)
    from sparkdl.registry import get_model_version

    # Resolve "latest" once, so the rows and the commit name the same model version.
    mv = get_model_version(config.lakehouse, config.model_name, config.model_version).version
    snap = snapshot(input_uri, config.input_version)
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
