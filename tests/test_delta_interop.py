"""Delta interoperability with delta-spark, both directions.

delta-spark runs in its own process (storage/delta_spark_side.py) with its jars on Spark's
classpath; the suite's shared ``spark`` stays jar-free. No delta-spark release runs on Spark
4.3 yet, so that process uses the pyspark delta-spark was built for (docs/storage.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from storage_fixtures import ROOT, require

pytestmark = pytest.mark.integration


def _norm(rows) -> list:
    return sorted(json.loads(json.dumps([list(r) for r in rows])), key=repr)


@pytest.fixture(scope="module")
def interop(spark, tmp_path_factory):
    """sparkdl writes a table (two versions); one delta-spark session reads it and writes its own."""
    from storage.jars import classpath, delta_pyspark

    from sparkdl.lakehouse import read_table, write_table

    base = tmp_path_factory.mktemp("interop")
    ours = str(base / "sparkdl_table")
    df = spark.range(0, 40, numPartitions=2).selectExpr("id", "CAST(id * 0.5 AS DOUBLE) AS x", "CAST(id AS STRING) AS s")
    v0 = write_table(df, ours, mode="overwrite").version
    v1 = write_table(df.selectExpr("id + 40 AS id", "x", "s"), ours, mode="append").version
    spec = {"jars": require(classpath, "delta"), "read": {"path": ours, "versions": [v0, v1]},
            "write": str(base / "delta_spark")}
    (base / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(require(delta_pyspark)), "SPARK_LOCAL_IP": "127.0.0.1"}
    env.pop("SPARK_HOME", None)
    proc = subprocess.run([sys.executable, str(ROOT / "storage" / "delta_spark_side.py"), str(base / "spec.json"),
                           str(base / "out.json")], capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((base / "out.json").read_text())
    ours_rows = {v: _norm(read_table(spark, ours, v).collect()) for v in (v0, v1)}
    return {"out": out, "ours": ours, "v": (v0, v1), "ours_rows": ours_rows, "base": base}


def test_delta_spark_reads_a_sparkdl_table_with_identical_rows(interop):
    read = interop["out"]["read"]
    v0, v1 = interop["v"]
    assert read["columns"] == ["id", "x", "s"]
    assert _norm(read["latest"]) == interop["ours_rows"][v1] and len(read["latest"]) == 80
    assert _norm(read["versions"][str(v0)]) == interop["ours_rows"][v0] and len(read["versions"][str(v0)]) == 40
    assert [v for v, _ in read["history"]] == [v0, v1]


def test_sparkdl_reads_a_table_merged_and_optimized_by_delta_spark(spark, interop):
    import torch

    from sparkdl.data import LoaderConfig, TableLoader
    from sparkdl.lakehouse import read_table, snapshot

    written = interop["out"]["write"]["merged"]
    assert written["history"] == ["WRITE", "MERGE", "OPTIMIZE"]
    uri = str(interop["base"] / "delta_spark" / "merged")
    expected = _norm(written["rows"])
    assert len(expected) == 150 and snapshot(uri).version == 2
    assert _norm(read_table(spark, uri).collect()) == expected
    with TableLoader(uri, config=LoaderConfig(batch_size=10, shuffle=False, drop_last=False)) as loader:
        batches = list(loader)
    got = sorted(zip(torch.cat([b["id"] for b in batches]).tolist(), torch.cat([b["x"] for b in batches]).tolist()))
    assert got == sorted((r[0], r[1]) for r in expected)


def test_rows_hidden_by_deletion_vectors_never_reach_training(interop):
    from sparkdl.data import TableLoader
    from sparkdl.errors import UnsupportedTableFeatureError
    from sparkdl.lakehouse import snapshot

    written = interop["out"]["write"]["dv"]
    assert "deletionVectors" in written["features"] and len(written["rows"]) == 90
    uri = str(interop["base"] / "delta_spark" / "dv")
    for read in (lambda: snapshot(uri), lambda: TableLoader(uri)):
        with pytest.raises(UnsupportedTableFeatureError, match="'deletionVectors'.*REORG TABLE"):
            read()
    before_delete = snapshot(uri, 1)  # the feature is on, but no row is deleted yet: readable
    assert before_delete.num_rows == 100


def test_column_mapping_is_refused_naming_the_feature(spark, interop):
    from sparkdl.errors import UnsupportedTableFeatureError
    from sparkdl.lakehouse import read_table

    written = interop["out"]["write"]["mapped"]
    assert written["columns"] == ["id", "renamed_x"]
    uri = str(interop["base"] / "delta_spark" / "mapped")
    with pytest.raises(UnsupportedTableFeatureError, match="'columnMapping'.*mode=name"):
        read_table(spark, uri)
