"""Delta tables in the lakehouse: Spark writes the Parquet files, the driver commits them.

Executors write Parquet files in parallel into a fresh folder under the table root
(``<table>/w-<time>-<txn>/``); the driver lists them through Spark's Hadoop filesystem
and commits them with deltalake's transaction API as one Delta commit. Until that commit
the files are invisible to every Delta reader. On any failure the driver sees before the
commit, the folder is deleted and the table stays at its previous version; a failure after
the commit never deletes the committed files. A driver killed mid-write leaves its folder
behind (invisible to readers): ``cleanup_staging`` removes such folders.

Defaults chosen for streaming into training (see docs/architecture.md):
``target_file_mb=128``, an upper bound per file of about 128 MiB of *uncompressed* data
(estimated from the column types; compressed files come out smaller, and a DataFrame with
many small partitions gives as many small files: repartition or coalesce it to control that)
and ``row_group_mb=8`` (a row group is the loader's unit of sharding and shuffling: 8 MiB keeps
hundreds of groups in a large table, so ranks split evenly and shuffles mix well, while each
read stays large enough to be efficient).
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import unquote, urlparse

import pyarrow as pa

from sparkdl import _delta_commit as _dc
from sparkdl import _fs
from sparkdl._delta_commit import STAGING_KEY
from sparkdl.errors import (
    CommitConflictError,
    SchemaMismatchError,
    TableNotFoundError,
    TableVersionError,
    UnsupportedTableFeatureError,
    WriteAbortedError,
)
from sparkdl.schema import DatasetSchema, spark_to_arrow_schema
from sparkdl.session import driver_session, on_storage

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

__all__ = [
    "Lakehouse",
    "TableSnapshot",
    "WriteResult",
    "write_table",
    "read_table",
    "snapshot",
    "table_exists",
    "table_version",
    "delta_uri",
    "normalize_uri",
    "join_uri",
    "cleanup_staging",
    "check_name",
    "table_uri",
    "STAGING_KEY",
]

WRITE_MODES = ("error", "append", "overwrite")
STAGING_PREFIX = "w-"
"""Folder-name prefix of each write's files under the table root: ``w-<UTC time>-<txn>/``."""


# ---------------------------------------------------------------------------------------
# URIs
# ---------------------------------------------------------------------------------------
def normalize_uri(uri: str | os.PathLike[str]) -> str:
    """Absolute local path for plain paths and ``file://`` URIs; other schemes unchanged."""
    text = os.fspath(uri)
    parsed = urlparse(text)
    if parsed.scheme in ("", "file"):
        path = unquote(parsed.path) if parsed.scheme == "file" else text
        return str(Path(path).expanduser().resolve())
    return text.rstrip("/")


def delta_uri(uri: str) -> str:
    """The URI deltalake (object_store) understands: ``s3a://``/``s3n://`` become ``s3://``."""
    return _fs.pyarrow_uri(normalize_uri(uri))


_is_local = _fs.is_local
join_uri = _fs.join


# ---------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TableSnapshot:
    """One version of a Delta table, as a loader or a reader needs it."""

    uri: str
    """Table root."""
    version: int
    """The resolved Delta version."""
    files: list[str]
    """Absolute URIs of the Parquet files of this version."""
    partition_values: list[dict[str, str | None]]
    """Partition values of each file, in the order of ``files``."""
    schema: pa.Schema
    """Arrow schema of the table, with sparkdl column metadata when it was written by sparkdl."""
    partition_columns: list[str] = field(default_factory=list)
    """Partition columns (stored in paths and the log, not inside the files)."""
    num_rows: int | None = None
    """Row count from the commit statistics, when every file has them."""

    @property
    def dataset_schema(self) -> DatasetSchema:
        return DatasetSchema.from_arrow(self.schema, name=Path(self.uri).name)


def _open(uri: str, version: int | None, storage_options: Mapping[str, str] | None):
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError as _DeltaNotFound

    target = delta_uri(uri)
    try:
        dt = DeltaTable(target, storage_options=dict(storage_options or {}))
    except _DeltaNotFound as e:
        raise TableNotFoundError(
            f"no Delta table at {uri}: check the path, or run the ETL job that writes it first"
        ) from e
    if version is not None:
        latest = dt.version()
        if version < 0 or version > latest:
            raise TableVersionError(
                f"table {uri} has no version {version}; it has versions 0..{latest}"
                " (older ones may have been vacuumed)"
            )
        try:
            dt.load_as_version(version)
        except Exception as e:  # deltalake raises its own errors for vacuumed logs
            raise TableVersionError(f"table {uri}: version {version} cannot be loaded: {e}") from e
    return dt


def table_exists(uri: str, storage_options: Mapping[str, str] | None = None) -> bool:
    try:
        _open(uri, None, storage_options)
    except TableNotFoundError:
        return False
    return True


def table_version(uri: str, storage_options: Mapping[str, str] | None = None) -> int:
    """Latest version of the table at ``uri``."""
    return _open(uri, None, storage_options).version()


# Reader features that leave the Parquet files of a version readable as they are; the two
# handled below need more than that, and any other one is refused rather than misread.
_PLAIN_READER_FEATURES = {"timestampNtz", "v2Checkpoint", "vacuumProtocolCheck"}


def _check_readable(dt, uri: str) -> None:
    """Refuse a table whose files alone would give wrong rows or names (sparkdl reads Parquet files
    whole and by column name, for the loader and for ``read_table``)."""
    mode = (dt.metadata().configuration or {}).get("delta.columnMapping.mode", "none")
    if mode != "none":
        raise UnsupportedTableFeatureError(
            f"table {uri} uses the Delta table feature 'columnMapping' (delta.columnMapping.mode={mode}): "
            "its Parquet files name columns by physical ids that sparkdl does not map; copy it to a table "
            "without column mapping (CREATE TABLE ... USING delta AS SELECT * FROM ...) or read it with delta-spark"
        )
    features = set(dt.protocol().reader_features or [])
    if "deletionVectors" in features:
        deleted = pa.table(dt.deletion_vectors()).num_rows
        if deleted:
            raise UnsupportedTableFeatureError(
                f"table {uri} version {dt.version()} has rows deleted through the Delta table feature "
                f"'deletionVectors' ({deleted} files carry deletion vectors), and sparkdl would read those "
                f"rows back; purge them with delta-spark (REORG TABLE delta.`{uri}` APPLY (PURGE), or ALTER "
                "TABLE ... DROP FEATURE deletionVectors) and read the new version"
            )
    unknown = sorted(features - _PLAIN_READER_FEATURES - {"deletionVectors", "columnMapping"})
    if unknown:
        raise UnsupportedTableFeatureError(
            f"table {uri} uses the Delta reader features {unknown}, which sparkdl does not read; "
            "rewrite the table without them or read it with delta-spark"
        )


def snapshot(
    uri: str, version: int | None = None, *, storage_options: Mapping[str, str] | None = None
) -> TableSnapshot:
    """Resolve ``version`` (default latest) of the table at ``uri`` to its file list."""
    dt = _open(uri, version, storage_options)
    _check_readable(dt, uri)
    actions = dt.get_add_actions(flatten=True)
    actions = pa.table(actions) if not isinstance(actions, pa.Table) else actions
    paths = actions.column("path").to_pylist() if actions.num_rows else []
    root = normalize_uri(uri)
    files = [p if "://" in p else join_uri(root, unquote(p)) for p in paths]
    meta = dt.metadata()
    part_cols = list(meta.partition_columns)
    parts = [
        {c: actions.column(f"partition.{c}")[i].as_py() for c in part_cols} for i in range(actions.num_rows)
    ] if part_cols else [{} for _ in files]
    num_rows = None
    if "num_records" in actions.column_names and actions.num_rows:
        counts = actions.column("num_records").to_pylist()
        if all(c is not None for c in counts):
            num_rows = int(sum(counts))
    elif not actions.num_rows:
        num_rows = 0
    return TableSnapshot(
        uri=root,
        version=dt.version(),
        files=files,
        partition_values=parts,
        schema=pa.schema(dt.schema().to_arrow()),
        partition_columns=part_cols,
        num_rows=num_rows,
    )


def read_table(
    spark: "SparkSession",
    uri: str,
    version: int | None = None,
    *,
    storage_options: Mapping[str, str] | None = None,
) -> "DataFrame":
    """Read a version of a Delta table (default latest) as a Spark DataFrame.

    Spark reads exactly the files of that version; partition columns come from the log.
    """
    from functools import reduce

    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema

    snap = on_storage(spark, snapshot, uri, version, storage_options=storage_options)
    full = from_arrow_schema(pa.schema([f.remove_metadata() for f in snap.schema]))
    data_schema = type(full)([f for f in full.fields if f.name not in snap.partition_columns])
    if not snap.files:
        return spark.createDataFrame([], full)
    if not snap.partition_columns:
        return spark.read.schema(data_schema).parquet(*map(_spark_path, snap.files))
    groups: dict[tuple, list[str]] = {}
    for path, pv in zip(snap.files, snap.partition_values):
        groups.setdefault(tuple(pv.get(c) for c in snap.partition_columns), []).append(path)
    frames = []
    for values, paths in groups.items():
        df = spark.read.schema(data_schema).parquet(*map(_spark_path, paths))
        for col, value in zip(snap.partition_columns, values):
            df = df.withColumn(col, F.lit(value).cast(full[col].dataType))
        frames.append(df.select(*full.names))
    return reduce(lambda a, b: a.unionByName(b), frames)


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class WriteResult:
    """What a committed write produced."""

    uri: str
    """Table root."""
    version: int
    """The Delta version this write committed (found in the log by the write's staging folder)."""
    num_files: int
    """Parquet files the write added."""
    num_rows: int | None
    """Rows the write added, from the files' footers; None when the store is remote (not read back)."""
    mode: str
    """The write mode: error, append or overwrite."""


_GLOB_CHARS = re.compile(r"([\\\[\]{}*?])")


def _spark_path(uri: str) -> str:
    """``uri`` for ``spark.read``, which expands glob characters: ``t[1]`` must stay literal."""
    return _GLOB_CHARS.sub(r"\\\1", uri)


def write_table(
    df: "DataFrame",
    uri: str,
    *,
    mode: str = "error",
    partition_by: list[str] | None = None,
    schema: DatasetSchema | None = None,
    target_file_mb: int = 128,
    row_group_mb: int = 8,
    commit_metadata: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, str] | None = None,
    description: str | None = None,
) -> WriteResult:
    """Write ``df`` as a new version of the Delta table at ``uri``, atomically.

    ``mode``: ``error`` (the table must not exist), ``append`` or ``overwrite``.
    ``schema``: validated against ``df`` before anything is written; its roles, shapes, codecs
    and nullability are stored in the table, and nulls in its non-nullable columns fail the
    write before the commit. An append to a table with non-nullable columns is checked alike.
    ``target_file_mb``: an upper bound, not a target: a file is cut after about this much
    *uncompressed* data (estimated from the column types); the number of files is at least one
    per non-empty partition of ``df``, so ``repartition``/``coalesce`` it for fewer, larger files.
    ``row_group_mb``: Parquet row-group size (the loader's unit of sharding and shuffling).
    ``commit_metadata``: extra keys recorded in the commit (visible in the table history).

    Raises ``SchemaMismatchError`` on a schema mismatch (before any work) or on nulls in a
    non-nullable column (before the commit), ``CommitConflictError`` when a concurrent writer
    wins a conflicting commit, ``WriteAbortedError`` when the write fails before its commit. In
    these cases the table keeps its previous version and the staged files are deleted. If the
    driver itself dies mid-write, its staging folder stays: ``cleanup_staging`` removes it.
    """
    if mode not in WRITE_MODES:
        raise ValueError(f"mode={mode!r} is not one of {list(WRITE_MODES)}")
    if target_file_mb <= 0 or row_group_mb <= 0:
        raise ValueError(
            f"target_file_mb={target_file_mb} and row_group_mb={row_group_mb} must be positive (MiB); "
            "the defaults are 128 and 8"
        )
    partition_by = list(partition_by or [])
    uri = normalize_uri(uri)
    arrow_schema = spark_to_arrow_schema(df.schema)
    if schema is not None:
        schema.validate_arrow(arrow_schema)
        arrow_schema = schema.arrow_with_metadata(arrow_schema)
    spark = df.sparkSession
    here = driver_session(spark)  # None under Spark Connect: the storage steps run on an executor
    exists, table_parts, table_schema = on_storage(spark, _current_layout, uri, storage_options)
    if exists and mode == "error":
        raise ValueError(f"table {uri} already exists; pass mode='append' or mode='overwrite'")
    if exists:
        # Files written without the table's partition folders would carry no partition
        # values in the log, and readers would see nulls in those columns.
        if not partition_by:
            partition_by = table_parts
        elif partition_by != table_parts:
            raise ValueError(
                f"partition_by={partition_by} differs from the partition columns {table_parts} of {uri}; "
                f"pass partition_by={table_parts} (or leave it out), or write a new table to change the layout"
            )
    missing = [c for c in partition_by if c not in df.columns]
    if missing:
        raise ValueError(f"partition_by names columns {missing} that the DataFrame lacks; columns: {df.columns}")
    if exists and mode == "append":
        diffs = DatasetSchema.from_arrow(table_schema, name=uri).mismatches(
            pa.schema([f.remove_metadata() for f in arrow_schema])
        )
        if diffs:
            raise ValueError(
                f"cannot append to {uri}: " + "; ".join(diffs) + ". Use mode='overwrite' to replace the table"
            )
        if schema is None:
            # An append keeps the table's declared column metadata and nullability.
            by_name = {f.name: f for f in table_schema}
            arrow_schema = pa.schema([by_name.get(f.name, f) for f in arrow_schema])
    # Declared non-nullable columns (by ``schema`` or, for an append, by the table) are
    # checked; Spark's own non-null inference is trusted.
    required = [f.name for f in arrow_schema if not f.nullable] if schema is not None else []
    if exists and mode == "append":
        required += [f.name for f in table_schema if not f.nullable and f.name not in required]
    # Spark enforces the non-nullability it infers itself: those columns need no count.
    required = [c for c in required if df.schema[c].nullable] if required else []
    row_bytes = _dc.estimated_row_bytes(arrow_schema)

    txn = uuid.uuid4().hex[:12]
    folder = f"{STAGING_PREFIX}{time.strftime('%Y%m%d%H%M%S', time.gmtime())}-{txn}"
    staging = join_uri(uri, folder)
    max_rows = max(1, (target_file_mb << 20) // row_bytes)
    flat = [f.name for f in arrow_schema if f.name not in partition_by and not pa.types.is_nested(f.type)]
    try:
        writer = (
            df.write.mode("error")
            .option("parquet.block.size", str(row_group_mb << 20))
            .option("maxRecordsPerFile", str(max_rows))
            .option("compression", "snappy")
        )
        if partition_by:
            writer = writer.partitionBy(*partition_by)
        writer.parquet(staging)
        staged, stats = on_storage(spark, _staged_files, here, uri, staging, flat)
        zone = spark.conf.get("spark.sql.session.timeZone")
        ts_parts = {
            f.name: zone for f in arrow_schema if f.name in partition_by and pa.types.is_timestamp(f.type) and f.type.tz
        }
        parts = [_dc.partition_values(rel, partition_by, ts_parts) for rel, _, _ in staged]
        if required and staged:
            bad = _dc.null_violations(df, required, stats)
            if bad:
                raise SchemaMismatchError(
                    schema.name if schema is not None else uri,
                    [f"column {n!r} is declared non-nullable but has {c} nulls" for n, c in bad.items()],
                )
    except BaseException as e:
        on_storage(spark, _dc.delete_tree, here, staging)
        if isinstance(e, (SchemaMismatchError, KeyboardInterrupt, SystemExit)):
            raise
        raise WriteAbortedError(
            f"write to {uri} failed before its commit, so the table keeps its previous version "
            f"and the staged files under {staging} were removed: {type(e).__name__}: {str(e)[:2000]}"
        ) from e
    version = on_storage(spark, _commit_write, here, uri, staging, folder, staged, stats, parts, arrow_schema,
                         partition_by, mode, exists, commit_metadata, storage_options, description)
    n_rows = sum(json.loads(s).get("numRecords", 0) for s in stats) if stats is not None else None
    return WriteResult(uri=uri, version=version, num_files=len(staged), num_rows=n_rows, mode=mode)


def _current_layout(uri: str, storage_options: Mapping[str, str] | None
                    ) -> tuple[bool, list[str], pa.Schema | None]:
    """(exists, partition columns, Arrow schema) of the table at ``uri`` as it is now."""
    if not table_exists(uri, storage_options):
        return False, [], None
    current = _open(uri, None, storage_options)
    return True, list(current.metadata().partition_columns), pa.schema(current.schema().to_arrow())


def _staged_files(spark: "SparkSession | None", uri: str, staging: str, flat: list[str]
                  ) -> tuple[list[tuple[str, int, int]], list[str] | None]:
    """The files Spark staged, and their Delta stats when their footers are cheap to read (local)."""
    staged = _dc.list_staged(spark, staging)
    stats: list[str] | None = None
    if _is_local(uri):
        with ThreadPoolExecutor(8) as pool:
            stats = list(pool.map(lambda rel: _dc.file_stats(join_uri(staging, rel), flat),
                                  [rel for rel, _, _ in staged]))
    return staged, stats


def _commit_write(spark: "SparkSession | None", uri: str, staging: str, folder: str,
                  staged: list[tuple[str, int, int]], stats: list[str] | None, parts: list[dict[str, str | None]],
                  arrow_schema: pa.Schema, partition_by: list[str], mode: str, exists: bool,
                  commit_metadata: Mapping[str, Any] | None, storage_options: Mapping[str, str] | None,
                  description: str | None) -> int:
    """Commit the staged files; the version the commit got. Runs where the storage is reachable."""
    state = {"attempted": False, "committed": False, "start": -1}
    try:
        _dc.commit_staged(
            uri, staged, stats or ["{}" for _ in staged], parts, folder, arrow_schema, partition_by, mode,
            exists, commit_metadata, storage_options, description, state,
        )
    except BaseException as e:
        if state["attempted"] and not state["committed"]:
            # The commit call failed, but a failure after the log write (a post-commit hook,
            # a lost connection) may hide a landed commit: its files must then stay.
            try:
                state["committed"] = _dc.find_commit(uri, folder, state["start"], storage_options) is not None
            except Exception as lookup_error:
                raise RuntimeError(
                    f"write to {uri} failed in its commit ({type(e).__name__}: {e}), and whether the commit "
                    f"landed cannot be told ({lookup_error}); the staged files under {staging} were kept. If "
                    f"no commit in the table's history has sparkdl.staging={folder}, cleanup_staging() removes them"
                ) from e
        if not state["committed"]:
            _dc.delete_tree(spark, staging)
            if isinstance(e, (CommitConflictError, SchemaMismatchError, KeyboardInterrupt, SystemExit)):
                raise
            raise WriteAbortedError(
                f"write to {uri} failed before its commit, so the table keeps its previous version "
                f"and the staged files under {staging} were removed: {type(e).__name__}: {str(e)[:2000]}"
            ) from e
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        warnings.warn(
            f"write to {uri} committed, but a step after the commit failed ({type(e).__name__}: {e}); "
            "the new version is complete", RuntimeWarning, stacklevel=2,
        )
    # The commit landed: from here on nothing may delete its files.
    _dc.tidy_staging(uri, staging)
    try:
        version = _dc.find_commit(uri, folder, state["start"], storage_options)
    except Exception as e:
        raise RuntimeError(
            f"write to {uri} was committed (its files are under {staging}), but the version it got could not "
            f"be read back ({type(e).__name__}: {e}); the table's history names it by sparkdl.staging={folder}"
        ) from e
    if version is None:
        raise RuntimeError(
            f"write to {uri} was committed, but no commit with sparkdl.staging={folder} is in the log; "
            "was the table vacuumed or overwritten by another tool meanwhile?"
        )
    return version


def cleanup_staging(
    uri: str,
    *,
    older_than: float = 24 * 3600.0,
    dry_run: bool = False,
    storage_options: Mapping[str, str] | None = None,
) -> list[str]:
    """Delete the staging folders under the table at ``uri`` that no commit refers to; return their URIs.

    A write whose driver dies between the Spark write and the commit (killed, out of memory,
    machine lost) cannot clean up after itself: its ``w-<time>-<txn>/`` folder stays, invisible
    to every reader but taking space. A folder is deleted when no add or remove action of the
    log names it and the UTC time in its name is more than ``older_than`` seconds ago (a
    younger one may belong to a write still running). ``dry_run`` only lists them.
    """
    from datetime import datetime, timezone

    from sparkdl import _fs

    if older_than < 0:
        raise ValueError(f"older_than={older_than} must be >= 0 seconds; the default is one day")
    uri = normalize_uri(uri)
    referenced: set[str] = set()
    log = join_uri(uri, "_delta_log")
    for name in _fs.listdir(log):
        if not name.endswith(".json") or not name[:-5].isdigit():
            continue
        for line in _fs.read_text(join_uri(log, name)).splitlines():
            action = json.loads(line) if line.strip() else {}
            for kind in ("add", "remove"):
                if kind in action and "://" not in action[kind]["path"]:
                    referenced.add(unquote(action[kind]["path"]).split("/")[0])
    try:  # a checkpoint may have replaced the oldest JSON commits
        referenced.update(_live_folders(uri, storage_options))
    except TableNotFoundError:
        pass
    now = time.time()
    orphans = []
    for name in _fs.listdir(uri):
        if not name.startswith(STAGING_PREFIX) or name in referenced:
            continue
        try:
            stamp = datetime.strptime(name[len(STAGING_PREFIX):].split("-")[0], "%Y%m%d%H%M%S")
        except ValueError:  # not a folder this module named
            continue
        if now - stamp.replace(tzinfo=timezone.utc).timestamp() < older_than:
            continue
        orphans.append(join_uri(uri, name))
    if not dry_run:
        for folder in orphans:
            _fs.delete(folder)
    return orphans


def _live_folders(uri: str, storage_options: Mapping[str, str] | None) -> set[str]:
    root = normalize_uri(uri).rstrip("/") + "/"
    return {f[len(root):].split("/")[0] for f in snapshot(uri, storage_options=storage_options).files if f.startswith(root)}


# ---------------------------------------------------------------------------------------
# Layout of the lakehouse
# ---------------------------------------------------------------------------------------
# A name is one folder under tables/, specs/, models/ or runs/: no separators, no leading dot.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(kind: str, name: str) -> str:
    """``name`` when it names one folder of the lakehouse, else ``ValueError`` naming ``kind`` and the fix.

    Checked on reads as on writes: ``../../other/models/x`` must not resolve outside the lakehouse."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"{kind} name {name!r} is invalid: use letters, digits, '.', '_' and '-' only, starting "
                         f"with a letter or digit (it names one folder in the lakehouse)")
    return name


def table_uri(root: str, name_or_uri: str, *, kind: str = "table") -> str:
    """A table given by name (under ``<root>/tables``) or by an absolute path or URI.

    A relative path is neither: ``../../x`` would escape the lakehouse (or land wherever the
    job happens to run), so it is refused with the fix."""
    text = os.fspath(name_or_uri)
    if "://" in text or text.startswith("file:") or os.path.isabs(os.path.expanduser(text)):
        return normalize_uri(text)
    if not isinstance(text, str) or not _NAME_RE.fullmatch(text):
        raise ValueError(
            f"{kind} {text!r} is neither a table name (letters, digits, '.', '_', '-': one folder under "
            f"<lakehouse>/tables) nor an absolute path or URI; give the table's name, or an absolute path "
            "or URI for a table outside the lakehouse")
    return Lakehouse(root).table(text)


@dataclass(frozen=True)
class Lakehouse:
    """Folder layout under one lakehouse root (a local folder by default).

    ``tables/<name>`` Delta tables, ``specs/<name>/`` preprocessing specs,
    ``models/<name>/v<N>/`` published models, ``runs/<run_id>/`` training runs
    (checkpoints, metrics, curves), ``cache/`` materialized DataFrames, ``raw/`` ingested files.
    """

    root: str
    """Lakehouse root: a local folder, ``file://``, ``s3a://``, ``hdfs://`` … (normalized to an absolute path when local)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", normalize_uri(self.root))

    def table(self, name: str) -> str:
        return join_uri(self.root, "tables", check_name("table", name))

    def spec_dir(self, name: str) -> str:
        return join_uri(self.root, "specs", check_name("spec", name))

    def models(self) -> str:
        return join_uri(self.root, "models")

    def model(self, name: str) -> str:
        return join_uri(self.root, "models", check_name("model", name))

    def run(self, run_id: str) -> str:
        return join_uri(self.root, "runs", check_name("run", run_id))

    def cache(self) -> str:
        return join_uri(self.root, "cache")

    def raw(self) -> str:
        return join_uri(self.root, "raw")
