"""The preprocessing spec: what the ETL learned from the training split, to encode any rows alike.

A ``PreprocessingSpec`` holds the fitted transforms of one dataset (statistics, quantile
boundaries, vocabularies, image statistics: all computed on the training split only), the
label rule, the id and weight columns, and encodes raw rows in Spark (``encode``, batch
inference and the ETL itself) or in pandas (``encode_pandas``, in-process inference) with the
same rules (``sparkdl.etl.transforms``; exact semantics in docs/preprocessing.md).

The spec is saved next to the tables (``<lakehouse>/specs/<dataset>/<sha256[:16]>.json``,
named by its content, so a file is never replaced; ``save_spec``) and its path and SHA-256 are
recorded in the commits of the tables it encoded, so ``load_spec_for_table`` recovers exactly
the spec of any table version. Specs written before format 2 (``numeric``/``categorical``
keys) still load.

The ``fit_*`` functions are the map/reduce analyzer passes (``sparkdl.etl.analyzers``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from sparkdl.errors import MissingColumnsError, NoSpecRecordedError, SpecIntegrityError, TableVersionError

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import DataFrame

    from sparkdl.schema import ColumnSpec

__all__ = [
    "PreprocessingSpec",
    "fit_vocabularies",
    "fit_statistics",
    "load_spec_for_table",
    "save_spec",
    "spec_commit_metadata",
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
SPEC_FORMAT = 2
_NUMERIC = ("standardize", "minmax", "numeric")
_CATEGORICAL = ("bucketize", "vocabulary", "hash")


@dataclass(kw_only=True)
class PreprocessingSpec:
    """The fitted transforms of one dataset, and the encoding they define."""

    dataset: str
    """Dataset name, e.g. ``flights``."""
    transforms: list[dict[str, Any]] = field(default_factory=list)
    """Fitted transforms in output order: ``{"type", "input", "output", ...fitted values}``
    (types and values: docs/preprocessing.md)."""
    label: dict[str, Any] = field(default_factory=dict)
    """``{"column", "source", "task", ...}``: how the label is derived from its source column
    (threshold/op or positive for binary, classes or num_classes for multiclass, classes and
    separator for multilabel). Empty when the dataset has no label rule."""
    id_column: str | None = None
    """Row key carried through encoding unchanged (None: no id column)."""
    weight_column: str | None = None
    """Sample-weight column carried through encoding as float32 (None: unweighted)."""
    source: dict[str, Any] = field(default_factory=dict)
    """Where the statistics came from: input tables, row counts, settings."""
    format: int = SPEC_FORMAT
    """Spec file format version."""

    def __post_init__(self) -> None:
        from sparkdl.etl.config import TASKS, TRANSFORMS

        if not self.dataset:
            raise ValueError("dataset must be a non-empty name, e.g. 'flights'")
        for i, t in enumerate(self.transforms):
            missing = [k for k in ("type", "input", "output") if k not in t]
            if missing:
                raise ValueError(f"transforms[{i}] lacks keys {missing}; give type, input and output")
            if t["type"] not in TRANSFORMS:
                raise ValueError(f"transforms[{i}] ({t['output']!r}): type {t['type']!r} is not one of {list(TRANSFORMS)}")
            need = {"standardize": ("mean", "std"), "minmax": ("min", "max"), "numeric": ("fill",),
                    "bucketize": ("boundaries",), "vocabulary": ("vocab",), "hash": ("num_buckets",),
                    "tokens": ("vocab", "length"), "image": ("shape", "codec")}[t["type"]]
            missing = [k for k in need if k not in t]
            if missing:
                raise ValueError(f"transforms[{i}] ({t['output']!r}) lacks keys {missing}")
            for k in ("mean", "std", "min", "max"):
                if k in t and not isinstance(t[k], list) and not math.isfinite(t[k]):
                    raise ValueError(f"transforms[{i}] ({t['output']!r}): {k}={t[k]} must be finite; was the "
                                     "column empty in the training split?")
            if "vocab" in t and len(set(t["vocab"])) != len(t["vocab"]):
                raise ValueError(f"transforms[{i}] ({t['output']!r}): vocab has repeated values")
        if self.label:
            missing = [k for k in ("column", "source", "task") if k not in self.label]
            if missing:
                raise ValueError(f"label lacks keys {missing}; give column, source and task")
            if self.label["task"] not in TASKS:
                raise ValueError(f"label task {self.label['task']!r} is not one of {list(TASKS)}")
        outputs = self.outputs
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
        if "numeric" in data or "categorical" in data:
            data = _from_format_1(data)
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
    def outputs(self) -> list[str]:
        """Encoded columns: id, features, label, weight."""
        return ([self.id_column] if self.id_column else []) + self.features + (
            [self.label["column"]] if self.label else []) + ([self.weight_column] if self.weight_column else [])

    @property
    def features(self) -> list[str]:
        """Encoded feature columns, in order."""
        return [t["output"] for t in self.transforms]

    @property
    def numeric_features(self) -> list[str]:
        return [t["output"] for t in self.transforms if t["type"] in _NUMERIC]

    @property
    def categorical_features(self) -> list[str]:
        return [t["output"] for t in self.transforms if t["type"] in _CATEGORICAL]

    @property
    def cardinalities(self) -> dict[str, int]:
        """Output column -> number of ids (OOV and padding included) of categorical and tokens features."""
        return {c.name: c.cardinality for c in self.columns() if c.cardinality is not None and c.role == "feature"}

    @property
    def raw_columns(self) -> list[str]:
        """Raw columns ``encode`` needs (the label source and weight are optional)."""
        return list(dict.fromkeys(t["input"] for t in self.transforms))

    def transform(self, output: str) -> dict[str, Any]:
        for t in self.transforms:
            if t["output"] == output:
                return t
        raise KeyError(f"the {self.dataset} spec has no feature {output!r}; features: {self.features}")

    def columns(self, id_type: str = "int64") -> list["ColumnSpec"]:
        """Declarations of the encoded columns (role, kind, cardinality, shape, codec), in order."""
        from sparkdl.etl.transforms import column_spec, label_column_spec
        from sparkdl.schema import ColumnSpec

        cols = []
        if self.id_column:
            cols.append(ColumnSpec(name=self.id_column, type=id_type, role="id", nullable=False, description="row key"))
        cols += [column_spec(t) for t in self.transforms]
        if self.label:
            cols.append(label_column_spec(self.label))
        if self.weight_column:
            cols.append(ColumnSpec(name=self.weight_column, type="float32", role="weight", nullable=False,
                                   description="sample weight"))
        return cols

    def _check_columns(self, columns: Iterable[str]) -> None:
        present = list(columns)
        missing = [c for c in self.raw_columns if c not in present]
        if missing:
            raise MissingColumnsError(f"the {self.dataset} preprocessing spec", missing, present)

    # ----- encoding -----
    def encode(self, df: "DataFrame") -> "DataFrame":
        """``df`` plus the encoded columns (features; the label when its source column is
        present; the weight as float32 when present). Other columns are kept."""
        from pyspark.sql import functions as F

        from sparkdl.etl.transforms import spark_feature, spark_label

        self._check_columns(df.columns)
        out: dict[str, Any] = {t["output"]: spark_feature(t, F.col(t["input"])) for t in self.transforms}
        if self.label and self.label["source"] in df.columns:
            out[self.label["column"]] = spark_label(self.label, F.col(self.label["source"]))
        if self.weight_column and self.weight_column in df.columns:
            out[self.weight_column] = F.col(self.weight_column).try_cast("double").cast("float")
        return df.withColumns(out) if out else df  # Connect refuses an empty withColumns

    def encode_pandas(self, pdf: "pd.DataFrame") -> "pd.DataFrame":
        """Same encoding as ``encode``, on a pandas DataFrame (returns a new frame)."""
        import numpy as np

        from sparkdl.etl.transforms import pandas_feature, pandas_label

        self._check_columns(pdf.columns)
        out = pdf.copy()
        for t in self.transforms:
            out[t["output"]] = pandas_feature(t, pdf[t["input"]])
        if self.label and self.label["source"] in pdf.columns:
            out[self.label["column"]] = pandas_label(self.label, pdf[self.label["source"]])
        if self.weight_column and self.weight_column in pdf.columns:
            import pandas as pd

            out[self.weight_column] = pd.to_numeric(pdf[self.weight_column], errors="coerce").astype(np.float32)
        return out


def _from_format_1(data: dict[str, Any]) -> dict[str, Any]:
    """A spec written before format 2 (numeric z-scores, categorical vocabularies, label = source > threshold)."""
    data = dict(data)
    transforms = [{"type": "standardize", "input": c, "output": st["output"], "mean": st["mean"], "std": st["std"]}
                  for c, st in data.pop("numeric", {}).items()]
    transforms += [{"type": "vocabulary", "input": c, "output": v["output"], "vocab": v["vocab"],
                    "min_count": v.get("min_count", 1), "top_k": None} for c, v in data.pop("categorical", {}).items()]
    data["transforms"] = transforms
    if data.get("label"):
        data["label"] = {**data["label"], "task": "binary", "op": ">"}
    data.setdefault("id_column", "flight_id")  # format 1's default
    data["format"] = 1
    return data


def spec_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def fit_vocabularies(df: "DataFrame", columns: list[str], *, min_count: int) -> dict[str, list[str]]:
    """Vocabulary of each column: non-null values (as strings) seen at least ``min_count``
    times, most frequent first (ties by value), in one map/reduce pass
    (``sparkdl.etl.analyzers.fit_vocabularies`` does the same for many settings at once)."""
    from sparkdl.etl.analyzers import VocabRequest, fit_vocabularies as _fit

    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")
    return _fit(df, [VocabRequest(name=c, input=c, min_count=min_count) for c in columns])


def fit_statistics(df: "DataFrame", columns: list[str]) -> dict[str, dict[str, float]]:
    """Count, mean, population std (ddof=0), min and max of each numeric column over its
    non-null, non-NaN values, in one reduce (``sparkdl.etl.analyzers.fit_numeric``)."""
    from sparkdl.etl.analyzers import fit_numeric

    stats = fit_numeric(df, columns, quantiles={}).columns
    empty = [c for c in columns if stats[c]["count"] == 0]
    if empty:
        raise ValueError(f"column {empty[0]!r} has no non-null values in the training rows; drop it from the "
                         "numeric features or check the input")
    return stats


def save_spec(spec: PreprocessingSpec, lakehouse: str) -> tuple[str, str]:
    """Save the spec as ``<lakehouse>/specs/<dataset>/<sha256[:16]>.json``; returns (URI, SHA-256).

    A file of that name already holds exactly this text, so it is never replaced: a table
    version that records a spec keeps finding the same bytes, whatever later runs write."""
    from sparkdl import _fs
    from sparkdl.lakehouse import Lakehouse, join_uri

    sha = spec_sha256(spec.to_json())
    path = join_uri(Lakehouse(lakehouse).spec_dir(spec.dataset), f"{sha[:16]}.json")
    if not _fs.exists(path):
        spec.save(path)
    elif spec_sha256(_fs.read_text(path)) != sha:
        raise RuntimeError(
            f"spec file {path} exists with other content than its name says (sha256 {sha[:16]}…); it was "
            "edited by hand: move it away and re-run the ETL"
        )
    return path, sha


def spec_commit_metadata(spec_path: str, sha: str, dataset: str) -> dict[str, str]:
    """Commit-metadata keys linking a table version to its spec file (absolute and relative to
    the table root ``<lakehouse>/tables/<name>``)."""
    return {
        SPEC_PATH_KEY: spec_path,
        SPEC_RELPATH_KEY: f"../../specs/{dataset}/{spec_path.rsplit('/', 1)[-1]}",
        SPEC_SHA_KEY: sha,
    }


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
                    raise SpecIntegrityError(
                        f"the spec file {path} of table {uri} v{entry['version']} was changed after the commit "
                        f"(sha256 {spec_sha256(text)}, recorded {want}); re-run the ETL to rebuild spec and tables"
                    )
                try:
                    return PreprocessingSpec.from_json(text)
                except (ValueError, TypeError) as e:
                    raise SpecIntegrityError(
                        f"the spec file {path} of table {uri} v{entry['version']} is not a valid spec ({e}); "
                        "re-run the ETL to rebuild spec and tables") from e
            raise FileNotFoundError(
                f"table {uri} v{entry['version']} names a preprocessing spec that cannot be read "
                f"({'; '.join(errors)}); restore the specs/ folder of the lakehouse or re-run the ETL"
            )
        if _resets_table(entry):
            break
    raise NoSpecRecordedError(
        f"version {target} of table {uri} records no preprocessing spec in its commit metadata "
        f"(key {SPEC_PATH_KEY!r}); write the table with the ETL (sparkdl.etl) or load the spec file directly"
    )
