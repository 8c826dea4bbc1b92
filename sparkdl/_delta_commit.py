"""The driver's side of ``lakehouse.write_table``: what Spark staged, the Delta commit, its version.

Internal to ``sparkdl.lakehouse``. Kept apart so that module holds the API (read, snapshot,
write, cleanup) and this one the mechanics: listing the staged files (through Spark's Hadoop
filesystem where the session has one), their Delta ``stats`` from the Parquet footers, partition values (Hive-unescaped
once, timestamps converted to UTC), the commit through ``deltalake.transaction``, and finding
the version the commit got in the log.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import unquote

import pyarrow as pa

from sparkdl.errors import CommitConflictError
from sparkdl.session import delete_tree, list_files

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

__all__: list[str] = []  # internal

STAGING_KEY = "sparkdl.staging"
"""Commit-metadata key naming the folder of the files a commit added (unique per write)."""

_LIST_GUESS = 16  # elements per list value when nothing better is known


def _type_bytes(t: pa.DataType) -> int:
    """Rough uncompressed bytes of one value of ``t``; raises ``TypeError`` for types Delta cannot hold."""
    if (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
            or pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)):
        return 32
    if pa.types.is_fixed_size_list(t):
        return max(1, t.list_size) * _type_bytes(t.value_type)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _LIST_GUESS * _type_bytes(t.value_type)
    if pa.types.is_struct(t):
        return max(1, sum(_type_bytes(t.field(i).type) for i in range(t.num_fields)))
    if pa.types.is_map(t):
        return _LIST_GUESS * (_type_bytes(t.key_type) + _type_bytes(t.item_type))
    if pa.types.is_null(t):
        return 1
    try:
        return max(1, t.bit_width // 8)
    except ValueError:  # pyarrow: "Non-fixed width type"
        raise TypeError(str(t)) from None


def estimated_row_bytes(schema: pa.Schema) -> int:
    total = 0
    for f in schema:
        try:
            total += _type_bytes(f.type)
        except TypeError as e:
            raise ValueError(
                f"column {f.name!r} has type {f.type}, which write_table cannot size or store; use scalar, "
                "string, binary, decimal, date, timestamp, array, struct or map columns"
            ) from e
    return max(total, 1)


def list_staged(spark: "SparkSession | None", staging: str) -> list[tuple[str, int, int]]:
    """(relative path as on storage, size, mtime ms) of the Parquet files Spark wrote under ``staging``.

    The name is the one stored, Hive escapes included (a partition value ``x%y`` is the folder
    ``p=x%25y``); it must not be unescaped again, or the log would point at a file that does not
    exist. deltalake percent-encodes the path into the log itself.
    """
    return [(rel, size, mtime) for rel, size, mtime in list_files(spark, staging)
            if rel.endswith(".parquet") and not rel.rsplit("/", 1)[-1].startswith((".", "_"))]


def partition_values(
    rel_path: str, partition_by: list[str], timestamp_zone: Mapping[str, str] | None = None
) -> dict[str, str | None]:
    """Partition values of a staged file, from its Hive-style folders. ``timestamp_zone``:
    timestamp columns -> the Spark session zone their folder names are written in."""
    values: dict[str, str | None] = {}
    for part in rel_path.split("/")[:-1]:
        key, sep, val = part.partition("=")
        if sep and key in partition_by:
            val = unquote(val)  # the one Hive unescape: p=x%25y holds the value x%y
            if val == "__HIVE_DEFAULT_PARTITION__":
                values[key] = None
            elif timestamp_zone and key in timestamp_zone:
                values[key] = _utc_timestamp(val, timestamp_zone[key])
            else:
                values[key] = val
    return values


def _utc_timestamp(text: str, zone: str) -> str:
    """Spark names a timestamp partition folder by the wall-clock time in the session zone;
    Delta reads a partition value as UTC. Convert, so every reader sees the same instant."""
    from datetime import datetime, timezone

    local = datetime.fromisoformat(text)
    if local.tzinfo is None:
        local = local.replace(tzinfo=_tzinfo(zone))
    return local.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _tzinfo(zone: str):
    from datetime import datetime
    from zoneinfo import ZoneInfo

    try:
        return ZoneInfo(zone)
    except Exception:
        pass
    offset = zone.upper().removeprefix("UTC").removeprefix("GMT") or "+00:00"
    try:  # Spark also accepts offsets: +02:00, UTC+02:00, GMT-05:00
        return datetime.fromisoformat(f"2000-01-01T00:00:00{offset}").tzinfo
    except ValueError:
        raise ValueError(
            f"cannot read the Spark session time zone {zone!r} to convert timestamp partition values to UTC; "
            "set spark.sql.session.timeZone to a region name (e.g. UTC) or an offset like +02:00"
        ) from None


def file_stats(path: str, columns: list[str]) -> str:
    """Delta ``stats`` of one staged file: row count, and null counts of the flat ``columns``
    (from the Parquet footer; a column whose chunks lack the count is left out)."""
    import pyarrow.parquet as pq

    md = pq.read_metadata(path)
    stats: dict[str, Any] = {"numRecords": md.num_rows}
    leaf = {md.schema.column(i).path: i for i in range(md.num_columns)}
    nulls: dict[str, int] = {}
    for name in columns:
        i = leaf.get(name)
        if i is None:
            continue
        total = 0
        for rg in range(md.num_row_groups):
            st = md.row_group(rg).column(i).statistics
            if st is None or not st.has_null_count:
                break
            total += st.null_count
        else:
            nulls[name] = total
    if nulls:
        stats["nullCount"] = nulls
    return json.dumps(stats)


def null_violations(df: "DataFrame", required: list[str], stats: list[str] | None) -> dict[str, int]:
    """Nulls found in the ``required`` (non-nullable) columns of what was written: from the
    files' footers where they count them, else by one Spark aggregation over ``df``."""
    counts: dict[str, int] = {}
    unknown = []
    for name in required:
        per_file = [json.loads(s).get("nullCount", {}).get(name) for s in stats] if stats is not None else [None]
        if all(n is not None for n in per_file):
            counts[name] = int(sum(per_file))
        else:
            unknown.append(name)
    if unknown:
        from pyspark.sql import functions as F

        row = df.agg(*[F.sum(F.col(n).isNull().cast("long")).alias(n) for n in unknown]).first()
        counts.update({n: int(row[n] or 0) for n in unknown})
    return {n: c for n, c in counts.items() if c}


def tidy_staging(uri: str, staging: str) -> None:
    # Hadoop's local filesystem writes .crc checksums beside each file, and Spark a _SUCCESS
    # marker: no part of the Delta table, they would only clutter it.
    from sparkdl import _fs

    if not _fs.is_local(uri):
        return
    folder = Path(staging)
    for junk in [*folder.rglob(".*.crc"), folder / "_SUCCESS"]:
        junk.unlink(missing_ok=True)


def commit_staged(
    uri: str,
    staged: list[tuple[str, int, int]],
    stats: list[str],
    parts: list[dict[str, str | None]],
    folder: str,
    arrow_schema: pa.Schema,
    partition_by: list[str],
    mode: str,
    exists: bool,
    commit_metadata: Mapping[str, Any] | None,
    storage_options: Mapping[str, str] | None,
    description: str | None,
    state: dict[str, Any],
) -> None:
    """Commit the staged files as one Delta commit. ``state["committed"]`` turns true as soon
    as the log holds the commit; ``state["start"]`` is the version the commit was based on."""
    from deltalake import DeltaTable, Schema
    from deltalake.exceptions import CommitFailedError, DeltaError
    from deltalake.transaction import AddAction, CommitProperties, create_table_with_add_actions

    from sparkdl.lakehouse import delta_uri

    actions = [
        AddAction(f"{folder}/{rel}", size, pv, mtime, True, st)
        for (rel, size, mtime), st, pv in zip(staged, stats, parts)
    ]
    # The staging folder name is unique per write: it identifies our commit in the log even
    # when concurrent writers commit identical metadata.
    meta = {"sparkdl.writer": "sparkdl.lakehouse", "sparkdl.mode": mode, STAGING_KEY: folder}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (commit_metadata or {}).items()})
    # deltalake retries a commit that lost the race on top of the winner after its conflict
    # check. A blind append may land on any later version. An overwrite removes the files it
    # saw: on top of a concurrent commit it would keep that commit's rows and still call
    # itself an overwrite, so it gets no retry and fails with CommitConflictError instead.
    retries = 20 if mode == "append" else 0
    props = CommitProperties(custom_metadata=meta, max_commit_retries=retries)
    target = delta_uri(uri)
    opts = dict(storage_options or {})
    delta_schema = Schema.from_arrow(arrow_schema)
    if not exists:
        try:
            state["attempted"] = True
            create_table_with_add_actions(
                target, delta_schema, actions, mode="error", partition_by=partition_by or None,
                description=description, storage_options=opts, commit_properties=props,
            )
            state["committed"] = True
            return
        except DeltaError as e:
            if "exist" not in str(e).lower():
                raise
            state["attempted"] = False
            # Another writer created the table between our check and our commit: an
            # append still lands as the next version; an error-mode write must not.
            if mode == "error":
                raise ValueError(f"table {uri} was created by another writer while this write ran") from e
    dt = DeltaTable(target, storage_options=opts)
    state["start"] = dt.version()
    try:
        state["attempted"] = True
        dt.create_write_transaction(
            actions, mode="append" if mode == "append" else "overwrite", schema=delta_schema,
            partition_by=partition_by or None, commit_properties=props,
        )
        state["committed"] = True
    except CommitFailedError as e:
        state["attempted"] = False  # deltalake's conflict check runs before the log write
        raise CommitConflictError(
            f"commit to {uri} lost to a concurrent writer ({e}); the table keeps the other "
            "writer's version and this write's files were removed: re-run the write"
        ) from e


def find_commit(
    uri: str, folder: str, after: int, storage_options: Mapping[str, str] | None = None
) -> int | None:
    """Version of the commit whose ``sparkdl.staging`` is ``folder``, searched in the log after
    version ``after``; None when no such commit exists.

    Read from the log files themselves: a ``DeltaTable`` handle's ``history()`` numbers its
    entries by counting down from the handle's own version, which is stale while other
    writers commit, so it can give a concurrent writer's number to our commit."""
    from sparkdl import _fs
    from sparkdl.lakehouse import delta_uri, join_uri

    log = join_uri(uri, "_delta_log")
    try:
        version = max(after + 1, 0)
        while True:
            try:
                text = _fs.read_text(join_uri(log, f"{version:020d}.json"))
            except FileNotFoundError:
                return None
            for line in text.splitlines():
                if line.startswith('{"commitInfo"'):
                    if json.loads(line)["commitInfo"].get(STAGING_KEY) == folder:
                        return version
                    break
            version += 1
    except (OSError, RuntimeError):
        if _fs.is_local(uri):
            raise
    # A remote store pyarrow.fs cannot open with default credentials: ask deltalake with
    # the caller's storage options, through a fresh handle.
    from deltalake import DeltaTable

    for entry in DeltaTable(delta_uri(uri), storage_options=dict(storage_options or {})).history():
        if entry.get(STAGING_KEY) == folder:
            return int(entry["version"])
    return None
