"""Typed values and keys: how a raw value of a declared type becomes a number or a lookup key,
the same way in Spark and in pandas.

A fitted transform records its input column's Spark type (``input_type``, e.g. ``double``,
``decimal(10,2)``, ``date``; the label records ``source_type``). Encoding first casts the input
to that type (Spark ``try_cast``; in pandas, the value as that type), then:

- integers, decimals, strings, booleans, dates, timestamps and binary are keyed by Spark's cast
  to string (``"7"``, ``"4.00"``, ``"true"``, ``"2024-01-02"``, ``"2024-01-02 03:04:05.12"``);
- float and double are compared as numbers (a vocabulary entry is parsed back to its number)
  and hashed by their bits (Spark's ``hash``: Murmur3 of ``doubleToLongBits``, seed 42), never by
  their text: the JVM's ``Double.toString`` prints some doubles with one more digit before Java 19,
  so text keys would differ between Spark clusters, and between Spark and pandas.

NaN counts as null. Naive pandas timestamps are wall time in the Spark session's time zone
(sparkdl's sessions use UTC). A transform without ``input_type`` (specs written before it) keys
values as before: Spark's cast of whatever type the column has, and ``as_key`` in pandas.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import re
import struct
import zlib
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import Column

__all__ = ["NUMERIC_TYPES", "is_numeric_type", "numeric_type_error", "spark_typed", "pandas_values",
           "key_string", "spark_lookup", "pandas_lookup", "spark_hash", "pandas_hash", "murmur3_long",
           "spark_float", "pandas_float"]

NUMERIC_TYPES = ("tinyint", "smallint", "int", "bigint", "float", "double", "boolean")
"""Spark types a numeric transform accepts (and ``decimal(p,s)``)."""
_INT_RANGE = {"tinyint": 2**7, "smallint": 2**15, "int": 2**31, "bigint": 2**63}
_FLOATS = ("float", "double")
_DECIMAL = re.compile(r"decimal\((\d+),\s*(\d+)\)")
_M32 = 0xFFFFFFFF


def is_numeric_type(input_type: str | None) -> bool:
    """True for a type numeric transforms read (None: unknown, accepted as before)."""
    return input_type is None or input_type in NUMERIC_TYPES or bool(_DECIMAL.fullmatch(input_type))


def numeric_type_error(kind: str, column: str, input_type: str) -> ValueError:
    return ValueError(
        f"features: {kind} of column {column!r} needs numbers, but {column!r} is {input_type}; declare it "
        f"numeric under columns ({column}: double) or encode it with a vocabulary or hash transform")


def _base(input_type: str | None) -> str | None:
    if input_type is None:
        return None
    if _DECIMAL.fullmatch(input_type) or input_type == "decimal":
        return "decimal"
    if input_type in _INT_RANGE:
        return "int"
    if input_type.startswith(("varchar", "char")):
        return "string"
    if input_type == "timestamp_ntz":
        return "timestamp"
    return input_type


# ---------------------------------------------------------------------------------------
# Spark
# ---------------------------------------------------------------------------------------
def spark_typed(col: "Column", input_type: str | None) -> "Column":
    """``col`` cast to the recorded type (a no-op on a column of that type); NaN as null."""
    from pyspark.sql import functions as F

    if input_type is None:
        return col
    x = col.try_cast(input_type)
    return F.when(~F.isnan(x), x) if input_type in _FLOATS else x


def spark_float(col: "Column", input_type: str | None) -> "Column":
    """The value as a double (NaN as null), after the cast to the recorded type."""
    from pyspark.sql import functions as F

    x = spark_typed(col, input_type).try_cast("double")
    return F.when(~F.isnan(x), x)


def _numbers(values: list[Any]) -> list[float]:
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue  # an entry that is no number never matches a number
        if f == f:
            out.append(f)
    return out


def spark_lookup(values: list[Any], col: "Column", input_type: str | None, first: int) -> "Column":
    """``first`` + index of the value in ``values`` (strings, as fitted); null when absent or null."""
    from pyspark.sql import functions as F

    from sparkdl.etl.transforms import as_key

    if not values:
        return F.lit(None).cast("int")
    if input_type in _FLOATS:
        x = spark_float(col, input_type)
        pairs: dict[float, int] = {}
        for i, v in enumerate(values):
            for f in _numbers([v]):
                pairs.setdefault(f + 0.0, i + first)  # -0.0 and 0.0 are one key
        if not pairs:
            return F.lit(None).cast("int")
        m = F.create_map(*[x for k, i in pairs.items() for x in (F.lit(k), F.lit(i))])
        return F.try_element_at(m, x + F.lit(0.0))
    key = spark_typed(col, input_type).cast("string")
    keys: dict[str, int] = {}
    for i, v in enumerate(values):
        keys.setdefault(as_key(v), i + first)
    m = F.create_map(*[x for k, i in keys.items() for x in (F.lit(k), F.lit(i))])
    return F.when(key.isNotNull(), F.try_element_at(m, key))


def spark_hash(col: "Column", input_type: str | None, num_buckets: int) -> "Column":
    """1 + hash mod ``num_buckets``; null for null."""
    from pyspark.sql import functions as F

    n = F.lit(int(num_buckets))
    if input_type in _FLOATS:
        x = spark_float(col, input_type) + F.lit(0.0)
        return F.when(x.isNotNull(), F.pmod(F.hash(x), n) + 1)
    key = spark_typed(col, input_type).cast("string")
    return F.when(key.isNotNull(), F.pmod(F.crc32(F.encode(key, "UTF-8")), n) + 1)


# ---------------------------------------------------------------------------------------
# pandas
# ---------------------------------------------------------------------------------------
def _timestamp(v: Any) -> _dt.datetime | None:
    import pandas as pd

    try:
        ts = pd.Timestamp(v)
    except (TypeError, ValueError):
        return None
    if ts is pd.NaT:
        return None
    if ts.tzinfo is not None:
        ts = ts.tz_convert("UTC").tz_localize(None)
    return ts.floor("us").to_pydatetime()


def _one(v: Any, base: str, input_type: str) -> Any:
    """One pandas value as a Python value of the recorded type (None: null or not castable)."""
    from sparkdl.etl.transforms import as_key, is_null

    if v is None or (not isinstance(v, (str, bytes, list, np.ndarray)) and is_null(v)):
        return None
    if base == "int":
        if isinstance(v, (bool, np.bool_)):
            out = int(v)
        elif isinstance(v, (int, np.integer)):
            out = int(v)
        elif isinstance(v, (float, np.floating, decimal.Decimal)):
            if not np.isfinite(float(v)):
                return None
            out = int(v)  # Spark truncates toward zero
        elif isinstance(v, str):
            try:
                out = int(v.strip())
            except ValueError:
                return None
        else:
            return None
        lim = _INT_RANGE.get(input_type, 2**31)
        return out if -lim <= out < lim else None
    if base in _FLOATS:
        try:
            f = float(v)
        except (TypeError, ValueError):
            return None
        if base == "float":
            with np.errstate(over="ignore"):
                f = float(np.float32(f))
        return None if f != f else f
    if base == "decimal":
        m = _DECIMAL.fullmatch(input_type)
        precision, scale = (int(m.group(1)), int(m.group(2))) if m else (10, 0)
        try:
            d = v if isinstance(v, decimal.Decimal) else decimal.Decimal(repr(float(v)) if isinstance(
                v, (float, np.floating)) else str(v).strip())
            if not d.is_finite():
                return None
            with decimal.localcontext() as ctx:
                ctx.prec = 80
                d = d.quantize(decimal.Decimal(1).scaleb(-scale), rounding=decimal.ROUND_HALF_UP)
        except (decimal.InvalidOperation, ValueError, TypeError):
            return None
        return d if len(d.as_tuple().digits) - max(-d.as_tuple().exponent, 0) <= precision - scale or d == 0 else None
    if base == "boolean":
        if isinstance(v, (bool, np.bool_)):
            return bool(v)
        if isinstance(v, (int, float, np.integer, np.floating)):
            return bool(v != 0)
        s = str(v).strip().lower()
        return True if s in ("t", "true", "y", "yes", "1") else False if s in ("f", "false", "n", "no", "0") else None
    if base == "date":
        if isinstance(v, _dt.datetime):
            return v.date()
        if isinstance(v, _dt.date):
            return v
        ts = _timestamp(v)
        return None if ts is None else ts.date()
    if base == "timestamp":
        if isinstance(v, _dt.date) and not isinstance(v, _dt.datetime):
            return _dt.datetime(v.year, v.month, v.day)
        return _timestamp(v)
    if base == "binary":
        return bytes(v) if isinstance(v, (bytes, bytearray, memoryview)) else str(v).encode()
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v if isinstance(v, str) else as_key(v)


def pandas_values(series: "pd.Series", input_type: str | None) -> list[Any]:
    """The values as ``spark_typed`` gives them (None for null); unchanged without a type."""
    from sparkdl.etl.transforms import is_null

    if input_type is None:
        return [None if not isinstance(v, (str, bytes, list, np.ndarray)) and is_null(v) else v for v in series]
    base = _base(input_type)
    return [_one(v, base, input_type) for v in series]


def pandas_float(series: "pd.Series", input_type: str | None) -> np.ndarray:
    """float64 values as ``spark_float`` gives them (NaN for null)."""
    import pandas as pd

    if input_type is None:
        return pd.to_numeric(series, errors="coerce").astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)
    out = np.full(len(series), np.nan)
    for i, v in enumerate(pandas_values(series, input_type)):
        if v is not None and not isinstance(v, (str, bytes, _dt.date)):
            out[i] = float(v)
    return out


def key_string(v: Any, input_type: str | None) -> str:
    """A typed (non-null) value as Spark's cast to string gives it."""
    from sparkdl.etl.transforms import as_key

    base = _base(input_type)
    if base == "decimal":
        return format(v, "f")
    if base == "timestamp":
        text = v.strftime("%Y-%m-%d %H:%M:%S")
        return text + (f".{v.microsecond:06d}".rstrip("0") if v.microsecond else "")
    if base == "date":
        return v.isoformat()
    if base == "binary":
        return v.decode("utf-8", "replace")
    return as_key(v)


def pandas_lookup(values: list[Any], series: "pd.Series", input_type: str | None, first: int) -> list[int | None]:
    """``spark_lookup`` on pandas values."""
    from sparkdl.etl.transforms import as_key

    typed = pandas_values(series, input_type)
    if input_type in _FLOATS:
        ids: dict[Any, int] = {}
        for i, v in enumerate(values):
            for f in _numbers([v]):
                ids.setdefault(f + 0.0, i + first)
        return [None if v is None else ids.get(v + 0.0) for v in typed]
    keys: dict[str, int] = {}
    for i, v in enumerate(values):
        keys.setdefault(as_key(v), i + first)
    return [None if v is None else keys.get(key_string(v, input_type)) for v in typed]


def pandas_hash(series: "pd.Series", input_type: str | None, num_buckets: int) -> list[int | None]:
    """``spark_hash`` on pandas values."""
    n = int(num_buckets)
    out: list[int | None] = []
    for v in pandas_values(series, input_type):
        if v is None:
            out.append(None)
        elif input_type in _FLOATS:
            bits = struct.unpack("<q", struct.pack("<d", float(v) + 0.0))[0]
            out.append(murmur3_long(bits) % n + 1)
        else:
            out.append(zlib.crc32(key_string(v, input_type).encode()) % n + 1)
    return out


def murmur3_long(value: int, seed: int = 42) -> int:
    """Spark's ``hash`` of one long (Murmur3 x86 32-bit, as ``Murmur3_x86_32.hashLong``), signed."""

    def mix_k1(k: int) -> int:
        k = (k * 0xCC9E2D51) & _M32
        k = ((k << 15) | (k >> 17)) & _M32
        return (k * 0x1B873593) & _M32

    def mix_h1(h: int, k: int) -> int:
        h ^= k
        h = ((h << 13) | (h >> 19)) & _M32
        return (h * 5 + 0xE6546B64) & _M32

    value &= 0xFFFFFFFFFFFFFFFF
    h = mix_h1(seed & _M32, mix_k1(value & _M32))
    h = mix_h1(h, mix_k1(value >> 32))
    h ^= 8
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    h ^= h >> 16
    return h - 2**32 if h >= 2**31 else h
