# Frozen copy of sparkdl/preprocess.py at commit 8c1163e, used by legacy_flights_etl.py in
# benchmarks/bench_etl.py only.
"""The preprocessing spec: what the ETL learned from the training split, to encode any rows alike.

A ``PreprocessingSpec`` holds the numeric statistics (mean, population std) and categorical
vocabularies computed on the training split only, and knows how to turn raw feature columns
into model inputs, in Spark (``encode``) or in pandas (``encode_pandas``). The ETL encodes its
own tables with ``encode``, so training, batch inference and in-process inference share one
encoding:

- numeric ``<col>`` -> ``<col>_z`` = (value - mean) / std as float32; a null (or a non-finite
  result) becomes 0.0, the training mean. A std of 0 divides by 1.
- categorical ``<col>`` -> ``<col>_id`` int32 = 1 + index of the value (as a string) in the
  vocabulary; 0 for values outside it (rare or unseen) and for nulls.
- label (when its source column is present) = 1 if source > threshold else 0, int32.

The spec is written next to the tables (``<lakehouse>/specs/<dataset>/<sha256[:16]>.json``,
named by its content, so a file is never replaced; lakehouses written before used
``v<N>.json``) and its path and SHA-256 are recorded in the commits of the tables it encoded,
so ``load_spec_for_table`` recovers exactly the spec of any table version, whichever name it has.

The ``fit_*`` functions are the map/reduce passes that compute it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from sparkdl.errors import MissingColumnsError, TableVersionError

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import DataFrame

__all__ = [
    "PreprocessingSpec",
    "fit_vocabularies",
    "fit_statistics",
    "load_spec_for_table",
    "spec_sha256",
    "SPEC_PATH_KEY",
    "SPEC_RELPATH_KEY",
    "SPEC_SHA_KEY",
]

SPEC_PATH_KEY = "sparkdl.spec_path"
"""Commit-metadata key holding the spec's absolute URI."""
SPEC_RELPATH_KEY = "sparkdl.spec_relpath"
"""Commit-metadata key holding the spec's path relative to the table root (survives moving the lakehouse)."""
SPEC_SHA_KEY = "sparkdl.spec_sha256"
"""Commit-metadata key holding the SHA-256 of the spec file's text."""


@dataclass(kw_only=True)
class PreprocessingSpec:
    """Vocabularies and statistics of one dataset, and the encoding they define."""

    dataset: str
    """Dataset name, e.g. ``flights``."""
    label: dict[str, Any] = field(default_factory=dict)
    """``{"column": "label", "source": "arr_delay", "threshold": 15.0}``: label = source > threshold.
    Empty when the dataset has no derived label."""
    numeric: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Raw column -> ``{"mean": float, "std": float, "output": "<col>_z"}``, in feature order."""
    categorical: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Raw column -> ``{"vocab": [str, ...], "min_count": int, "output": "<col>_id"}``; id = 1 + index, 0 = OOV/null."""
    id_column: str = "flight_id"
    """Row key carried through encoding unchanged."""
    source: dict[str, Any] = field(default_factory=dict)
    """Where the statistics came from: input tables/versions, row counts, settings."""

    def __post_init__(self) -> None:
        if not self.dataset:
            raise ValueError("dataset must be a non-empty name, e.g. 'flights'")
        for col, st in self.numeric.items():
            missing = [k for k in ("mean", "std", "output") if k not in st]
            if missing:
                raise ValueError(f"numeric[{col!r}] lacks keys {missing}; give mean, std and output")
            if not (math.isfinite(st["mean"]) and math.isfinite(st["std"]) and st["std"] >= 0):
                raise ValueError(
                    f"numeric[{col!r}]: mean={st['mean']} and std={st['std']} must be finite with std >= 0; "
                    "was the column empty in the training split?"
                )
        for col, cat in self.categorical.items():
            missing = [k for k in ("vocab", "output") if k not in cat]
            if missing:
                raise ValueError(f"categorical[{col!r}] lacks keys {missing}; give vocab and output")
            if len(set(cat["vocab"])) != len(cat["vocab"]):
                raise ValueError(f"categorical[{col!r}]: vocab has repeated values; each value must appear once")
        if self.label:
            missing = [k for k in ("column", "source", "threshold") if k not in self.label]
            if missing:
                raise ValueError(f"label lacks keys {missing}; give column, source and threshold")
        outputs = self.numeric_features + self.categorical_features + ([self.label["column"]] if self.label else [])
        dupes = sorted({o for o in outputs if outputs.count(o) > 1})
        if dupes:
            raise ValueError(f"output columns {dupes} are produced more than once; give each feature its own output")

    # ----- serialization -----
    def to_json(self) -> str:
        """Deterministic JSON (same spec -> same text -> same SHA-256)."""
        return json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "PreprocessingSpec":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"preprocessing spec is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ValueError("preprocessing spec must be a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"preprocessing spec has unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write the spec atomically; returns the SHA-256 of the written text."""
        text = self.to_json()
        _write_text(os.fspath(path), text)
        return spec_sha256(text)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "PreprocessingSpec":
        return cls.from_json(_read_text(os.fspath(path)))

    # ----- views -----
    @property
    def numeric_features(self) -> list[str]:
        return [st["output"] for st in self.numeric.values()]

    @property
    def categorical_features(self) -> list[str]:
        return [cat["output"] for cat in self.categorical.values()]

    @property
    def cardinalities(self) -> dict[str, int]:
        """Output column -> number of ids (vocabulary size + 1 for OOV), for embedding tables."""
        return {cat["output"]: len(cat["vocab"]) + 1 for cat in self.categorical.values()}

    @property
    def raw_columns(self) -> list[str]:
        """Raw columns ``encode`` needs (the label source is optional)."""
        return list(self.numeric) + list(self.categorical)

    def _check_columns(self, columns: Iterable[str]) -> None:
        present = list(columns)
        missing = [c for c in self.raw_columns if c not in present]
        if missing:
            raise MissingColumnsError(f"the {self.dataset} preprocessing spec", missing, present)

    # ----- encoding -----
    def encode(self, df: "DataFrame") -> "DataFrame":
        """``df`` plus the encoded columns (numeric outputs, categorical outputs, and the label
        when its source column is present). Other columns are kept."""
        from pyspark.sql import functions as F

        self._check_columns(df.columns)
        out: dict[str, Any] = {}
        for col, st in self.numeric.items():
            std = st["std"] if st["std"] > 0 else 1.0
            z = (F.col(col).try_cast("double") - F.lit(float(st["mean"]))) / F.lit(float(std))
            # isnan catches NaN inputs; nulls fall through to the coalesce.
            out[st["output"]] = F.coalesce(F.when(~F.isnan(z), z), F.lit(0.0)).cast("float")
        for col, cat in self.categorical.items():
            key = F.col(col).cast("string")
            if cat["vocab"]:
                ids = F.create_map(*[x for i, v in enumerate(cat["vocab"]) for x in (F.lit(v), F.lit(i + 1))])
                # try_element_at: a missing key gives null (OOV) rather than an error under ANSI mode.
                looked_up = F.when(key.isNotNull(), F.try_element_at(ids, key))
                out[cat["output"]] = F.coalesce(looked_up, F.lit(0)).cast("int")
            else:
                out[cat["output"]] = F.lit(0).cast("int")
        if self.label and self.label["source"] in df.columns:
            src = F.col(self.label["source"]).try_cast("double")
            out[self.label["column"]] = (src > F.lit(float(self.label["threshold"]))).cast("int")
        return df.withColumns(out)

    def encode_pandas(self, pdf: "pd.DataFrame") -> "pd.DataFrame":
        """Same encoding as ``encode``, on a pandas DataFrame (returns a new frame)."""
        import numpy as np

        self._check_columns(pdf.columns)
        out = pdf.copy()
        for col, st in self.numeric.items():
            std = st["std"] if st["std"] > 0 else 1.0
            values = _float_array(pdf[col])
            z = (values - float(st["mean"])) / float(std)
            out[st["output"]] = np.where(np.isnan(z), 0.0, z).astype(np.float32)
        for col, cat in self.categorical.items():
            ids = {v: i + 1 for i, v in enumerate(cat["vocab"])}
            values = pdf[col]
            mapped = [0 if _is_null(v) else ids.get(_as_key(v), 0) for v in values]
            out[cat["output"]] = np.asarray(mapped, dtype=np.int32)
        if self.label and self.label["source"] in pdf.columns:
            import pandas as pd

            src = _float_array(pdf[self.label["source"]])
            label = (src > float(self.label["threshold"])).astype(np.int32)
            nulls = np.isnan(src)
            # Spark gives a null label for a null source; pandas needs a nullable dtype for that.
            out[self.label["column"]] = pd.array(np.where(nulls, 0, label), dtype="Int32") if nulls.any() else label
            if nulls.any():
                out.loc[nulls, self.label["column"]] = pd.NA
        return out


def _float_array(series: "pd.Series"):
    import numpy as np
    import pandas as pd

    return pd.to_numeric(series, errors="coerce").astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)


def _is_null(v: Any) -> bool:
    if v is None:
        return True
    try:
        return bool(v != v)  # NaN and pandas NA
    except TypeError:
        return False


def _as_key(v: Any) -> str:
    # Spark casts integral values to "7", not "7.0"; match it for values pandas holds as floats.
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, bytes):
        return v.decode()
    return str(v)


def spec_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------------------
# Fitting: map/reduce passes over the training split
# ---------------------------------------------------------------------------------------
def fit_vocabularies(df: "DataFrame", columns: list[str], *, min_count: int) -> dict[str, list[str]]:
    """Vocabulary of each column: non-null values (as strings) seen at least ``min_count``
    times, most frequent first (ties by value), counted in one map/reduce pass.

    Map: every row emits one (column, value) pair per column; combine and reduce: Spark's
    partial then final count per pair across one shuffle.
    """
    from pyspark.sql import functions as F

    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")
    if not columns:
        return {}
    pairs = df.select(
        F.explode(
            F.array(*[F.struct(F.lit(c).alias("column"), F.col(c).cast("string").alias("value")) for c in columns])
        ).alias("p")
    ).select("p.column", "p.value")
    counts = (
        pairs.where(F.col("value").isNotNull())
        .groupBy("column", "value")
        .count()
        .where(F.col("count") >= min_count)
        .collect()
    )
    vocab: dict[str, list[tuple[int, str]]] = {c: [] for c in columns}
    for row in counts:
        vocab[row["column"]].append((-int(row["count"]), row["value"]))
    return {c: [v for _, v in sorted(pairs_)] for c, pairs_ in vocab.items()}


def fit_statistics(df: "DataFrame", columns: list[str]) -> dict[str, dict[str, float]]:
    """Count, mean and population std (ddof=0) of each numeric column over its non-null,
    non-NaN values, in one reduce: every partition folds its rows into partial moments, the
    partials merge pairwise (Spark's central-moment aggregates, numerically stable)."""
    from pyspark.sql import functions as F

    if not columns:
        return {}
    aggs = []
    for i, c in enumerate(columns):
        x = F.col(c).try_cast("double")
        x = F.when(~F.isnan(x), x)
        aggs += [F.count(x).alias(f"n{i}"), F.avg(x).alias(f"m{i}"), F.stddev_pop(x).alias(f"s{i}")]
    row = df.agg(*aggs).first()
    out = {}
    for i, c in enumerate(columns):
        n = int(row[f"n{i}"])
        if n == 0:
            raise ValueError(
                f"column {c!r} has no non-null values in the training rows; drop it from the numeric "
                "features or check the input"
            )
        out[c] = {"count": n, "mean": float(row[f"m{i}"]), "std": float(row[f"s{i}"] or 0.0)}
    return out


# ---------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------
def _write_text(uri: str, text: str) -> None:
    from sparkdl import _fs

    _fs.write_text(uri, text)  # atomic: readers see the old file or the whole new one


def _read_text(uri: str) -> str:
    from sparkdl import _fs

    return _fs.read_text(uri)


def _resets_table(entry: Mapping[str, Any]) -> bool:
    """Whether a history entry replaced the table's contents (so older specs no longer apply)."""
    if entry.get("sparkdl.mode") in ("overwrite", "error"):
        return True
    op = str(entry.get("operation", "")).upper()
    mode = str((entry.get("operationParameters") or {}).get("mode", "")).lower()
    return op.startswith("CREATE") or mode == "overwrite"


def load_spec_for_table(table_uri: str, version: int | None = None) -> PreprocessingSpec:
    """The spec that encoded ``version`` (default latest) of the table at ``table_uri``,
    found through the commit metadata the ETL wrote; its SHA-256 is checked."""
    from sparkdl.lakehouse import _open, join_uri, normalize_uri

    uri = normalize_uri(table_uri)
    dt = _open(uri, None, None)
    latest = dt.version()
    target = latest if version is None else version
    if target < 0 or target > latest:
        raise TableVersionError(f"table {uri} has no version {target}; it has versions 0..{latest}")
    history = sorted(
        (e for e in dt.history() if int(e.get("version", -1)) <= target), key=lambda e: -int(e["version"])
    )
    for entry in history:
        if SPEC_PATH_KEY in entry:
            candidates = [entry[SPEC_PATH_KEY]]
            if SPEC_RELPATH_KEY in entry:
                candidates.append(normalize_uri(join_uri(uri, entry[SPEC_RELPATH_KEY])))
            errors = []
            for path in candidates:
                try:
                    text = _read_text(path)
                except (FileNotFoundError, OSError) as e:
                    errors.append(f"{path}: {e}")
                    continue
                want = entry.get(SPEC_SHA_KEY)
                if want and spec_sha256(text) != want:
                    raise ValueError(
                        f"the spec file {path} of table {uri} v{entry['version']} was changed after the commit "
                        f"(sha256 {spec_sha256(text)}, recorded {want}); re-run the ETL to rebuild spec and tables"
                    )
                return PreprocessingSpec.from_json(text)
            raise FileNotFoundError(
                f"table {uri} v{entry['version']} names a preprocessing spec that cannot be read "
                f"({'; '.join(errors)}); restore the specs/ folder of the lakehouse or re-run the ETL"
            )
        if _resets_table(entry):
            break
    raise ValueError(
        f"version {target} of table {uri} records no preprocessing spec in its commit metadata "
        f"(key {SPEC_PATH_KEY!r}); write the table with the ETL (sparkdl.etl) or load the spec file directly"
    )
