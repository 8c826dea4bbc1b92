"""Delta tables in the lakehouse: Spark writes the Parquet files, the driver commits them.

Executors write Parquet files in parallel into a fresh folder under the table root
(``<table>/w-<time>-<txn>/``); the driver lists them through Spark's Hadoop filesystem
and commits them with deltalake's transaction API as one Delta commit. Until that commit
the files are invisible to every Delta reader; if anything fails before it, the folder is
deleted and the table stays at its previous version.

Defaults chosen for streaming into training (see docs/architecture.md):
``target_file_mb=128`` (files large enough for object stores, few enough to list fast) and
``row_group_mb=8`` (a row group is the loader's unit of sharding and shuffling: 8 MiB keeps
hundreds of groups in a large table, so ranks split evenly and shuffles mix well, while each
read stays large enough to be efficient).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import unquote, urlparse

import pyarrow as pa

from sparkdl.errors import CommitConflictError, TableNotFoundError, TableVersionError, WriteAbortedError
from sparkdl.schema import DatasetSchema, spark_to_arrow_schema

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
]

WRITE_MODES = ("error", "append", "overwrite")


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
    uri = normalize_uri(uri)
    for hadoop_scheme in ("s3a://", "s3n://"):
        if uri.startswith(hadoop_scheme):
            return "s3://" + uri[len(hadoop_scheme):]
    return uri


def _is_local(uri: str) -> bool:
    return urlparse(uri).scheme in ("", "file")


def join_uri(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


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


def snapshot(
    uri: str, version: int | None = None, *, storage_options: Mapping[str, str] | None = None
) -> TableSnapshot:
    """Resolve ``version`` (default latest) of the table at ``uri`` to its file list."""
    dt = _open(uri, version, storage_options)
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

    snap = snapshot(uri, version, storage_options=storage_options)
    full = from_arrow_schema(pa.schema([f.remove_metadata() for f in snap.schema]))
    data_schema = type(full)([f for f in full.fields if f.name not in snap.partition_columns])
    if not snap.files:
        return spark.createDataFrame([], full)
    if not snap.partition_columns:
        return spark.read.schema(data_schema).parquet(*snap.files)
    groups: dict[tuple, list[str]] = {}
    for path, pv in zip(snap.files, snap.partition_values):
        groups.setdefault(tuple(pv.get(c) for c in snap.partition_columns), []).append(path)
    frames = []
    for values, paths in groups.items():
        df = spark.read.schema(data_schema).parquet(*paths)
        for col, value in zip(snap.partition_columns, values):
            df = df.withColumn(col, F.lit(value).cast(full[col].dataType))
        frames.append(df.select(*full.names))
    return reduce(lambda a, b: a.unionByName(b), frames)


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WriteResult:
    """What a committed write produced."""

    uri: str
    version: int
    num_files: int
    num_rows: int | None
    mode: str


def _estimated_row_bytes(schema: pa.Schema) -> int:
    total = 0
    for f in schema:
        t = f.type
        if pa.types.is_list(t):
            total += 8 * 16
        elif pa.types.is_string(t) or pa.types.is_binary(t):
            total += 32
        else:
            total += max(1, getattr(t, "bit_width", 64) // 8)
    return max(total, 1)


def _hadoop_fs(spark: "SparkSession", uri: str):
    jvm = spark.sparkContext._jvm
    path = jvm.org.apache.hadoop.fs.Path(uri)
    return path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()), path


def _list_staged(spark: "SparkSession", staging: str) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime ms) of the Parquet files Spark wrote under ``staging``."""
    fs, path = _hadoop_fs(spark, staging)
    if not fs.exists(path):
        return []
    base = fs.makeQualified(path).toString().rstrip("/")
    out = []
    it = fs.listFiles(path, True)
    while it.hasNext():
        st = it.next()
        full = st.getPath().toString()
        name = st.getPath().getName()
        if not name.endswith(".parquet") or name.startswith((".", "_")):
            continue
        out.append((unquote(full[len(base) + 1:]), int(st.getLen()), int(st.getModificationTime())))
    return out


def _delete(spark: "SparkSession", uri: str) -> None:
    try:
        fs, path = _hadoop_fs(spark, uri)
        fs.delete(path, True)
    except Exception:  # cleanup must never mask the original failure
        pass


def _partition_values(rel_path: str, partition_by: list[str]) -> dict[str, str | None]:
    values: dict[str, str | None] = {}
    for part in rel_path.split("/")[:-1]:
        key, sep, val = part.partition("=")
        if sep and key in partition_by:
            val = unquote(val)
            values[key] = None if val == "__HIVE_DEFAULT_PARTITION__" else val
    return values


def _file_stats(path: str) -> str:
    import pyarrow.parquet as pq

    return json.dumps({"numRecords": pq.read_metadata(path).num_rows})


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
    ``schema``: validated against ``df`` before anything is written; its roles, shapes and
    codecs are stored as column metadata in the table.
    ``commit_metadata``: extra keys recorded in the commit (visible in the table history).
    Raises ``SchemaMismatchError`` before any work on a schema mismatch, ``CommitConflictError``
    when a concurrent writer wins a conflicting commit, ``WriteAbortedError`` when the write
    fails; in every failure case the table keeps its previous version and no staged file stays.
    """
    if mode not in WRITE_MODES:
        raise ValueError(f"mode={mode!r} is not one of {list(WRITE_MODES)}")
    if target_file_mb <= 0 or row_group_mb <= 0:
        raise ValueError("target_file_mb and row_group_mb must be positive (MiB)")
    partition_by = list(partition_by or [])
    uri = normalize_uri(uri)
    arrow_schema = spark_to_arrow_schema(df.schema)
    if schema is not None:
        schema.validate_arrow(arrow_schema)
        arrow_schema = schema.arrow_with_metadata(arrow_schema)
    exists = table_exists(uri, storage_options)
    if exists and mode == "error":
        raise ValueError(f"table {uri} already exists; pass mode='append' or mode='overwrite'")
    current = _open(uri, None, storage_options) if exists else None
    if current is not None:
        # Files written without the table's partition folders would carry no partition
        # values in the log, and readers would see nulls in those columns.
        table_parts = list(current.metadata().partition_columns)
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
    if current is not None and mode == "append":
        table_schema = pa.schema(current.schema().to_arrow())
        diffs = DatasetSchema.from_arrow(table_schema, name=uri).mismatches(
            pa.schema([f.remove_metadata() for f in arrow_schema])
        )
        if diffs:
            raise ValueError(
                f"cannot append to {uri}: " + "; ".join(diffs) + ". Use mode='overwrite' to replace the table"
            )

    spark = df.sparkSession
    txn = uuid.uuid4().hex[:12]
    folder = f"w-{time.strftime('%Y%m%d%H%M%S', time.gmtime())}-{txn}"
    staging = join_uri(uri, folder)
    max_rows = max(1, (target_file_mb << 20) // _estimated_row_bytes(arrow_schema))
    try:
        writer = (
            df.write.mode("errorifexists")
            .option("parquet.block.size", str(row_group_mb << 20))
            .option("maxRecordsPerFile", str(max_rows))
            .option("compression", "snappy")
        )
        if partition_by:
            writer = writer.partitionBy(*partition_by)
        writer.parquet(staging)
        staged = _list_staged(spark, staging)
        if _is_local(uri):
            with ThreadPoolExecutor(8) as pool:
                stats = list(pool.map(_file_stats, [join_uri(staging, rel) for rel, _, _ in staged]))
        else:
            stats = ["{}" for _ in staged]
        version = _commit(
            uri, staged, stats, folder, arrow_schema, partition_by, mode, exists,
            commit_metadata, storage_options, description,
        )
    except BaseException as e:
        _delete(spark, staging)
        if isinstance(e, (CommitConflictError, KeyboardInterrupt)):
            raise
        raise WriteAbortedError(
            f"write to {uri} failed before its commit, so the table keeps its previous version "
            f"and the staged files under {staging} were removed: {type(e).__name__}: {str(e)[:2000]}"
        ) from e
    if _is_local(uri):
        _remove_crc_files(Path(staging))
    n_rows = sum(json.loads(s).get("numRecords", 0) for s in stats) if _is_local(uri) else None
    return WriteResult(uri=uri, version=version, num_files=len(staged), num_rows=n_rows, mode=mode)


def _remove_crc_files(folder: Path) -> None:
    # Hadoop's local filesystem writes .crc checksum files beside each Parquet file; they
    # are no part of the Delta table and would only clutter it.
    for crc in folder.rglob(".*.crc"):
        crc.unlink(missing_ok=True)


def _commit(
    uri: str,
    staged: list[tuple[str, int, int]],
    stats: list[str],
    folder: str,
    arrow_schema: pa.Schema,
    partition_by: list[str],
    mode: str,
    exists: bool,
    commit_metadata: Mapping[str, Any] | None,
    storage_options: Mapping[str, str] | None,
    description: str | None,
) -> int:
    from deltalake import DeltaTable, Schema
    from deltalake.exceptions import CommitFailedError, DeltaError
    from deltalake.transaction import AddAction, CommitProperties, create_table_with_add_actions

    actions = [
        AddAction(f"{folder}/{rel}", size, _partition_values(rel, partition_by), mtime, True, st)
        for (rel, size, mtime), st in zip(staged, stats)
    ]
    # The staging folder name is unique per write: it identifies our commit in the history
    # even when concurrent writers commit identical metadata.
    meta = {"sparkdl.writer": "sparkdl.lakehouse", "sparkdl.mode": mode, "sparkdl.staging": folder}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (commit_metadata or {}).items()})
    props = CommitProperties(custom_metadata=meta, max_commit_retries=20)
    target = delta_uri(uri)
    opts = dict(storage_options or {})
    delta_schema = Schema.from_arrow(arrow_schema)
    if not exists:
        try:
            create_table_with_add_actions(
                target, delta_schema, actions, mode="error", partition_by=partition_by or None,
                description=description, storage_options=opts, commit_properties=props,
            )
            return 0
        except DeltaError as e:
            if "exist" not in str(e).lower():
                raise
            # Another writer created the table between our check and our commit: an
            # append still lands as the next version; an error-mode write must not.
            if mode == "error":
                raise ValueError(f"table {uri} was created by another writer while this write ran") from e
    dt = DeltaTable(target, storage_options=opts)
    try:
        dt.create_write_transaction(
            actions, mode="append" if mode == "append" else "overwrite", schema=delta_schema,
            partition_by=partition_by or None, commit_properties=props,
        )
    except CommitFailedError as e:
        raise CommitConflictError(
            f"commit to {uri} lost to a concurrent writer ({e}); the table keeps the other "
            "writer's version and this write's files were removed: re-run the write"
        ) from e
    dt.update_incremental()
    return _version_of_commit(dt, meta)


def _version_of_commit(dt, meta: Mapping[str, str]) -> int:
    """Version our commit got, which may be past the table's version when we started."""
    for entry in dt.history(limit=50):
        if all(entry.get(k) == v for k, v in meta.items()):
            return int(entry["version"])
    return dt.version()


# ---------------------------------------------------------------------------------------
# Layout of the lakehouse
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lakehouse:
    """Folder layout under one lakehouse root (a local folder by default).

    ``tables/<name>`` Delta tables, ``specs/<name>/`` preprocessing specs,
    ``models/<name>/v<N>/`` published models, ``runs/<run_id>/`` training runs
    (checkpoints, metrics, curves), ``cache/`` materialized DataFrames, ``raw/`` ingested files.
    """

    root: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", normalize_uri(self.root))

    def table(self, name: str) -> str:
        return join_uri(self.root, "tables", name)

    def spec_dir(self, name: str) -> str:
        return join_uri(self.root, "specs", name)

    def models(self) -> str:
        return join_uri(self.root, "models")

    def model(self, name: str) -> str:
        return join_uri(self.root, "models", name)

    def run(self, run_id: str) -> str:
        return join_uri(self.root, "runs", run_id)

    def cache(self) -> str:
        return join_uri(self.root, "cache")

    def raw(self) -> str:
        return join_uri(self.root, "raw")
