"""Any Spark DataFrame to a loader: materialize it once as a Delta cache table, reuse it after.

The cache key is a SHA-256 over what determines the DataFrame's rows:

* the canonicalized optimized logical plan
  (``df._jdf.queryExecution().optimizedPlan().canonicalized().toString()``; canonicalizing
  replaces the session's expression ids, so the same query built twice hashes the same),
  printed in full: ``spark.sql.debug.maxToStringFields`` and ``spark.sql.maxPlanStringLength``
  are lifted while the key is computed, because by default Catalyst cuts field lists after 25
  entries (``... 6 more fields``) and two wide plans differing past the cut would collide;
* the schema (``df.schema.json()``);
* the input files (``df.inputFiles()``), and for local files their size and modification
  time, so rewriting a source folder in place gives a new key (the plan string names no
  paths);
* for plans over in-memory data (``createDataFrame``, RDDs, ``df.cache()``), whose plan
  string does not show the data, a fingerprint of the rows computed by Spark (count, XOR and
  modular sum of ``xxhash64`` of every row);
* the ``schema=`` passed to :func:`cache_dataframe` (its codecs and shapes are stored in the
  cache table, so the same DataFrame cached with another schema is another table).

Not covered: non-file sources whose data changes behind the same plan (JDBC tables, remote
files rewritten in place): call :meth:`CachedTable.delete` or :func:`clear_cache` to refresh.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping


from sparkdl import _fs
from sparkdl.data.config import LoaderConfig
from sparkdl.data.loader import TableLoader
from sparkdl.errors import WriteAbortedError
from sparkdl.lakehouse import join_uri, normalize_uri, snapshot, table_exists, write_table
from sparkdl.schema import DatasetSchema

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

__all__ = ["CachedTable", "cache_dataframe", "clear_cache", "dataframe_key"]

_KEY_CHARS = 32
# Leaves of a logical plan whose string form does not show their data.
_IN_MEMORY_LEAVES = ("LocalRelation", "LogicalRDD", "ExternalRDD", "InMemoryRelation")


def _fingerprint_rows(df: "DataFrame") -> str:
    from pyspark.sql import functions as F

    h = F.xxhash64(*[F.col(f"`{c}`") for c in df.columns]) if df.columns else F.lit(0).cast("long")
    row = (
        df.select(h.alias("h"))
        .agg(F.count(F.lit(1)).alias("n"), F.bit_xor("h").alias("x"), F.sum(F.pmod("h", F.lit(2147483647))).alias("s"))
        .first()
    )
    return f"rows={row['n']} xor={row['x']} sum={row['s']}"


# SQL confs that truncate plan strings; lifted while a key is computed (see the module docstring).
_UNTRUNCATED = {"spark.sql.debug.maxToStringFields": str(2**31 - 1), "spark.sql.maxPlanStringLength": str(2**31 - 16)}


def _full_plan_string(df: "DataFrame") -> str:
    conf = df.sparkSession.conf
    saved = {key: conf.get(key, None) for key in _UNTRUNCATED}
    try:
        for key, value in _UNTRUNCATED.items():
            conf.set(key, value)
        text = df._jdf.queryExecution().optimizedPlan().canonicalized().toString()
    finally:
        for key, value in saved.items():
            if value is None:
                conf.unset(key)
            else:
                conf.set(key, value)
    return text


def dataframe_key(df: "DataFrame", schema: DatasetSchema | None = None) -> str:
    """The cache key of ``df`` cached with ``schema`` (see the module docstring for what it covers)."""
    plan = _full_plan_string(df)
    parts = [plan, df.schema.json()]
    if schema is not None:
        parts.append("schema=" + json.dumps(schema.to_dict(), sort_keys=True, default=str))
    for f in sorted(df.inputFiles()):
        local = _fs.local_path(f)
        if local is not None and os.path.exists(local):
            st = os.stat(local)
            parts.append(f"{f} size={st.st_size} mtime={st.st_mtime_ns}")
        else:
            parts.append(f)
    if any(leaf in plan for leaf in _IN_MEMORY_LEAVES):
        parts.append(_fingerprint_rows(df))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:_KEY_CHARS]


@dataclass(frozen=True)
class CachedTable:
    """A DataFrame materialized as a Delta table under the cache root."""

    uri: str
    """The cache table's URI: ``<cache_root>/<key>``."""
    version: int
    """The Delta version holding the materialized rows."""
    key: str
    """Hash of the DataFrame's plan, schema and inputs."""
    reused: bool
    """True when an earlier ``cache_dataframe`` of the same DataFrame had written it."""
    num_rows: int | None = None
    """Rows written (None when reused or unknown)."""
    storage_options: Mapping[str, str] | None = field(default=None, repr=False)
    """Passed on to the loaders (deltalake options of the cache root's store)."""

    def loader(
        self, rank: int = 0, world_size: int = 1, config: LoaderConfig | None = None, **kwargs: Any
    ) -> TableLoader:
        """A :class:`TableLoader` over this cache table's version (extra keywords go to it)."""
        kwargs.setdefault("storage_options", self.storage_options)
        return TableLoader(self.uri, version=self.version, rank=rank, world_size=world_size, config=config, **kwargs)

    def delete(self) -> None:
        """Remove the cache table (its log and files); idempotent."""
        _fs.delete(self.uri)

    def __enter__(self) -> "CachedTable":
        return self

    def __exit__(self, *exc: Any) -> None:
        """``with cache_dataframe(...) as cached:`` deletes the cache table when the block ends."""
        self.delete()


def cache_dataframe(
    df: "DataFrame",
    *,
    cache_root: str,
    storage_options: Mapping[str, str] | None = None,
    schema: DatasetSchema | None = None,
) -> CachedTable:
    """Materialize ``df`` under ``cache_root`` once; later calls with the same DataFrame reuse it.

    ``schema`` (optional) is validated and stored as column metadata, so the loaders decode
    images and tensor shapes by it.
    """
    if not cache_root:
        raise ValueError("cache_root must name a folder, e.g. Lakehouse(root).cache()")
    key = dataframe_key(df, schema)
    uri = join_uri(normalize_uri(cache_root), key)
    if table_exists(uri, storage_options):
        return CachedTable(uri=uri, version=snapshot(uri, storage_options=storage_options).version, key=key,
                           reused=True, storage_options=storage_options)
    try:
        result = write_table(
            df, uri, mode="error", schema=schema, storage_options=storage_options,
            commit_metadata={"sparkdl.cache_key": key}, description="sparkdl DataFrame cache",
        )
    except (ValueError, WriteAbortedError):
        # A concurrent cache_dataframe of the same DataFrame committed first: use its table.
        if table_exists(uri, storage_options):
            return CachedTable(uri=uri, version=snapshot(uri, storage_options=storage_options).version, key=key,
                               reused=True, storage_options=storage_options)
        raise
    return CachedTable(uri=uri, version=result.version, key=key, reused=False, num_rows=result.num_rows,
                       storage_options=storage_options)


def clear_cache(cache_root: str) -> int:
    """Delete every cache table under ``cache_root``; returns how many were removed.

    Only folders named like a cache key are touched, so a mistaken ``cache_root`` cannot
    wipe unrelated data.
    """
    root = normalize_uri(cache_root)
    removed = 0
    for name in _fs.listdir(root):
        child = _fs.join(root, name)
        if _is_key(name) and _fs.is_dir(child):
            _fs.delete(child)
            removed += 1
    return removed


def _is_key(name: str) -> bool:
    return len(name) == _KEY_CHARS and all(c in "0123456789abcdef" for c in name)
