"""The lakehouse's guarantees: atomic writes, no lost commits, standard Delta, modes,
partitions, time travel, local paths and file:// URIs."""

from __future__ import annotations

import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparkdl.errors import (
    CommitConflictError,
    SchemaMismatchError,
    TableNotFoundError,
    TableVersionError,
    WriteAbortedError,
)
from sparkdl.lakehouse import Lakehouse, read_table, snapshot, table_exists, table_version, write_table
from sparkdl.schema import ColumnSpec, DatasetSchema

pytestmark = pytest.mark.integration


def _frame(spark, start: int, n: int):
    return spark.range(start, start + n).selectExpr(
        "id", "cast(id % 3 as string) as part", "cast(id * 0.5 as float) as x"
    )


def _ids(spark, uri: str, version: int | None = None) -> list[int]:
    return sorted(r["id"] for r in read_table(spark, uri, version).select("id").collect())


def _staging_folders(table: Path) -> set[str]:
    return {p.name for p in table.iterdir() if p.name.startswith("w-")} if table.exists() else set()


def test_modes_error_append_overwrite(spark, tmp_path):
    uri = str(tmp_path / "t")
    first = write_table(_frame(spark, 0, 10), uri)
    assert (first.version, first.num_rows, first.mode) == (0, 10, "error")
    with pytest.raises(ValueError, match="already exists.*mode='append' or mode='overwrite'"):
        write_table(_frame(spark, 10, 5), uri)
    assert table_version(uri) == 0

    assert write_table(_frame(spark, 10, 5), uri, mode="append").version == 1
    assert _ids(spark, uri) == list(range(15))

    assert write_table(_frame(spark, 100, 3), uri, mode="overwrite").version == 2
    assert _ids(spark, uri) == [100, 101, 102]
    assert snapshot(uri).num_rows == 3
    with pytest.raises(ValueError, match="mode='bogus' is not one of"):
        write_table(_frame(spark, 0, 1), uri, mode="bogus")


def test_time_travel_and_missing_versions(spark, tmp_path):
    uri = str(tmp_path / "t")
    write_table(_frame(spark, 0, 4), uri)
    write_table(_frame(spark, 4, 4), uri, mode="append")
    write_table(_frame(spark, 50, 2), uri, mode="overwrite")
    assert _ids(spark, uri, 0) == [0, 1, 2, 3]
    assert _ids(spark, uri, 1) == list(range(8))
    assert _ids(spark, uri) == [50, 51]
    assert snapshot(uri, 0).version == 0 and snapshot(uri, 0).num_rows == 4
    with pytest.raises(TableVersionError, match=r"has no version 7; it has versions 0\.\.2"):
        snapshot(uri, 7)
    with pytest.raises(TableVersionError, match=r"versions 0\.\.2"):
        read_table(spark, uri, -1)


def test_missing_table(spark, tmp_path):
    uri = str(tmp_path / "nothing-here")
    assert not table_exists(uri)
    with pytest.raises(TableNotFoundError, match="no Delta table at .*nothing-here"):
        snapshot(uri)


def test_standard_delta_readable_by_deltalake_and_pyarrow(spark, tmp_path):
    from deltalake import DeltaTable

    uri = str(tmp_path / "t")
    write_table(_frame(spark, 0, 30), uri)
    write_table(_frame(spark, 30, 20), uri, mode="append")

    by_deltalake = DeltaTable(uri).to_pyarrow_table()
    assert sorted(by_deltalake.column("id").to_pylist()) == list(range(50))

    snap = snapshot(uri)
    assert snap.files and all(Path(f).is_file() and f.endswith(".parquet") for f in snap.files)
    by_pyarrow = pa.concat_tables([pq.read_table(f) for f in snap.files])
    assert sorted(by_pyarrow.column("id").to_pylist()) == list(range(50))
    assert by_pyarrow.column("x").type == pa.float32()
    # The log is plain Delta: JSON commits, one per version.
    assert sorted(p.name for p in (tmp_path / "t" / "_delta_log").glob("*.json")) == [
        "00000000000000000000.json",
        "00000000000000000001.json",
    ]


def test_partition_columns(spark, tmp_path):
    from deltalake import DeltaTable

    uri = str(tmp_path / "t")
    write_table(_frame(spark, 0, 30), uri, partition_by=["part"])
    snap = snapshot(uri)
    assert snap.partition_columns == ["part"]
    assert {pv["part"] for pv in snap.partition_values} == {"0", "1", "2"}
    assert all(f"part={pv['part']}" in f for f, pv in zip(snap.files, snap.partition_values))

    # An append that does not repeat partition_by still lands in the table's partitions.
    write_table(_frame(spark, 30, 6), uri, mode="append")
    rows = read_table(spark, uri).collect()
    assert len(rows) == 36 and all(r["part"] == str(r["id"] % 3) for r in rows)
    by_deltalake = DeltaTable(uri).to_pyarrow_table()
    assert by_deltalake.column("part").null_count == 0

    with pytest.raises(ValueError, match=r"partition_by=\['x'\] differs from the partition columns \['part'\]"):
        write_table(_frame(spark, 40, 3), uri, mode="append", partition_by=["x"])
    with pytest.raises(ValueError, match="lacks"):
        write_table(_frame(spark, 0, 3), str(tmp_path / "u"), partition_by=["nope"])


def test_local_paths_and_file_uris(spark, tmp_path):
    plain = tmp_path / "t"
    write_table(_frame(spark, 0, 5), f"file://{plain}")
    assert table_exists(str(plain))
    write_table(_frame(spark, 5, 5), str(plain), mode="append")
    assert _ids(spark, f"file://{plain}") == list(range(10))
    assert snapshot(f"file://{plain}").uri == str(plain)
    assert Lakehouse(f"file://{tmp_path}").table("t") == str(tmp_path / "tables" / "t")


def test_failed_write_leaves_previous_version_and_no_staged_files(spark, tmp_path):
    from pyspark.sql import functions as F
    from pyspark.sql.types import LongType

    uri = str(tmp_path / "t")
    write_table(_frame(spark, 0, 20), uri)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "t").rglob("*"))

    @F.udf(LongType())
    def explode_on_one_row(x):
        if x == 1013:
            raise RuntimeError("bad row 1013")
        return x

    failing = _frame(spark, 1000, 40).repartition(4).withColumn("id", explode_on_one_row("id"))
    with pytest.raises(WriteAbortedError, match="(?s)keeps its previous version.*bad row 1013") as info:
        write_table(failing, uri, mode="append")
    assert info.value.__cause__ is not None

    assert table_version(uri) == 0
    assert _ids(spark, uri) == list(range(20))
    # Nothing staged stays behind: the listing is exactly what it was before.
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "t").rglob("*")) == before

    # A failed first write creates no table at all.
    new = tmp_path / "new"
    with pytest.raises(WriteAbortedError):
        write_table(failing, str(new))
    assert not table_exists(str(new))
    assert _staging_folders(new) == set()


def test_schema_metadata_travels_with_the_table(spark, tmp_path):
    schema = DatasetSchema(
        name="points",
        columns=(
            ColumnSpec(name="id", type="int64", role="id", nullable=False),
            ColumnSpec(name="part", type="string", role="meta"),
            ColumnSpec(name="x", type="float32", role="label", description="half the id"),
        ),
    )
    uri = str(tmp_path / "t")
    write_table(_frame(spark, 0, 5), uri, schema=schema)
    recovered = snapshot(uri).dataset_schema
    assert [(c.name, c.type, c.role) for c in recovered.columns] == [
        ("id", "int64", "id"), ("part", "string", "meta"), ("x", "float32", "label")
    ]
    assert recovered.column("x").description == "half the id"


def test_schema_mismatch_writes_nothing(spark, tmp_path):
    schema = DatasetSchema(
        name="points",
        columns=(
            ColumnSpec(name="id", type="int64", role="id"),
            ColumnSpec(name="part", type="string", role="meta"),
            ColumnSpec(name="x", type="float64", role="label"),
        ),
    )
    uri = tmp_path / "t"
    with pytest.raises(SchemaMismatchError, match="column 'x': expected float64, found float32"):
        write_table(_frame(spark, 0, 5), str(uri), schema=schema)
    assert not uri.exists()


def test_append_with_incompatible_columns_is_refused(spark, tmp_path):
    uri = str(tmp_path / "t")
    write_table(_frame(spark, 0, 5), uri)
    other = _frame(spark, 5, 5).selectExpr("id", "part", "cast(x as double) as x")
    with pytest.raises(ValueError, match="cannot append .*column 'x': expected float32, found float64"):
        write_table(other, uri, mode="append")
    assert table_version(uri) == 0


def test_empty_dataframe_makes_an_empty_version(spark, tmp_path):
    uri = str(tmp_path / "t")
    res = write_table(_frame(spark, 0, 10).where("id < 0"), uri)
    assert res.version == 0
    assert snapshot(uri).num_rows == 0
    assert read_table(spark, uri).count() == 0


# ---------------------------------------------------------------------------------------
# Failures after the commit, racing commits
# ---------------------------------------------------------------------------------------
def test_failure_after_the_commit_keeps_the_committed_files(spark, tmp_path, monkeypatch):
    import sparkdl._delta_commit as dc

    uri = str(tmp_path / "t")
    write_table(_frame(spark, 0, 5), uri)

    def lookup_fails(*args, **kwargs):
        raise OSError("object store hiccup")

    monkeypatch.setattr(dc, "find_commit", lookup_fails)
    with pytest.raises(RuntimeError, match=r"was committed .*version it got could not be read back.*hiccup"):
        write_table(_frame(spark, 5, 5), uri, mode="append")
    monkeypatch.undo()
    # The commit stands, with its files: the new version reads whole.
    assert table_version(uri) == 1
    assert _ids(spark, uri) == list(range(10))
    assert all(Path(f).is_file() for f in snapshot(uri).files)


def test_error_raised_by_a_commit_that_landed_keeps_its_files(spark, tmp_path, monkeypatch):
    from deltalake import DeltaTable

    uri = str(tmp_path / "t")
    write_table(_frame(spark, 0, 5), uri)
    commit = DeltaTable.create_write_transaction

    def commit_then_fail(self, *args, **kwargs):
        commit(self, *args, **kwargs)
        raise RuntimeError("post-commit hook failed")  # e.g. a checkpoint that could not be written

    monkeypatch.setattr(DeltaTable, "create_write_transaction", commit_then_fail)
    with pytest.warns(RuntimeWarning, match="committed, but a step after the commit failed.*post-commit hook"):
        res = write_table(_frame(spark, 5, 5), uri, mode="append")
    monkeypatch.undo()
    assert (res.version, res.num_rows) == (1, 5)
    assert _ids(spark, uri) == list(range(10))


def _commit_barrier(monkeypatch, parties: int = 2) -> threading.Barrier:
    """Hold every commit until ``parties`` writers are about to commit: they all start from the
    same table version, so the commits race for real instead of one Spark job finishing first."""
    from deltalake import DeltaTable

    barrier = threading.Barrier(parties, timeout=300)
    commit = DeltaTable.create_write_transaction

    def gated(self, *args, **kwargs):
        barrier.wait()
        return commit(self, *args, **kwargs)

    monkeypatch.setattr(DeltaTable, "create_write_transaction", gated)
    return barrier


def _race(spark, uri: str, writes: dict[int, tuple[int, int, str]]) -> dict[int, object]:
    """Run ``write_table`` for each id -> (start, n, mode) in its own thread; id -> result or error."""
    outcomes: dict[int, object] = {}

    def run(i: int) -> None:
        start, n, mode = writes[i]
        try:
            outcomes[i] = write_table(_frame(spark, start, n), uri, mode=mode)
        except Exception as e:  # the caller's assertions say which kinds are acceptable
            outcomes[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in writes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def _versions_in_log(uri: str) -> dict[str, int]:
    """Staging folder -> version, from the commit files themselves."""
    import json

    out = {}
    for f in sorted((Path(uri) / "_delta_log").glob("*.json")):
        info = json.loads(f.read_text().splitlines()[0])["commitInfo"]
        out[info["sparkdl.staging"]] = int(f.stem)
    return out


def test_racing_appends_both_land_and_each_reports_its_own_version(spark, tmp_path, monkeypatch):
    uri = str(tmp_path / "t")
    write_table(_frame(spark, 0, 10), uri)
    _commit_barrier(monkeypatch)
    outcomes = _race(spark, uri, {0: (1000, 100, "append"), 1: (2000, 101, "append")})
    monkeypatch.undo()

    # Blind appends do not conflict: deltalake retries the loser on top of the winner.
    assert all(not isinstance(r, Exception) for r in outcomes.values()), outcomes
    assert _ids(spark, uri) == sorted([*range(10), *range(1000, 1100), *range(2000, 2101)])
    assert sorted(r.version for r in outcomes.values()) == [1, 2]
    truth = _versions_in_log(uri)
    for i, res in outcomes.items():
        (folder,) = {Path(f).parent.name for f in snapshot(uri, res.version).files} - {
            Path(f).parent.name for f in snapshot(uri, res.version - 1).files}
        assert truth[folder] == res.version, (i, res)
        # The version it reports holds its rows and, time travelled, not the later writer's.
        start, n = (1000, 100) if i == 0 else (2000, 101)
        assert set(range(start, start + n)) <= set(_ids(spark, uri, res.version))
    assert _staging_folders(tmp_path / "t") == {Path(f).parent.name for f in snapshot(uri).files}


def test_racing_append_and_overwrite_never_lose_a_commit(spark, tmp_path, monkeypatch):
    uri = str(tmp_path / "t")
    write_table(_frame(spark, 0, 10), uri)
    _commit_barrier(monkeypatch)
    outcomes = _race(spark, uri, {0: (1000, 20, "append"), 1: (5000, 7, "overwrite")})
    monkeypatch.undo()

    landed = {i: r for i, r in outcomes.items() if not isinstance(r, Exception)}
    failed = {i: r for i, r in outcomes.items() if isinstance(r, Exception)}
    assert all(isinstance(e, CommitConflictError) for e in failed.values()), outcomes
    assert landed, outcomes
    assert table_version(uri) == len(landed)
    # Replaying the landed commits in version order gives the table, and every landed commit
    # is visible at its own version: nothing was lost or reported at a wrong version.
    rows = set(range(10))
    for i, res in sorted(landed.items(), key=lambda kv: kv[1].version):
        rows = rows | set(range(1000, 1020)) if i == 0 else set(range(5000, 5007))
        assert set(_ids(spark, uri, res.version)) == rows, (i, res)
    assert set(_ids(spark, uri)) == rows
    # The loser's files are gone; the winners' stay.
    live = {Path(f).parent.name for v in range(table_version(uri) + 1) for f in snapshot(uri, v).files}
    assert _staging_folders(tmp_path / "t") == live


# ---------------------------------------------------------------------------------------
# Types, partition values, nullability, paths
# ---------------------------------------------------------------------------------------
def test_timestamp_columns_and_partitions_round_trip(spark, tmp_path):
    from datetime import datetime, timezone

    from deltalake import DeltaTable

    uri = str(tmp_path / "t")
    zone = spark.conf.get("spark.sql.session.timeZone")
    # The session zone is not UTC, so a zone slip in either direction shows.
    spark.conf.set("spark.sql.session.timeZone", "America/New_York")
    try:
        df = spark.sql(
            "select 1L id, timestamp'2024-01-02 03:04:05.123456+00:00' ts, timestamp'2024-07-01 12:00:00+00:00' tp "
            "union all select 2L, timestamp'2024-06-30 23:59:59+00:00', cast(null as timestamp)"
        )
        write_table(df, uri, partition_by=["tp"])
        got = {r["id"]: (r["ts"], r["tp"]) for r in read_table(spark, uri).collect()}
        spark.conf.set("spark.sql.session.timeZone", "UTC")
        got_utc = {r["id"]: (r["ts"], r["tp"]) for r in read_table(spark, uri).collect()}
    finally:
        spark.conf.set("spark.sql.session.timeZone", zone)

    utc = timezone.utc
    want = {
        1: (datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=utc), datetime(2024, 7, 1, 12, tzinfo=utc)),
        2: (datetime(2024, 6, 30, 23, 59, 59, tzinfo=utc), None),
    }
    # pyspark hands back naive datetimes in this process's local zone
    # whatever the session zone: reads under either session zone give the same instants.
    assert got == got_utc
    assert {k: tuple(None if t is None else t.astimezone(utc) for t in v) for k, v in got_utc.items()} == want
    by_deltalake = DeltaTable(uri).to_pyarrow_table().to_pylist()
    assert {r["id"]: (r["ts"], r["tp"]) for r in by_deltalake} == want
    snap = snapshot(uri)
    assert snap.schema.field("ts").type == pa.timestamp("us", tz="UTC")
    by_pyarrow = pa.concat_tables([pq.read_table(f) for f in snap.files]).to_pylist()
    assert {r["id"]: r["ts"].replace(tzinfo=utc) for r in by_pyarrow} == {k: v[0] for k, v in want.items()}


PARTITION_VALUES = ["x%y", "a/b", "100%25", "a:b", "k=v", "a b", "é", "*[?]{}", None]


def test_partition_values_that_hive_escapes_round_trip(spark, tmp_path):
    from deltalake import DeltaTable

    uri = str(tmp_path / "t")
    df = spark.createDataFrame(list(enumerate(PARTITION_VALUES)), "id long, p string")
    write_table(df, uri, partition_by=["p"])
    want = dict(enumerate(PARTITION_VALUES))
    assert {r["id"]: r["p"] for r in read_table(spark, uri).collect()} == want
    assert {r["id"]: r["p"] for r in DeltaTable(uri).to_pyarrow_table().to_pylist()} == want
    snap = snapshot(uri)
    by_pyarrow = {}
    for f, pv in zip(snap.files, snap.partition_values):
        for rid in pq.read_table(f).column("id").to_pylist():
            by_pyarrow[rid] = pv["p"]
    assert by_pyarrow == want


def test_nested_columns_are_written_and_read(spark, tmp_path):
    uri = str(tmp_path / "t")
    df = spark.sql(
        "select id, named_struct('a', id, 'b', cast(id as string)) s, map('k', id) m, array(id, id) xs "
        "from range(4)"
    )
    write_table(df, uri)
    rows = sorted(read_table(spark, uri).collect(), key=lambda r: r["id"])
    assert [(r["s"]["a"], r["s"]["b"], r["m"]["k"], list(r["xs"])) for r in rows] == [
        (i, str(i), i, [i, i]) for i in range(4)
    ]


def test_unsizable_column_type_is_named():
    from sparkdl._delta_commit import estimated_row_bytes as _estimated_row_bytes

    schema = pa.schema([("ok", pa.int64()), ("u", pa.dense_union([pa.field("a", pa.int32())]))])
    with pytest.raises(ValueError, match=r"column 'u' has type dense_union"):
        _estimated_row_bytes(schema)
    nested = pa.schema([("s", pa.struct([("a", pa.int64()), ("b", pa.list_(pa.float32()))])),
                        ("f", pa.list_(pa.int8(), 64)), ("m", pa.map_(pa.string(), pa.int32()))])
    assert _estimated_row_bytes(nested) == (8 + 16 * 4) + 64 + 16 * (32 + 4)


def test_non_nullable_columns_are_checked_and_recorded(spark, tmp_path):
    from deltalake import DeltaTable

    schema = DatasetSchema(
        name="strict",
        columns=(ColumnSpec(name="id", type="int64", nullable=False), ColumnSpec(name="v", type="string", nullable=False)),
    )
    uri = tmp_path / "t"
    with pytest.raises(SchemaMismatchError, match="column 'v' is declared non-nullable but has 2 nulls"):
        write_table(spark.createDataFrame([(1, "a"), (2, None), (3, None)], "id long, v string"), str(uri), schema=schema)
    assert not table_exists(str(uri)) and _staging_folders(uri) == set()

    write_table(spark.createDataFrame([(1, "a")], "id long, v string"), str(uri), schema=schema)
    assert [f.nullable for f in snapshot(str(uri)).schema] == [False, False]
    assert [c.nullable for c in snapshot(str(uri)).dataset_schema.columns] == [False, False]
    # An append without a schema is held to the table's declared nullability.
    with pytest.raises(SchemaMismatchError, match="column 'v' is declared non-nullable but has 1 nulls"):
        write_table(spark.createDataFrame([(2, None)], "id long, v string"), str(uri), mode="append")
    loose = DatasetSchema(name="loose", columns=(ColumnSpec(name="id", type="int64"), ColumnSpec(name="v", type="string")))
    with pytest.raises(SchemaMismatchError, match="column 'v' is declared non-nullable but has 1 nulls"):
        write_table(spark.createDataFrame([(2, None)], "id long, v string"), str(uri), mode="append", schema=loose)
    assert table_version(str(uri)) == 0
    write_table(spark.createDataFrame([(2, "b")], "id long, v string"), str(uri), mode="append")
    assert DeltaTable(str(uri)).to_pyarrow_table().sort_by("id").to_pydict() == {"id": [1, 2], "v": ["a", "b"]}
    assert _ids(spark, str(uri)) == [1, 2]


def test_table_paths_with_glob_characters(spark, tmp_path):
    uri = str(tmp_path / "t[1]{a,b}*")
    write_table(_frame(spark, 0, 6), uri, partition_by=["part"])
    write_table(_frame(spark, 6, 3), uri, mode="append")
    assert _ids(spark, uri) == list(range(9))


def test_no_spark_markers_or_checksums_in_the_table(spark, tmp_path):
    uri = tmp_path / "t"
    write_table(_frame(spark, 0, 6), str(uri), partition_by=["part"])
    leftovers = [p.name for p in uri.rglob("*") if p.is_file() and not p.name.endswith((".parquet", ".json"))]
    assert leftovers == []


def test_cleanup_staging_removes_only_old_unreferenced_folders(spark, tmp_path):
    import time

    from sparkdl.lakehouse import cleanup_staging

    table = tmp_path / "t"
    uri = str(table)
    write_table(_frame(spark, 0, 5), uri)
    write_table(_frame(spark, 5, 5), uri, mode="overwrite")  # v0's folder is still needed for time travel
    committed = _staging_folders(table)
    assert len(committed) == 2
    # What a driver killed between the Spark write and the commit leaves behind:
    old = table / "w-20000101000000-deadbeef0000"
    young = table / f"w-{time.strftime('%Y%m%d%H%M%S', time.gmtime())}-cafe00000000"
    for folder in (old, young):
        folder.mkdir()
        (folder / "part-00000.parquet").write_bytes(b"partial")

    assert cleanup_staging(uri, dry_run=True) == [str(old)]
    assert old.exists()
    assert cleanup_staging(uri) == [str(old)]
    assert _staging_folders(table) == committed | {young.name}
    assert _ids(spark, uri, 0) == list(range(5)) and _ids(spark, uri) == list(range(5, 10))
    assert cleanup_staging(uri, older_than=0) == [str(young)]
    assert _staging_folders(table) == committed
