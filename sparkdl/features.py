"""What a table tells a model, and the checks of its columns before any rank starts.

``TableFeatures`` is the one protocol between a table and a model factory: every factory, the
built-in ones included, is called as ``factory(features=TableFeatures, **model_kwargs)`` and
finds there each feature column's name, kind, type, cardinality, shape and codec, the label
(task, number of classes), and the preprocessing spec of the table when it has one.

A column's kind comes from its ``sparkdl.kind`` metadata (the ETL sets it), else from its type:
float -> numeric, int/bool -> numeric (categorical when it declares a cardinality), binary with
a png/jpeg codec -> image, array<float> -> vector, array<int> -> tokens with a cardinality,
vector without. Strings and other types cannot feed a model: a ``DataValidationError`` names the
column and the fix before launch.

``check_table`` scans the label, weight and feature columns of one table version with pyarrow
(column by column, in vectorized kernels, one pass; no row loop) and raises a
``DataValidationError`` (not retried by the launcher) naming the column, the offending values
and the fix: labels breaking their task's rule, NaN/inf/null in numeric features, ids outside
a categorical/tokens column's cardinality, negative or non-finite weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sparkdl.errors import DataValidationError

if TYPE_CHECKING:
    from sparkdl.lakehouse import TableSnapshot
    from sparkdl.schema import ColumnSpec
    from sparkdl.tasks import Task

__all__ = ["Feature", "LabelInfo", "TableFeatures", "feature_of", "infer_task", "check_table", "scan_columns"]

FEATURE_KINDS = ("numeric", "categorical", "tokens", "image", "vector")
_EXAMPLES = 5


@dataclass(frozen=True, kw_only=True)
class Feature:
    """One feature column as a model sees it."""

    name: str
    kind: str
    """numeric (a scalar per row), categorical (an id < cardinality), tokens (ids < cardinality,
    0 = padding), image (uint8 pixels of ``shape``) or vector (numbers of ``shape``)."""
    type: str
    """The column's logical type (sparkdl.schema spelling, e.g. float32, array<int32>)."""
    cardinality: int | None = None
    """Embedding rows of a categorical/tokens column (OOV and padding included)."""
    shape: tuple[int, ...] | None = None
    """Per-row tensor shape of image/vector/tokens columns ([H, W], [H, W, C] or [C, H, W] for images)."""
    codec: str = "raw"
    """png/jpeg for images."""


@dataclass(frozen=True, kw_only=True)
class LabelInfo:
    """The label column and the task it defines."""

    name: str
    task: str
    """binary, multiclass, multilabel or regression (sparkdl.tasks)."""
    num_classes: int | None = None
    """Classes (multiclass) or labels (multilabel); None otherwise."""
    output_dim: int = 1
    """Outputs per row the model must return: 1 (a scalar) or num_classes."""


@dataclass(frozen=True, kw_only=True)
class TableFeatures:
    """What the training table knows, handed to every model factory as ``features=``."""

    features: tuple[Feature, ...]
    """The feature columns, in the order the model receives them."""
    label: LabelInfo
    spec: dict[str, Any] | None = field(default=None, compare=False)
    """The table's preprocessing spec (JSON object) when the ETL recorded one; None otherwise."""

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def output_dim(self) -> int:
        return self.label.output_dim

    def of_kind(self, *kinds: str) -> list[Feature]:
        return [f for f in self.features if f.kind in kinds]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TableFeatures":
        feats = tuple(Feature(**{**f, "shape": tuple(f["shape"]) if f.get("shape") else None})
                      for f in data["features"])
        return cls(features=feats, label=LabelInfo(**data["label"]), spec=data.get("spec"))

    def with_shapes(self, shapes: dict[str, tuple[int, ...]]) -> "TableFeatures":
        """Fill in undeclared per-row shapes (e.g. from a decoded sample batch)."""
        feats = tuple(replace(f, shape=f.shape or shapes.get(f.name)) if f.kind in ("image", "vector", "tokens")
                      else f for f in self.features)
        return replace(self, features=feats)


def _type_parts(type_name: str) -> tuple[bool, str]:
    if type_name.startswith("array<"):
        return True, type_name[6:-1]
    return False, type_name


def _is_int(t: str) -> bool:
    return t in ("bool", "int8", "int16", "int32", "int64")


def feature_of(col: "ColumnSpec", *, table: str) -> Feature:
    """The Feature of a declared column, its kind inferred when not declared."""
    is_array, leaf = _type_parts(col.type)
    kind = col.kind
    if kind is None:
        if col.codec in ("png", "jpeg"):
            kind = "image"
        elif not is_array and (leaf in ("float32", "float64") or _is_int(leaf)):
            kind = "categorical" if _is_int(leaf) and col.cardinality else "numeric"
        elif is_array and leaf in ("float32", "float64"):
            kind = "vector"
        elif is_array and _is_int(leaf):
            kind = "tokens" if col.cardinality else "vector"
    if kind is None:
        fix = ("encode it in the ETL (a vocabulary gives a categorical id column, a tokenizer a tokens column)"
               if leaf == "string" else "convert it in the ETL to a number, an array of numbers or a png/jpeg image")
        raise DataValidationError(
            f"feature column {col.name!r} of {table} holds {col.type}, which no model can take as input: {fix}, "
            "or leave it out with feature_columns=[...] (or give it role meta/id in the schema)")
    if kind not in FEATURE_KINDS:
        raise DataValidationError(f"feature column {col.name!r} of {table} has kind {kind!r}, a label kind; give "
                                  f"it one of {list(FEATURE_KINDS)}, or make it the label (label_column=)")
    if kind in ("categorical", "tokens") and not col.cardinality:
        raise DataValidationError(f"feature column {col.name!r} of {table} is {kind} but declares no cardinality "
                                  "(number of ids, OOV/padding included); declare it in the schema")
    return Feature(name=col.name, kind=kind, type=col.type, cardinality=col.cardinality,
                   shape=tuple(col.shape) if col.shape else None, codec=col.codec)


# ---------------------------------------------------------------------------------------
# One pyarrow pass over the columns
# ---------------------------------------------------------------------------------------
def _new_stats() -> dict[str, Any]:
    return {"rows": 0, "nulls": 0, "nan": 0, "inf": 0, "min": math.inf, "max": -math.inf, "integral": True,
            "min_length": math.inf, "max_length": -math.inf, "nonfinite": 0}


def _update(st: dict[str, Any], arr: pa.Array) -> None:
    st["rows"] += len(arr)
    st["nulls"] += arr.null_count
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        lengths = pc.list_value_length(arr)
        mm = pc.min_max(lengths)
        if mm["min"].as_py() is not None:
            st["min_length"] = min(st["min_length"], mm["min"].as_py())
            st["max_length"] = max(st["max_length"], mm["max"].as_py())
        arr = pc.list_flatten(arr)
        st["nulls"] += arr.null_count
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_boolean(arr.type)):
        st["not_numeric"] = str(arr.type)
        return
    v = arr.cast(pa.float64()).drop_null()
    if len(v) == 0:
        return
    if pa.types.is_floating(arr.type):
        nan = pc.sum(pc.is_nan(v)).as_py() or 0
        finite = pc.is_finite(v)
        bad = len(v) - (pc.sum(finite).as_py() or 0)
        st["nan"] += nan
        st["inf"] += bad - nan
        st["nonfinite"] += bad
        v = pc.filter(v, finite)
        if len(v):
            st["integral"] &= bool(pc.all(pc.equal(pc.floor(v), v)).as_py())
    if len(v):
        mm = pc.min_max(v)
        st["min"] = min(st["min"], mm["min"].as_py())
        st["max"] = max(st["max"], mm["max"].as_py())


def _dataset(snap: "TableSnapshot"):
    import pyarrow.dataset as ds

    from sparkdl import _fs

    if not snap.files:
        return None
    fs, _ = _fs.resolve(snap.files[0])
    return ds.dataset([_fs.resolve(f)[1] for f in snap.files], format="parquet", filesystem=fs)


def scan_columns(snap: "TableSnapshot", columns: list[str]) -> dict[str, dict[str, Any]]:
    """Per column: rows, nulls, NaN, inf, min/max of the finite values, whether they are all
    integers, and list lengths; one pass over the table's files (partition columns are skipped)."""
    stats = {c: _new_stats() for c in columns}
    data = _dataset(snap)
    cols = [c for c in columns if c not in snap.partition_columns]
    if data is None or not cols:
        return stats
    for batch in data.to_batches(columns=cols, batch_size=1 << 17):
        for c in cols:
            _update(stats[c], batch.column(c))
    return stats


def _examples(snap: "TableSnapshot", column: str, mask_of) -> list[Any]:
    """Up to 5 distinct offending values of ``column`` (``mask_of(array)`` marks them)."""
    found: list[Any] = []
    data = _dataset(snap)
    for batch in data.to_batches(columns=[column], batch_size=1 << 17):
        arr = batch.column(column)
        for v in pc.filter(arr, mask_of(arr)).to_pylist():
            if v not in found:
                found.append(v)
            if len(found) >= _EXAMPLES:
                return found
    return found


# ---------------------------------------------------------------------------------------
# Task resolution and checks
# ---------------------------------------------------------------------------------------
def infer_task(label: "ColumnSpec", stats: dict[str, Any], *, task: str | None,
               num_classes: int | None) -> tuple[str, int | None]:
    """(task, num_classes): the config's, else the label column's kind and cardinality, else
    from its type and values (array -> multilabel; float with non-integer values -> regression;
    integers in {0, 1} -> binary; other non-negative integers -> multiclass with max + 1 classes)."""
    from sparkdl.tasks import TASKS

    name = task or (label.kind if label.kind in TASKS else None)
    is_array, leaf = _type_parts(label.type)
    if stats.get("not_numeric"):
        raise DataValidationError(
            f"label column {label.name!r} holds {label.type}, not numbers; encode it in the ETL (class ids via a "
            "vocabulary, 0/1, or numbers), or pick another label_column=")
    if name is None:
        if is_array:
            name = "multilabel"
        elif leaf in ("float32", "float64") and not stats["integral"]:
            name = "regression"
        elif stats["integral"] and stats["min"] >= 0 and stats["max"] <= 1:
            name = "binary"
        elif stats["integral"] and stats["min"] >= 0 and math.isfinite(stats["max"]):
            name = "multiclass"
        elif leaf in ("float32", "float64") or _is_int(leaf):
            name = "regression"
        else:
            raise DataValidationError(
                f"label column {label.name!r} holds {label.type}, which defines no task; encode it in the ETL "
                "(class ids, 0/1, numbers), or pass task= and a numeric label_column=")
    if name in ("multiclass", "multilabel"):
        num_classes = num_classes or label.cardinality
        if num_classes is None and name == "multilabel" and label.shape:
            num_classes = int(np.prod(label.shape))
        if num_classes is None and name == "multilabel" and stats["min_length"] == stats["max_length"]:
            num_classes = int(stats["max_length"]) if math.isfinite(stats["max_length"]) else None
        if num_classes is None and name == "multiclass" and stats["integral"] and math.isfinite(stats["max"]):
            num_classes = int(stats["max"]) + 1
    else:
        num_classes = None
    return name, num_classes


def _shown(values: list[Any]) -> str:
    return ", ".join(repr(v) for v in values)


def check_label(snap: "TableSnapshot", label: str, stats: dict[str, Any], task: "Task") -> None:
    where = f"label column {label!r} of {snap.uri} v{snap.version}"
    if stats["nulls"]:
        raise DataValidationError(f"{where} has {stats['nulls']} null values; {task.name} labels cannot be missing: "
                                  "drop or fill those rows in the ETL")
    if stats.get("not_numeric"):
        raise DataValidationError(f"{where} holds {stats['not_numeric']}, not numbers; {task.label_rule}")
    if task.label_problem(stats) is None:
        return
    bad = _examples(snap, label, task.bad_labels)
    fix = {"binary": "derive a 0/1 label in the ETL, or pass task='regression' (or 'multiclass')",
           "multiclass": "fix the ids in the ETL, or pass num_classes= (or declare the label's cardinality)",
           "multilabel": "fix the vectors in the ETL, or pass num_classes=",
           "regression": "drop or fill those rows in the ETL"}[task.name]
    raise DataValidationError(f"{where}: {task.label_rule}, but it holds e.g. {_shown(bad)} "
                              f"(task={task.name!r}); {fix}")


def check_weight(snap: "TableSnapshot", weight: str, stats: dict[str, Any]) -> None:
    if stats.get("not_numeric") or stats["nulls"] or stats["nonfinite"] or stats["min"] < 0:
        raise DataValidationError(
            f"weight column {weight!r} of {snap.uri} v{snap.version} must hold finite numbers >= 0 (found "
            f"{stats['nulls']} nulls, {stats['nonfinite']} NaN/inf, minimum {stats['min']}); fix it in the ETL or "
            "drop weight_column")


def check_features(snap: "TableSnapshot", features: list[Feature], stats: dict[str, dict[str, Any]]) -> None:
    problems = []
    for f in features:
        st = stats[f.name]
        if f.kind in ("numeric", "vector"):
            if st["nan"] or st["inf"] or st["nulls"]:
                problems.append(f"{f.name!r} has {st['nan']} NaN, {st['inf']} inf and {st['nulls']} null values "
                                f"in {st['rows']} rows")
        elif f.kind in ("categorical", "tokens"):
            if st["nulls"]:
                problems.append(f"{f.name!r} has {st['nulls']} null ids")
            elif st["rows"] and (st["min"] < 0 or st["max"] >= f.cardinality):
                problems.append(f"{f.name!r} holds ids {int(st['min'])}..{int(st['max'])} but its cardinality is "
                                f"{f.cardinality} (ids must be 0..{f.cardinality - 1})")
    if problems:
        raise DataValidationError(
            f"feature columns of {snap.uri} v{snap.version}: " + "; ".join(problems) + ". Fill or drop those rows "
            "in the ETL (a numeric transform with a fill value), fix the cardinality in the schema, or leave the "
            "columns out with feature_columns=")


def check_table(snap: "TableSnapshot", *, label: str, task: "Task", features: list[Feature],
                weight: str | None, stats: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Check one table version's label, weight and feature columns (``stats`` from
    ``scan_columns``, scanned here when None); returns the statistics."""
    names = [label] + ([weight] if weight else []) + [f.name for f in features if f.kind != "image"]
    if stats is None:
        stats = scan_columns(snap, list(dict.fromkeys(names)))
    check_label(snap, label, stats[label], task)
    if weight:
        check_weight(snap, weight, stats[weight])
    check_features(snap, [f for f in features if f.kind != "image"], stats)
    return stats

