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


def test_concurrent_appends_never_lose_a_commit(spark, tmp_path):
    uri = str(tmp_path / "t")
    write_table(_frame(spark, 0, 10), uri)
    outcomes: dict[int, object] = {}
    barrier = threading.Barrier(2)

    def append(i: int) -> None:
        df = _frame(spark, 1000 * (i + 1), 100 + i)
        barrier.wait()
        try:
            outcomes[i] = write_table(df, uri, mode="append")
        except Exception as e:  # the assertion below says which kinds are acceptable
            outcomes[i] = e

    threads = [threading.Thread(target=append, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    landed = [i for i, r in outcomes.items() if not isinstance(r, Exception)]
    lost = [i for i, r in outcomes.items() if isinstance(r, Exception)]
    assert all(isinstance(outcomes[i], CommitConflictError) for i in lost), outcomes
    assert landed, f"neither append landed: {outcomes}"
    expected = list(range(10)) + [x for i in landed for x in range(1000 * (i + 1), 1000 * (i + 1) + 100 + i)]
    assert _ids(spark, uri) == sorted(expected)
    # Each landed write reports its own version.
    versions = sorted(outcomes[i].version for i in landed)
    assert versions == list(range(1, 1 + len(landed)))
    assert table_version(uri) == len(landed)
    assert _staging_folders(tmp_path / "t") == {Path(f).parent.name for f in snapshot(uri).files}


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
