"""The dataset description: one YAML file per dataset, the same structure as ``ETLConfig``.

Every section is a ``@dataclass(kw_only=True)``; ``ETLConfig.from_yaml`` builds them from the
parsed file and names the key path of anything unknown or invalid (``features[3].type``), so a
typo fails before Spark starts. ``docs/preprocessing.md`` states what each transform and
analyzer computes; ``examples/`` (``sparkdl.examples``) holds the bundled configs.

Paths in ``sources`` may use ``{lakehouse}`` (the lakehouse root the ETL writes to) and
``{config_dir}`` (the folder of the YAML file); a relative path is relative to the config file.
"""

from __future__ import annotations

import re

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ETLConfig",
    "SourceConfig",
    "JoinConfig",
    "JoinColumn",
    "IdConfig",
    "SplitConfig",
    "LabelConfig",
    "TransformConfig",
    "RulesConfig",
    "CheckRule",
    "OutputConfig",
    "SOURCE_FORMATS",
    "PARSE_TYPES",
    "is_parse_type",
    "TRANSFORMS",
    "TASKS",
    "SPLITS",
]

def is_parse_type(name: str) -> bool:
    """True for a declared column type (one of PARSE_TYPES, ``decimal(p,s)`` with numbers)."""
    return name in PARSE_TYPES and name != "decimal(p,s)" or re.fullmatch(r"decimal(\(\d+,\s*\d+\))?", name) is not None


SOURCE_FORMATS = ("csv", "parquet", "json", "delta", "table")
PARSE_TYPES = ("int", "long", "float", "double", "decimal(p,s)", "string", "bool", "date", "timestamp", "binary")
"""Declared column types; ``decimal(p,s)`` with a precision and scale (``decimal`` alone: decimal(10,0))."""
TRANSFORMS = ("standardize", "minmax", "numeric", "bucketize", "vocabulary", "hash", "tokens", "image")
"""Feature transforms; see docs/preprocessing.md for their exact semantics."""
TASKS = ("binary", "multiclass", "multilabel", "regression")
SPLITS = ("train", "valid", "test")
_AGGREGATES = ("avg", "min", "max", "sum", "count")
_OPS = (">", ">=", "<", "<=", "==", "!=")
_SUFFIX = {"standardize": "_z", "minmax": "_mm", "numeric": "_f", "bucketize": "_bucket", "vocabulary": "_id",
           "hash": "_hash", "tokens": "_tokens", "image": ""}


@dataclass(kw_only=True)
class SourceConfig:
    """One input: files, a Delta table or a Spark table."""

    format: str
    """csv, parquet, json, delta (a Delta table folder/URI) or table (a Spark catalog table)."""
    path: str | None = None
    """File, folder or table URI (csv/parquet/json/delta); may use {lakehouse} and {config_dir}."""
    table: str | None = None
    """Spark table name (format table)."""
    version: int | None = None
    """Delta table version to read (format delta); None = latest."""
    options: dict[str, Any] = field(default_factory=dict)
    """Spark reader options, e.g. {header: true, nullValue: NA} for CSV."""
    columns: list[str] | None = None
    """Columns kept (and required: a missing one is named before any work); None = all."""
    blank_as_null: bool = True
    """Empty (after trimming) string values count as null, so 'required' catches them."""

    def __post_init__(self) -> None:
        if self.format not in SOURCE_FORMATS:
            raise ValueError(f"format {self.format!r} is not one of {list(SOURCE_FORMATS)}")
        if self.format == "table":
            if not self.table:
                raise ValueError("format 'table' needs table: <catalog table name>")
        elif not self.path:
            raise ValueError(f"format {self.format!r} needs path: <file, folder or URI>")
        if self.version is not None and self.format != "delta":
            raise ValueError("version applies to format 'delta' only; drop it or use format: delta")


@dataclass(kw_only=True)
class JoinColumn:
    """One column a join brings over (a plain string is shorthand for its type)."""

    _SHORTHAND: typing.ClassVar[str] = "type"
    source_column: str | None = None
    """Column of the joined source (default: the output name)."""
    type: str = "double"
    """Parse type (one of PARSE_TYPES); unparseable values become null."""
    agg: str | None = None
    """How repeated keys combine (avg, min, max, sum, count); default: the join's aggregate."""

    def __post_init__(self) -> None:
        if not is_parse_type(self.type):
            raise ValueError(f"type {self.type!r} is not one of {list(PARSE_TYPES)}")
        if self.agg is not None and self.agg not in _AGGREGATES:
            raise ValueError(f"agg {self.agg!r} is not one of {list(_AGGREGATES)}")


@dataclass(kw_only=True)
class JoinConfig:
    """A left or inner join of another source onto the main rows, one row per key."""

    source: str
    """Name of a source in ``sources``."""
    keys: dict[str, str]
    """Main-row column -> joined-source column; the joined key is cast to the main column's type."""
    columns: dict[str, JoinColumn]
    """Output column name -> what to bring over."""
    how: str = "left"
    """left (rows without a match keep nulls) or inner (rows without a match are rejected as no_match:<source>)."""
    aggregate: str = "min"
    """How rows of the joined source repeating a key combine, so a join never duplicates a row."""
    broadcast: bool = True
    """Broadcast the (aggregated) joined source: right for small dimension tables."""

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("keys needs at least one key, e.g. {dest: faa}")
        if self.how not in ("left", "inner"):
            raise ValueError(f"how {self.how!r} is not one of ['left', 'inner']")
        if self.aggregate not in _AGGREGATES:
            raise ValueError(f"aggregate {self.aggregate!r} is not one of {list(_AGGREGATES)}")
        if not self.columns:
            raise ValueError("columns needs at least one column to bring over")


@dataclass(kw_only=True)
class IdConfig:
    """The row key: an existing column, or a stable hash of raw columns."""

    column: str
    """Name of the id column in every output table."""
    hash_of: list[str] | None = None
    """Generate the id as Spark's xxhash64 (seed 42) of these raw columns as read; None = use
    the existing column ``column``."""

    def __post_init__(self) -> None:
        if not self.column:
            raise ValueError("column must name the id column, e.g. row_id")
        if self.hash_of is not None and not self.hash_of:
            raise ValueError("hash_of must list at least one column (or be left out to use an existing id column)")


@dataclass(kw_only=True)
class SplitConfig:
    """How rows are divided: by a hash of the id with ratios, or by a time cutoff."""

    ratios: dict[str, float] | None = None
    """Split name (train, valid, test) -> fraction; hash buckets are given out in the listed order."""
    seed: int = 0
    """Seed of the split hash; changing it reshuffles the split."""
    time_column: str | None = None
    """Time split: a column of the main source (parsed); rows before valid_from are train."""
    valid_from: str | None = None
    """Time split: rows with time_column >= this (and before test_from) are valid."""
    test_from: str | None = None
    """Time split: rows with time_column >= this are test."""

    def __post_init__(self) -> None:
        if (self.ratios is None) == (self.time_column is None):
            raise ValueError("give either ratios (hash split, e.g. {train: 0.8, valid: 0.2}) or time_column + valid_from")
        if self.ratios is not None:
            bad = [k for k in self.ratios if k not in SPLITS]
            if bad or "train" not in self.ratios:
                raise ValueError(f"ratios keys must be among {list(SPLITS)} and include train, got {list(self.ratios)}")
            if any(not 0 < float(v) < 1 for v in self.ratios.values()) or abs(sum(self.ratios.values()) - 1) > 1e-9:
                raise ValueError(f"ratios must be fractions in (0, 1) that sum to 1, got {self.ratios}")
        else:
            if not self.valid_from:
                raise ValueError("a time split needs valid_from, e.g. '2013-11-01'")
            if self.test_from is not None and str(self.test_from) <= str(self.valid_from):
                raise ValueError(f"test_from {self.test_from!r} must come after valid_from {self.valid_from!r}")

    @property
    def names(self) -> list[str]:
        if self.ratios is not None:
            return [s for s in SPLITS if s in self.ratios]
        return ["train", "valid"] + (["test"] if self.test_from else [])


@dataclass(kw_only=True)
class LabelConfig:
    """The label and its task; derived from a source column."""

    source: str
    """Column the label comes from (after parsing, joins and derived columns)."""
    task: str
    """binary, multiclass, multilabel or regression."""
    column: str = "label"
    """Name of the label column in the encoded tables."""
    threshold: float | None = None
    """binary: label = (source <op> threshold) on the numeric source."""
    op: str = ">"
    """binary with threshold: one of >, >=, <, <=, ==, !=."""
    positive: list[Any] | None = None
    """binary: label = 1 when the source (as a string) is one of these, else 0."""
    classes: list[Any] | None = None
    """multiclass/multilabel: the class names in id order; None = fitted (values sorted ascending)."""
    num_classes: int | None = None
    """multiclass: the source already holds ids 0..num_classes-1 (others are rejected)."""
    separator: str | None = None
    """multilabel: the source is a string of labels joined by this; None = an array column."""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} is not one of {list(TASKS)}")
        if self.op not in _OPS:
            raise ValueError(f"op {self.op!r} is not one of {list(_OPS)}")
        if self.threshold is not None and not math.isfinite(float(self.threshold)):
            raise ValueError(f"threshold must be a finite number, got {self.threshold}")
        if self.task != "binary" and (self.threshold is not None or self.positive is not None):
            raise ValueError(f"threshold/positive apply to task binary only, not {self.task}")
        if self.threshold is not None and self.positive is not None:
            raise ValueError("give threshold or positive, not both")
        if self.num_classes is not None and (self.task != "multiclass" or self.num_classes < 2):
            raise ValueError("num_classes applies to task multiclass and must be at least 2")
        if self.classes is not None and self.task not in ("multiclass", "multilabel"):
            raise ValueError("classes apply to tasks multiclass and multilabel only")
        if self.classes is not None and self.num_classes is not None:
            raise ValueError("give classes or num_classes, not both")
        if self.separator is not None and self.task != "multilabel":
            raise ValueError("separator applies to task multilabel only")


@dataclass(kw_only=True)
class TransformConfig:
    """One feature: a raw column and how it is encoded (docs/preprocessing.md)."""

    input: str
    """Raw column (after parsing, joins and derived columns)."""
    type: str
    """standardize, minmax, numeric, bucketize, vocabulary, hash, tokens or image."""
    output: str | None = None
    """Encoded column name; default input + _z, _mm, _f, _bucket, _id, _hash, _tokens (image: input)."""
    min_count: int = 1
    """vocabulary/tokens: values seen fewer times in the training split are out of vocabulary."""
    top_k: int | None = None
    """vocabulary/tokens: keep at most this many most frequent values (ties by value, ascending)."""
    num_buckets: int | None = None
    """bucketize: number of quantile buckets; hash: number of hash buckets."""
    accuracy: int = 10000
    """bucketize: percentile_approx accuracy; boundary ranks are within 1/accuracy of exact."""
    length: int | None = None
    """tokens: fixed sequence length (truncated or padded with id 0)."""
    fill: float = 0.0
    """numeric: value for nulls and NaN."""
    codec: str = "png"
    """image: codec of the input bytes (png or jpeg)."""
    shape: list[int] | None = None
    """image: shape of the input images, [H, W] or [H, W, C] (C = 1, 3, 4)."""
    resize: list[int] | None = None
    """image: resize to [H, W] (bilinear) before storing; None = keep."""
    normalize: bool = False
    """image: store float32 (pixel/255 - mean) / std per channel, fitted on the training split."""
    description: str = ""
    """Free text, stored as the column's comment."""

    def __post_init__(self) -> None:
        if self.type not in TRANSFORMS:
            raise ValueError(f"type {self.type!r} is not one of {list(TRANSFORMS)}")
        if self.output is None:
            self.output = self.input + _SUFFIX[self.type]
        if self.min_count < 1:
            raise ValueError(f"min_count must be at least 1, got {self.min_count}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        if self.type in ("bucketize", "hash") and (self.num_buckets is None or self.num_buckets < 2):
            raise ValueError(f"{self.type} needs num_buckets >= 2, e.g. num_buckets: 10")
        if self.accuracy < 1:
            raise ValueError(f"accuracy must be positive, got {self.accuracy}; try 10000")
        if self.type == "tokens" and (self.length is None or self.length < 1):
            raise ValueError("tokens needs length >= 1 (the fixed sequence length), e.g. length: 32")
        if self.type == "image":
            if self.codec not in ("png", "jpeg"):
                raise ValueError(f"codec {self.codec!r} is not one of ['png', 'jpeg']")
            if self.shape is None or len(self.shape) not in (2, 3) or (
                    len(self.shape) == 3 and self.shape[2] not in (1, 3, 4)):
                raise ValueError(f"image needs shape [H, W] or [H, W, C] with C in 1, 3, 4, got {self.shape}")
            if self.resize is not None and (len(self.resize) != 2 or min(self.resize) < 1):
                raise ValueError(f"resize must be [H, W] of positive sizes, got {self.resize}")


@dataclass(kw_only=True)
class CheckRule:
    """A row check written as a Spark SQL boolean expression over the parsed main columns."""

    reason: str
    """Reject reason recorded when the expression is false or null, e.g. invalid_date."""
    sql: str
    """Boolean Spark SQL expression that holds for a usable row."""


@dataclass(kw_only=True)
class RulesConfig:
    """Validation: a failing row goes to the rejects table with its raw values and the first
    failing reason, in this order: required, unparseable, ranges, allowed, checks, label, weight."""

    required: list[str] = field(default_factory=list)
    """Columns that must be non-null (reason missing:<col>)."""
    ranges: dict[str, dict[str, float]] = field(default_factory=dict)
    """Column -> {min, max} (inclusive, either optional); reason out_of_range:<col>; nulls pass."""
    allowed: dict[str, list[Any]] = field(default_factory=dict)
    """Column -> allowed values (compared as strings); reason not_allowed:<col>; nulls pass."""
    checks: list[CheckRule] = field(default_factory=list)
    """Further checks as SQL expressions."""

    def __post_init__(self) -> None:
        for col, r in self.ranges.items():
            bad = [k for k in r if k not in ("min", "max")]
            if bad or not r:
                raise ValueError(f"ranges[{col!r}] takes min and/or max, got {list(r)}")


@dataclass(kw_only=True)
class OutputConfig:
    """Which tables are written, and how."""

    tables: dict[str, str] = field(default_factory=dict)
    """Role (train, valid, test, clean, rejects) -> table name; default <dataset>_<role> for
    each split and for rejects; clean is written only when named here."""
    include_split: bool = False
    """Keep a 'split' column in the encoded tables."""
    row_group_mb: int = 1
    """Parquet row-group size of the encoded tables (the loader's unit of sharding)."""
    schemas: dict[str, str] = field(default_factory=dict)
    """Optional declared schemas (name in schemas/ or a file) for clean, rejects and encoded:
    the frames are checked against them before any commit."""

    def __post_init__(self) -> None:
        bad = [k for k in self.tables if k not in (*SPLITS, "clean", "rejects")]
        if bad:
            raise ValueError(f"tables keys {bad} are not among {[*SPLITS, 'clean', 'rejects']}")
        bad = [k for k in self.schemas if k not in ("clean", "rejects", "encoded")]
        if bad:
            raise ValueError(f"schemas keys {bad} are not among ['clean', 'rejects', 'encoded']")
        if self.row_group_mb < 1:
            raise ValueError(f"row_group_mb must be at least 1, got {self.row_group_mb}")


@dataclass(kw_only=True)
class ETLConfig:
    """One dataset, from raw sources to encoded train/valid(/test) tables and their spec."""

    dataset: str
    """Dataset name: names the spec folder (specs/<dataset>/) and default table names."""
    sources: dict[str, SourceConfig]
    """Inputs by name; the first one (or ``main``) holds the rows, the others are joined."""
    id: IdConfig
    """The row key."""
    split: SplitConfig
    """How rows are split."""
    label: LabelConfig
    """The label and its task."""
    features: list[TransformConfig]
    """Per-column transforms, in output order."""
    main: str | None = None
    """Name of the source holding the rows; default the first source."""
    columns: dict[str, str] = field(default_factory=dict)
    """Parse types of main-source columns (int, long, float, double, decimal(p,s), string, bool, date,
    timestamp, binary); a value that does not parse rejects the row (unparseable:<col>)."""
    joins: list[JoinConfig] = field(default_factory=list)
    """Joins onto the main rows, applied in order after validation."""
    derive: dict[str, str] = field(default_factory=dict)
    """New column -> Spark SQL expression over the usable main rows, evaluated in order before
    the joins (so a join key may be derived)."""
    derive_after_joins: dict[str, str] = field(default_factory=dict)
    """New column -> Spark SQL expression evaluated in order after the joins."""
    weight: str | None = None
    """Optional sample-weight column (finite and >= 0, else rejected as invalid_weight)."""
    rules: RulesConfig = field(default_factory=RulesConfig)
    """Validation rules."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Output tables."""
    sample_fraction: float = 1.0
    """Keep this fraction of rows, chosen by hashing the id (deterministic); rows in counts kept rows."""
    mode: str = "overwrite"
    """overwrite: each run adds new table versions (old ones stay readable); error: fail if a table exists."""
    train: dict[str, Any] = field(default_factory=dict)
    """Training options for jobs/pipeline.py (TrainConfig fields); ignored by the ETL."""
    config_dir: str = ""
    """Folder of the YAML file (set by from_yaml; resolves relative paths)."""

    def __post_init__(self) -> None:
        if not self.dataset or not str(self.dataset).replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"dataset must be a name of letters, digits, _ or -, got {self.dataset!r}")
        if not self.sources:
            raise ValueError("sources needs at least one source")
        if self.main is None:
            self.main = next(iter(self.sources))
        elif self.main not in self.sources:
            raise ValueError(f"main {self.main!r} is not a source; sources: {list(self.sources)}")
        for i, j in enumerate(self.joins):
            if j.source not in self.sources or j.source == self.main:
                raise ValueError(f"joins[{i}].source {j.source!r} must name another source among {list(self.sources)}")
        for col, t in self.columns.items():
            if not is_parse_type(t):
                raise ValueError(f"columns[{col!r}]: type {t!r} is not one of {list(PARSE_TYPES)}")
        if not self.features:
            raise ValueError("features needs at least one transform, e.g. {input: x, type: standardize}")
        outputs = [t.output for t in self.features] + [self.id.column, self.label.column] + (
            [self.weight] if self.weight else []) + (["split"] if self.output.include_split else [])
        dupes = sorted({o for o in outputs if outputs.count(o) > 1})
        if dupes:
            raise ValueError(f"output columns {dupes} are produced more than once; give each feature its own output")
        if not 0.0 < self.sample_fraction <= 1.0:
            raise ValueError(f"sample_fraction must be in (0, 1], got {self.sample_fraction}; use 1.0 for all rows")
        if self.mode not in ("overwrite", "error"):
            raise ValueError(f"mode must be 'overwrite' or 'error', got {self.mode!r}")
        if self.split.time_column and self.split.time_column not in self.columns:
            raise ValueError(f"split.time_column {self.split.time_column!r} must be parsed: add it to columns "
                             "with type date or timestamp")

    # ----- views -----
    def table_names(self) -> dict[str, str]:
        """Role -> table name of every table this run writes."""
        names = {s: self.output.tables.get(s, f"{self.dataset}_{s}") for s in self.split.names}
        names["rejects"] = self.output.tables.get("rejects", f"{self.dataset}_rejects")
        if "clean" in self.output.tables:
            names["clean"] = self.output.tables["clean"]
        return names

    def resolve(self, path: str, lakehouse: str) -> str:
        """A source path with {lakehouse} and {config_dir} filled in; relative -> config folder."""
        out = path.replace("{lakehouse}", lakehouse.rstrip("/")).replace("{config_dir}", self.config_dir or ".")
        if "://" not in out and not out.startswith("/") and self.config_dir:
            out = str(Path(self.config_dir) / out)
        return out

    def with_overrides(self, **changes: Any) -> "ETLConfig":
        """A copy with top-level fields replaced (validated again)."""
        return dataclasses.replace(self, **changes)

    # ----- loading -----
    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "") -> "ETLConfig":
        """Build from the parsed YAML; errors name the file and key path."""
        return _build(cls, data, source or "config")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ETLConfig":
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist; pass --config with a dataset YAML file")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path} cannot be parsed: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping with dataset, sources, id, split, label, features")
        data.setdefault("config_dir", str(path.resolve().parent))
        return cls.from_dict(data, source=str(path))


def _build(tp: Any, value: Any, where: str) -> Any:
    """``value`` (parsed YAML) as type ``tp``; nested dataclasses, lists and dicts included."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and hasattr(tp, "_SHORTHAND"):
            value = {tp._SHORTHAND: value}
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        hints = typing.get_type_hints(tp)
        known = {f.name for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; known keys: {sorted(known)}")
        missing = [f.name for f in dataclasses.fields(tp) if f.name not in value
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"{where}: missing keys {missing}")
        kwargs = {k: _build(hints[k], v, f"{where}.{k}") for k, v in value.items()}
        try:
            return tp(**kwargs)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _build(args[0], value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_build(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        _, item = typing.get_args(tp) or (str, Any)
        return {str(k): _build(item, v, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value
