"""Each fitted transform and the label, encoded twice: as a Spark column and on pandas values.

Both sides implement the same rule (docs/preprocessing.md) and tests hold them equal on the
same rows; image transforms run one Python function on both sides (a pandas UDF in Spark).
A transform is the dict stored in the spec: ``{"type", "input", "output", ...fitted values}``.
"""

from __future__ import annotations

import io
import re
from typing import TYPE_CHECKING, Any

import numpy as np

from sparkdl.etl.keys import (
    is_numeric_type,
    numeric_type_error,
    pandas_float,
    pandas_hash,
    pandas_lookup,
    pandas_values,
    spark_float,
    spark_hash,
    spark_lookup,
    spark_typed,
)

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import Column

__all__ = ["spark_feature", "pandas_feature", "spark_label", "pandas_label", "column_spec", "label_column_spec",
           "TOKEN_PATTERN", "tokenize", "encode_image"]

TOKEN_PATTERN = r"[\s!-/:-@\[-`{-~]+"
"""Token separators: runs of ASCII whitespace and ASCII punctuation (same in Java and Python)."""
_TOKEN_RE = re.compile(TOKEN_PATTERN, re.ASCII)
_SPARK_OPS = {">": "__gt__", ">=": "__ge__", "<": "__lt__", "<=": "__le__", "==": "__eq__", "!=": "__ne__"}
_NP_OPS = {">": np.greater, ">=": np.greater_equal, "<": np.less, "<=": np.less_equal, "==": np.equal,
           "!=": np.not_equal}


# ---------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------
def is_null(v: Any) -> bool:
    if v is None:
        return True
    try:
        return bool(v != v)  # NaN and pandas NA
    except (TypeError, ValueError):
        return False


def as_key(v: Any) -> str:
    """A value as the string Spark's cast gives (integral floats as "7": pandas holds integer
    columns with nulls as floats)."""
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    if isinstance(v, bytes):
        return v.decode()
    return str(v)


def tokenize(text: Any) -> list[str]:
    """Lowercase, split on TOKEN_PATTERN, drop empty tokens; null -> no tokens."""
    if is_null(text):
        return []
    return [t for t in _TOKEN_RE.split(str(text).lower()) if t]


def _lookup_map(values: list[str], first: int):
    from pyspark.sql import functions as F

    return F.create_map(*[x for i, v in enumerate(values) for x in (F.lit(v), F.lit(i + first))])


# ---------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------
def spark_feature(t: dict[str, Any], col: "Column") -> "Column":
    """The encoded column of transform ``t`` applied to ``col`` (Spark)."""
    from pyspark.sql import functions as F

    kind = t["type"]
    it = t.get("input_type")
    if kind in ("standardize", "minmax", "numeric", "bucketize") and not is_numeric_type(it):
        raise numeric_type_error(kind, t["input"], it)
    if kind in ("standardize", "minmax", "numeric"):
        x = spark_float(col, it)
        if kind == "standardize":
            std = t["std"] if t["std"] > 0 else 1.0
            x = (x - F.lit(float(t["mean"]))) / F.lit(float(std))
            fill = 0.0
        elif kind == "minmax":
            span = t["max"] - t["min"]
            x = (x - F.lit(float(t["min"]))) / F.lit(float(span if span > 0 else 1.0))
            fill = 0.0
        else:
            fill = float(t["fill"])
        return F.coalesce(F.when(~F.isnan(x), x), F.lit(fill)).cast("float")
    if kind == "bucketize":
        x = spark_float(col, it)
        bounds = F.array(*[F.lit(float(b)) for b in t["boundaries"]]) if t["boundaries"] else F.array().cast("array<double>")
        return F.when(x.isNull(), F.lit(0)).otherwise(F.size(F.filter(bounds, lambda b: b <= x)) + 1).cast("int")
    if kind == "vocabulary":
        if not t["vocab"]:
            return F.lit(0).cast("int")
        # try_element_at: a missing key gives null (OOV) rather than an error under ANSI mode.
        return F.coalesce(spark_lookup(t["vocab"], col, it, 1), F.lit(0)).cast("int")
    if kind == "hash":
        return F.coalesce(spark_hash(col, it, int(t["num_buckets"])), F.lit(0)).cast("int")
    if kind == "tokens":
        length = int(t["length"])
        words = F.filter(F.split(F.lower(col.cast("string")), TOKEN_PATTERN), lambda w: w != F.lit(""))
        vocab = _lookup_map(t["vocab"], 2) if t["vocab"] else None
        ids = F.transform(F.slice(words, 1, length),
                          lambda w: F.coalesce(F.try_element_at(vocab, w), F.lit(1)) if vocab is not None else F.lit(1))
        ids = F.coalesce(ids, F.array().cast("array<int>"))
        return F.concat(ids.cast("array<int>"), F.array_repeat(F.lit(0), F.lit(length) - F.size(ids))).cast("array<int>")
    if kind == "image":
        if not t.get("resize") and not t.get("normalize"):
            return col  # stored as given: its codec and shape are declared in the table
        import pandas as pd
        from pyspark.sql.functions import pandas_udf

        spec = dict(t)

        def _encode(s):
            return pd.Series([encode_image(spec, v) for v in s])

        # Real (not string) annotations: pandas_udf infers a Series -> Series UDF from them.
        _encode.__annotations__ = {"s": pd.Series, "return": pd.Series}
        return pandas_udf(_encode, "array<float>" if t.get("normalize") else "binary")(col)
    raise ValueError(f"unknown transform type {kind!r}")


def pandas_feature(t: dict[str, Any], series: "pd.Series") -> Any:
    """The encoded values of transform ``t`` on ``series`` (numpy array or list), as ``spark_feature``."""
    kind = t["type"]
    it = t.get("input_type")
    if kind in ("standardize", "minmax", "numeric", "bucketize") and not is_numeric_type(it):
        raise numeric_type_error(kind, t["input"], it)
    if kind in ("standardize", "minmax", "numeric"):
        x = pandas_float(series, it)
        if kind == "standardize":
            x = (x - float(t["mean"])) / float(t["std"] if t["std"] > 0 else 1.0)
            fill = 0.0
        elif kind == "minmax":
            span = t["max"] - t["min"]
            x = (x - float(t["min"])) / float(span if span > 0 else 1.0)
            fill = 0.0
        else:
            fill = float(t["fill"])
        with np.errstate(over="ignore"):  # beyond float32: infinity, as Spark's cast gives
            return np.where(np.isnan(x), fill, x).astype(np.float32)
    if kind == "bucketize":
        x = pandas_float(series, it)
        ids = np.searchsorted(np.asarray(t["boundaries"], dtype=np.float64), x, side="right") + 1
        return np.where(np.isnan(x), 0, ids).astype(np.int32)
    if kind == "vocabulary":
        if it is None:  # a spec from before input types: keys as it always did
            ids = {v: i + 1 for i, v in enumerate(t["vocab"])}
            return np.asarray([0 if is_null(v) else ids.get(as_key(v), 0) for v in series], dtype=np.int32)
        return np.asarray([i or 0 for i in pandas_lookup(t["vocab"], series, it, 1)], dtype=np.int32)
    if kind == "hash":
        return np.asarray([i or 0 for i in pandas_hash(series, it, int(t["num_buckets"]))], dtype=np.int32)
    if kind == "tokens":
        ids = {v: i + 2 for i, v in enumerate(t["vocab"])}
        length = int(t["length"])
        out = []
        for v in series:
            row = [ids.get(w, 1) for w in tokenize(v)[:length]]
            out.append(np.asarray(row + [0] * (length - len(row)), dtype=np.int32))
        return out
    if kind == "image":
        if not t.get("resize") and not t.get("normalize"):
            return list(series)
        return [encode_image(t, v) for v in series]
    raise ValueError(f"unknown transform type {kind!r}")


def image_pixels(t: dict[str, Any], data: bytes | None) -> np.ndarray | None:
    """Decoded (and resized) uint8 pixels [H, W, C] of one image, as declared by ``t``."""
    from PIL import Image

    if data is None:
        return None
    shape = t["shape"]
    channels = shape[2] if len(shape) == 3 else 1
    img = Image.open(io.BytesIO(bytes(data)))
    img = img.convert({1: "L", 3: "RGB", 4: "RGBA"}[channels])
    if t.get("resize"):
        h, w = t["resize"]
        img = img.resize((int(w), int(h)), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8).reshape(img.size[1], img.size[0], channels)


def encode_image(t: dict[str, Any], data: bytes | None) -> Any:
    """One image: PNG bytes after resizing, or normalized float32 values (flattened)."""
    from PIL import Image

    px = image_pixels(t, data)
    if px is None:
        return None
    if t.get("normalize"):
        mean = np.asarray(t["mean"], dtype=np.float64)
        std = np.asarray(t["std"], dtype=np.float64)
        z = (px / 255.0 - mean) / np.where(std > 0, std, 1.0)
        return z.astype(np.float32).reshape(-1)
    buf = io.BytesIO()
    Image.fromarray(px[:, :, 0] if px.shape[2] == 1 else px).save(buf, format="PNG")
    return buf.getvalue()


def image_output_shape(t: dict[str, Any]) -> list[int]:
    shape = list(t["shape"])
    if t.get("resize"):
        shape[:2] = list(t["resize"])
    return shape


# ---------------------------------------------------------------------------------------
# Label
# ---------------------------------------------------------------------------------------
def spark_label(label: dict[str, Any], col: "Column") -> "Column":
    """The label column (null where the source gives no valid label)."""
    from pyspark.sql import functions as F

    task = label["task"]
    it = label.get("source_type")
    if task in ("binary", "regression", "multiclass") and it is not None:
        col = spark_typed(col, it)
    if task == "binary":
        if label.get("threshold") is not None:
            x = spark_float(col, None)
            return getattr(x, _SPARK_OPS[label.get("op", ">")])(F.lit(float(label["threshold"]))).cast("int")
        if label.get("positive") is not None:
            hit = spark_lookup(list(label["positive"]), col, it, 0)
            return F.when(col.isNotNull(), hit.isNotNull()).cast("int")
        x = spark_float(col, None)
        return F.when(x.isin(0.0, 1.0), x).cast("int")
    if task == "regression":
        return spark_float(col, None).cast("float")
    if task == "multiclass":
        if label.get("classes") is not None:
            return spark_lookup(list(label["classes"]), col, it, 0).cast("int")
        x = spark_float(col, None)
        n = int(label["num_classes"])
        return F.when((x >= 0) & (x < n) & (F.floor(x) == x), x).cast("int")
    if task == "multilabel":
        classes = [as_key(c) for c in label["classes"]]
        items = F.split(col.cast("string"), re.escape(label["separator"])) if label.get("separator") else col.cast("array<string>")
        items = F.filter(F.transform(items, lambda v: F.trim(v)), lambda v: v != F.lit(""))
        return F.when(col.isNotNull(), F.array(*[
            F.array_contains(items, F.lit(c)).cast("float") for c in classes])).cast("array<float>")
    raise ValueError(f"unknown task {task!r}")


def pandas_label(label: dict[str, Any], series: "pd.Series") -> Any:
    """The label values as ``spark_label`` gives them: a numpy array, or a pandas nullable
    array / list with None where the label is null."""
    import pandas as pd

    task = label["task"]
    it = label.get("source_type")
    if task == "binary":
        if label.get("threshold") is not None:
            x = pandas_float(series, it)
            out = _NP_OPS[label.get("op", ">")](x, float(label["threshold"])).astype(np.int32)
            return _nullable(out, np.isnan(x), "Int32")
        if label.get("positive") is not None:
            nulls = np.asarray([v is None for v in pandas_values(series, it)], dtype=bool)
            hits = pandas_lookup(list(label["positive"]), series, it, 0)
            out = np.asarray([int(h is not None) for h in hits], dtype=np.int32)
            return _nullable(out, nulls, "Int32")
        x = pandas_float(series, it)
        bad = ~np.isin(x, (0.0, 1.0))
        return _nullable(np.where(bad, 0, x).astype(np.int32), bad, "Int32")
    if task == "regression":
        x = pandas_float(series, it)
        return _nullable(np.where(np.isnan(x), 0, x).astype(np.float32), np.isnan(x), "Float32")
    if task == "multiclass":
        if label.get("classes") is not None:
            got = pandas_lookup(list(label["classes"]), series, it, 0)
            nulls = np.asarray([g is None for g in got], dtype=bool)
            return _nullable(np.asarray([g or 0 for g in got], dtype=np.int32), nulls, "Int32")
        x = pandas_float(series, it)
        n = int(label["num_classes"])
        bad = np.isnan(x) | (x < 0) | (x >= n) | (np.floor(x) != x)
        return _nullable(np.where(bad, 0, x).astype(np.int32), bad, "Int32")
    if task == "multilabel":
        classes = [as_key(c) for c in label["classes"]]
        out = []
        for v in series:
            if is_null(v) if not isinstance(v, (list, np.ndarray)) else False:
                out.append(None)
                continue
            items = str(v).split(label["separator"]) if label.get("separator") else [as_key(x) for x in v]
            present = {i.strip() for i in items if i is not None and i.strip()}
            out.append(np.asarray([float(c in present) for c in classes], dtype=np.float32))
        return out
    raise ValueError(f"unknown task {task!r}")


def _nullable(values: np.ndarray, nulls: np.ndarray, dtype: str) -> Any:
    import pandas as pd

    if not nulls.any():
        return values
    arr = pd.array(values, dtype=dtype)
    arr[nulls] = pd.NA
    return arr


# ---------------------------------------------------------------------------------------
# Column declarations (the table-to-model contract of sparkdl.schema)
# ---------------------------------------------------------------------------------------
def column_spec(t: dict[str, Any]):
    """The ``ColumnSpec`` of transform ``t``'s output: role, kind, cardinality, shape, codec."""
    from sparkdl.schema import ColumnSpec

    kind = t["type"]
    common = {"name": t["output"], "role": "feature", "nullable": False,
              "description": t.get("description") or f"{kind} of {t['input']}"}
    if kind in ("standardize", "minmax", "numeric"):
        return ColumnSpec(type="float32", kind="numeric", **common)
    if kind == "bucketize":
        return ColumnSpec(type="int32", kind="categorical", cardinality=len(t["boundaries"]) + 2, **common)
    if kind == "vocabulary":
        return ColumnSpec(type="int32", kind="categorical", cardinality=len(t["vocab"]) + 1, **common)
    if kind == "hash":
        return ColumnSpec(type="int32", kind="categorical", cardinality=int(t["num_buckets"]) + 1, **common)
    if kind == "tokens":
        return ColumnSpec(type="array<int32>", kind="tokens", shape=(int(t["length"]),),
                          cardinality=len(t["vocab"]) + 2, **common)
    if kind == "image":
        shape = tuple(image_output_shape(t))
        if t.get("normalize"):
            return ColumnSpec(type="array<float32>", kind="vector", shape=shape, **common)
        codec = t["codec"] if not t.get("resize") else "png"
        return ColumnSpec(type="binary", kind="image", codec=codec, shape=shape, **common)
    raise ValueError(f"unknown transform type {kind!r}")


def label_column_spec(label: dict[str, Any]):
    from sparkdl.schema import ColumnSpec

    task = label["task"]
    common = {"name": label["column"], "role": "label", "nullable": False, "kind": task,
              "description": label.get("description") or f"{task} label from {label['source']}"}
    if task == "binary":
        return ColumnSpec(type="int32", **common)
    if task == "regression":
        return ColumnSpec(type="float32", **common)
    n = len(label["classes"]) if label.get("classes") is not None else int(label["num_classes"])
    if task == "multiclass":
        return ColumnSpec(type="int32", cardinality=n, **common)
    return ColumnSpec(type="array<float32>", cardinality=n, shape=(n,), **common)
