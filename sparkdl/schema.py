"""Dataset schemas: the declared columns, types, roles, tensor shapes and codecs.

Schemas live in ``schemas/<name>.yaml`` (or ``.json``). ETL output is validated against its
schema before commit, and the roles, shapes and codecs travel into the Delta table as
column metadata (``sparkdl.role``, ``sparkdl.shape``, ``sparkdl.codec``), so a loader
reading any version of the table knows how to decode it without the YAML file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from sparkdl.errors import SchemaMismatchError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame
    from pyspark.sql.types import DataType

__all__ = ["ColumnSpec", "DatasetSchema", "schemas_dir", "spark_to_arrow_schema", "ROLES", "CODECS", "KINDS", "TYPES"]

ROLES = ("feature", "label", "id", "weight", "meta")
CODECS = ("raw", "png", "jpeg")
KINDS = ("numeric", "categorical", "tokens", "image", "vector", "binary", "multiclass", "multilabel", "regression")
"""What a column holds for a model. Features: numeric (a scalar), categorical (an id < cardinality),
tokens (a fixed-length id sequence, ids < cardinality, 0 = padding), image (a decoded uint8 tensor),
vector (a numeric array). Labels: the task they define (multiclass/multilabel: cardinality = classes)."""
_SCALARS: dict[str, pa.DataType] = {
    "bool": pa.bool_(),
    "int8": pa.int8(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "string": pa.string(),
    "binary": pa.binary(),
    "date": pa.date32(),
    "timestamp": pa.timestamp("us", tz="UTC"),
    "timestamp_ntz": pa.timestamp("us"),
}
TYPES = tuple(_SCALARS) + tuple(f"array<{t}>" for t in _SCALARS if t not in ("string", "binary"))


def schemas_dir() -> Path:
    """Folder of the bundled schemas: ``SPARKDL_SCHEMAS_DIR`` if set, else the copy shipped in
    the installed package, else ``schemas/`` of the source checkout."""
    from sparkdl._resources import resource_dir

    return resource_dir("schemas", env="SPARKDL_SCHEMAS_DIR")


def _arrow_type(type_name: str) -> pa.DataType:
    if type_name in _SCALARS:
        return _SCALARS[type_name]
    if type_name.startswith("array<") and type_name.endswith(">"):
        return pa.list_(_arrow_type(type_name[6:-1]))
    raise ValueError(f"unknown type {type_name!r}; use one of {list(TYPES)}")


def _type_name(t: pa.DataType) -> str:
    """Inverse of ``_arrow_type``: the schema-file spelling of an Arrow type."""
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return f"array<{_type_name(t.value_type)}>"
    if pa.types.is_timestamp(t):
        return "timestamp" if t.tz else "timestamp_ntz"
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return "binary"
    for name, scalar in _SCALARS.items():
        if t == scalar:
            return name
    return str(t)


@dataclass(frozen=True, kw_only=True)
class ColumnSpec:
    """One declared column."""

    name: str
    """Column name as written to the table."""
    type: str
    """Logical type: bool, int8..int64, float32, float64, string, binary, date, timestamp (an
    instant, stored in UTC), timestamp_ntz (a wall-clock time without zone) or array<T>."""
    role: str = "feature"
    """What the column is for: feature, label, id, weight or meta (carried, not trained on)."""
    shape: tuple[int, ...] | None = None
    """Tensor shape of one value, for array columns and decoded images (e.g. [8, 8])."""
    codec: str = "raw"
    """How a binary value decodes: raw (bytes as is), png or jpeg (to a uint8 tensor)."""
    nullable: bool = True
    """Whether nulls are allowed; non-nullable columns are checked before commit."""
    kind: str | None = None
    """What the column holds for a model (one of ``KINDS``); None = inferred from type and codec by readers."""
    cardinality: int | None = None
    """Number of distinct ids of a categorical/tokens feature (embedding rows, OOV and padding included),
    or of classes of a multiclass/multilabel label; None when not applicable."""
    description: str = ""
    """Free text for people reading the schema."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a column needs a non-empty string name, got {self.name!r}")
        try:
            _arrow_type(self.type)
        except (ValueError, AttributeError) as e:
            raise ValueError(f"column {self.name!r}: {e}") from None
        if self.role not in ROLES:
            raise ValueError(f"column {self.name!r}: role {self.role!r} is not one of {list(ROLES)}")
        if self.codec not in CODECS:
            raise ValueError(f"column {self.name!r}: codec {self.codec!r} is not one of {list(CODECS)}")
        if self.codec != "raw" and self.type != "binary":
            raise ValueError(f"column {self.name!r}: codec {self.codec!r} needs type binary, not {self.type}")
        if self.kind is not None and self.kind not in KINDS:
            raise ValueError(f"column {self.name!r}: kind {self.kind!r} is not one of {list(KINDS)}")
        if self.cardinality is not None and (
                isinstance(self.cardinality, bool) or not isinstance(self.cardinality, int) or self.cardinality < 1):
            raise ValueError(f"column {self.name!r}: cardinality {self.cardinality!r} must be a positive integer")
        if self.shape is not None:
            try:
                if isinstance(self.shape, (str, bytes)):
                    raise TypeError
                object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
            except (TypeError, ValueError):
                raise ValueError(
                    f"column {self.name!r}: shape {self.shape!r} must be a list of positive sizes, e.g. [8, 8]"
                ) from None
            if any(d <= 0 for d in self.shape):
                raise ValueError(f"column {self.name!r}: shape {list(self.shape)} must be positive sizes")

    @property
    def arrow_type(self) -> pa.DataType:
        return _arrow_type(self.type)

    def arrow_field(self) -> pa.Field:
        meta = {"sparkdl.role": self.role, "sparkdl.codec": self.codec}
        if self.shape is not None:
            meta["sparkdl.shape"] = json.dumps(list(self.shape))
        if self.kind is not None:
            meta["sparkdl.kind"] = self.kind
        if self.cardinality is not None:
            meta["sparkdl.cardinality"] = str(self.cardinality)
        if self.description:
            meta["comment"] = self.description
        return pa.field(self.name, self.arrow_type, nullable=self.nullable, metadata=meta)

    @classmethod
    def from_arrow_field(cls, f: pa.Field) -> "ColumnSpec":
        meta = {k.decode(): v.decode() for k, v in (f.metadata or {}).items()}
        shape = meta.get("sparkdl.shape")
        return cls(
            name=f.name,
            type=_type_name(f.type),
            role=meta.get("sparkdl.role", "feature"),
            codec=meta.get("sparkdl.codec", "raw"),
            shape=tuple(json.loads(shape)) if shape else None,
            nullable=f.nullable,
            kind=meta.get("sparkdl.kind"),
            cardinality=int(meta["sparkdl.cardinality"]) if meta.get("sparkdl.cardinality") else None,
            description=meta.get("comment", ""),
        )


@dataclass(frozen=True, kw_only=True)
class DatasetSchema:
    """A dataset's declared columns."""

    name: str
    """Dataset name; also the schema file's stem."""
    columns: tuple[ColumnSpec, ...]
    """Declared columns, in table order."""
    description: str = ""
    """Free text."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other keys of the schema file, kept for the caller."""
    source: str = field(default="", compare=False)
    """The file the schema was loaded from (named in error messages); empty when built in code."""

    def __post_init__(self) -> None:
        names = [c.name for c in self.columns]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"schema {self.name!r} declares columns {dupes} more than once")

    # ----- loading -----
    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str | None = None) -> "DatasetSchema":
        """Build from the parsed schema file; ``source`` (the file) is named in every error."""
        where = f" ({source})" if source else ""
        if not isinstance(data, dict):
            raise ValueError(f"a schema must be a mapping with name and columns, got {type(data).__name__}{where}")
        data = dict(data)
        try:
            name = data.pop("name")
            cols = data.pop("columns")
        except KeyError as e:
            raise ValueError(f"schema is missing the key {e.args[0]!r} (needs name and columns){where}") from e
        if not isinstance(cols, list):
            raise ValueError(f"schema {name!r}{where}: columns must be a list of mappings")
        desc = data.pop("description", "")
        columns = []
        for i, c in enumerate(cols):
            if not isinstance(c, dict):
                raise ValueError(f"schema {name!r}{where}, column #{i}: expected a mapping with name and type, got {c!r}")
            try:
                columns.append(ColumnSpec(**c))
            except (TypeError, ValueError) as e:
                raise ValueError(f"schema {name!r}{where}, column #{i} ({c.get('name')!r}): {e}") from e
        try:
            return cls(name=name, columns=tuple(columns), description=desc, extra=data, source=source or "")
        except ValueError as e:
            raise ValueError(f"{e}{where}") from e

    @classmethod
    def from_file(cls, path: str | Path) -> "DatasetSchema":
        path = Path(path)
        text = path.read_text()
        try:
            if path.suffix == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as e:  # yaml.YAMLError / json.JSONDecodeError: both name the line
            raise ValueError(f"schema file {path} cannot be parsed: {e}") from e
        if data is None:
            raise ValueError(f"schema file {path} is empty; it needs name and columns")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def load(cls, name: str) -> "DatasetSchema":
        """Load ``schemas/<name>.yaml`` (or .yml/.json), or a schema file path."""
        p = Path(name)
        if p.suffix in (".yaml", ".yml", ".json") and p.exists():
            return cls.from_file(p)
        for ext in (".yaml", ".yml", ".json"):
            candidate = schemas_dir() / f"{name}{ext}"
            if candidate.exists():
                return cls.from_file(candidate)
        known = sorted({q.stem for q in schemas_dir().iterdir() if q.suffix in (".yaml", ".yml", ".json")}) if schemas_dir().is_dir() else []
        raise ValueError(f"no schema named {name!r} in {schemas_dir()}; known schemas: {known}")

    @classmethod
    def from_arrow(cls, schema: pa.Schema, name: str = "table") -> "DatasetSchema":
        """Recover a schema from Arrow/Delta column metadata (written by ``to_arrow``)."""
        return cls(name=name, columns=tuple(ColumnSpec.from_arrow_field(f) for f in schema))

    # ----- views -----
    def to_arrow(self) -> pa.Schema:
        return pa.schema([c.arrow_field() for c in self.columns])

    def to_dict(self) -> dict[str, Any]:
        cols = []
        for c in self.columns:
            d: dict[str, Any] = {"name": c.name, "type": c.type, "role": c.role, "nullable": c.nullable}
            if c.shape is not None:
                d["shape"] = list(c.shape)
            if c.codec != "raw":
                d["codec"] = c.codec
            if c.kind is not None:
                d["kind"] = c.kind
            if c.cardinality is not None:
                d["cardinality"] = c.cardinality
            if c.description:
                d["description"] = c.description
            cols.append(d)
        return {"name": self.name, "description": self.description, "columns": cols, **self.extra}

    def column(self, name: str) -> ColumnSpec:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"schema {self.name!r} has no column {name!r}; columns: {self.names}")

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def with_role(self, role: str) -> list[ColumnSpec]:
        return [c for c in self.columns if c.role == role]

    # ----- validation -----
    def mismatches(self, found: pa.Schema) -> list[str]:
        """Differences between this schema and ``found``, one message per column."""
        problems = []
        found_names = set(found.names)
        for c in self.columns:
            if c.name not in found_names:
                problems.append(f"column {c.name!r} is missing (expected {c.type})")
                continue
            got = _type_name(found.field(c.name).type)
            if got != c.type:
                problems.append(f"column {c.name!r}: expected {c.type}, found {got}")
        for n in found.names:
            if n not in {c.name for c in self.columns}:
                problems.append(
                    f"unexpected column {n!r} ({_type_name(found.field(n).type)}): declare it in "
                    f"{self.source or schemas_dir() / (self.name + '.yaml')} or drop it"
                )
        return problems

    def validate_arrow(self, found: pa.Schema) -> None:
        problems = self.mismatches(found)
        if problems:
            raise SchemaMismatchError(self.name, problems)

    def validate_spark(self, df: "DataFrame", *, check_nulls: bool = False) -> None:
        """Check column names and types of ``df``; with ``check_nulls`` also count nulls in
        non-nullable columns (one aggregation pass over the data)."""
        self.validate_arrow(spark_to_arrow_schema(df.schema))
        if check_nulls:
            from pyspark.sql import functions as F

            required = [c.name for c in self.columns if not c.nullable]
            if not required:
                return
            row = df.agg(*[F.sum(F.col(n).isNull().cast("long")).alias(n) for n in required]).first()
            bad = [f"column {n!r} is declared non-nullable but has {row[n]} nulls" for n in required if row[n]]
            if bad:
                raise SchemaMismatchError(self.name, bad)

    def spark_schema(self):  # -> pyspark.sql.types.StructType
        from pyspark.sql.types import StructField, StructType

        return StructType([StructField(c.name, _spark_type(c.type), c.nullable) for c in self.columns])

    def arrow_with_metadata(self, found: pa.Schema) -> pa.Schema:
        """``found`` with this schema's column metadata attached (for the Delta commit)."""
        fields = []
        for f in found:
            try:
                spec = self.column(f.name)
            except KeyError:
                fields.append(f)
                continue
            # The declared nullability goes into the table, so readers of any version see it.
            fields.append(f.with_metadata(spec.arrow_field().metadata).with_nullable(spec.nullable))
        return pa.schema(fields)


def _spark_type(type_name: str) -> "DataType":
    from pyspark.sql import types as T

    simple = {
        "bool": T.BooleanType(), "int8": T.ByteType(), "int16": T.ShortType(),
        "int32": T.IntegerType(), "int64": T.LongType(), "float32": T.FloatType(),
        "float64": T.DoubleType(), "string": T.StringType(), "binary": T.BinaryType(),
        "date": T.DateType(), "timestamp": T.TimestampType(), "timestamp_ntz": T.TimestampNTZType(),
    }
    if type_name in simple:
        return simple[type_name]
    return T.ArrayType(_spark_type(type_name[6:-1]))


def spark_to_arrow_schema(spark_schema: Any) -> pa.Schema:
    """Arrow schema of a Spark StructType: timestamps as UTC microseconds, as Delta stores
    them (``timestamp_ntz`` stays zone-less), nested types included."""
    from pyspark.sql.pandas.types import to_arrow_schema

    # pyspark needs a zone to map TimestampType; instants are stored in UTC whatever the
    # session's zone, so UTC is the right label and no value changes.
    arrow = to_arrow_schema(spark_schema, timezone="UTC")
    return pa.schema([pa.field(f.name, _utc_micros(f.type), f.nullable) for f in arrow])


def _utc_micros(t: pa.DataType) -> pa.DataType:
    if pa.types.is_timestamp(t):
        return pa.timestamp("us", tz="UTC" if t.tz else None)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return pa.list_(pa.field(t.value_field.name, _utc_micros(t.value_type), t.value_field.nullable))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _utc_micros(f.type), f.nullable) for f in t])
    if pa.types.is_map(t):
        return pa.map_(_utc_micros(t.key_type), pa.field(t.item_field.name, _utc_micros(t.item_type), t.item_field.nullable))
    return t
