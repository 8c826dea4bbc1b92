"""A real HDFS (NameNode + DataNode on 127.0.0.1, from Apache Hadoop's jars) under sparkdl.

Spark reaches it through the HDFS client inside pyspark's own jars; Python (driver, ranks,
lakehouse files) through hdfs-native. Nothing here needs a jar on Spark's classpath, so the
suite's shared ``spark`` session is used as it is.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pyarrow as pa
import pytest

from storage_fixtures import ROOT, assert_pipeline_landed, pipeline_env

pytestmark = pytest.mark.integration


def test_daemons_listen_on_loopback_only(hdfs_uri):
    pids = _java_children_of_hdfs(hdfs_uri)
    assert len(pids) == 2, "expected one NameNode and one DataNode process"
    addresses = _listening_addresses(pids)
    assert len(addresses) >= 4, addresses  # NameNode RPC + HTTP, DataNode transfer + IPC + HTTP
    loopback = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}
    assert all(a in loopback for a in addresses), f"a daemon listens beyond 127.0.0.1: {addresses}"


def _listening_addresses(pids: list[int]) -> list[str]:
    """Hex local addresses (as /proc/net/tcp* spells them) of the LISTEN sockets of ``pids``."""
    inodes = set()
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[len("socket:["):-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: TCP_LISTEN
                found.append(fields[1].split(":")[0])
    return found


def _java_children_of_hdfs(uri: str) -> list[int]:
    port = uri.rsplit(":", 1)[1]
    pids = []
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            args = open(cmdline, "rb").read().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"java") and any(a.endswith((b".NameNode", b".DataNode")) for a in args):
            conf = next((a for a in args if b"conf:" in a or a.endswith(b"/conf")), b"")
            site = conf.split(b":")[0].decode() + "/core-site.xml"
            if os.path.exists(site) and f":{port}<" in open(site).read():
                pids.append(int(cmdline.split("/")[2]))
    return pids


def test_lakehouse_files_round_trip_through_hdfs_native(hdfs_uri):
    from sparkdl import _fs

    base = f"{hdfs_uri}/files"
    _fs.write_text(f"{base}/a/marker.json", '{"v": 1}')
    _fs.write_text(f"{base}/a/marker.json", '{"v": 2}')  # replaces: HDFS rename with OVERWRITE
    assert _fs.read_text(f"{base}/a/marker.json") == '{"v": 2}'
    assert _fs.listdir(f"{base}/a") == ["marker.json"], "no temporary file is left behind"
    assert _fs.is_dir(f"{base}/a") and not _fs.exists(f"{base}/missing")
    _fs.delete(f"{base}/a")
    assert not _fs.exists(f"{base}/a")


def test_spark_shards_delta_commit_and_rank_streams_on_hdfs(spark, hdfs_uri):
    """Spark writes the Parquet shards, the driver commits with deltalake, two ranks stream it back."""
    import torch

    from sparkdl.data import LoaderConfig, TableLoader
    from sparkdl.lakehouse import read_table, snapshot, table_version, write_table

    uri = f"{hdfs_uri}/lake/tables/points"
    df = spark.range(0, 600, numPartitions=3).selectExpr("id", "CAST(id % 7 AS DOUBLE) AS x")
    first = write_table(df, uri, mode="overwrite")
    write_table(spark.range(600, 700, numPartitions=1).selectExpr("id", "CAST(id % 7 AS DOUBLE) AS x"), uri,
                mode="append")
    assert table_version(uri) == first.version + 1
    snap = snapshot(uri)
    assert snap.files and all(f.startswith(hdfs_uri + "/lake/tables/points/") for f in snap.files)
    assert read_table(spark, uri, first.version).count() == 600

    seen = []
    for rank in range(2):
        with TableLoader(uri, rank=rank, world_size=2, config=LoaderConfig(batch_size=50, seed=3)) as loader:
            assert loader.version == snap.version
            seen += [b["id"] for b in loader]
    ids = torch.cat(seen).tolist()
    assert sorted(ids) == list(range(700)), "every row reaches exactly one rank"


def test_delta_table_written_by_deltalake_alone_on_hdfs(hdfs_uri):
    """The driver-only path (no Spark): deltalake's own HDFS support writes, sparkdl reads."""
    import deltalake

    from sparkdl.lakehouse import snapshot

    uri = f"{hdfs_uri}/lake/tables/small"
    deltalake.write_deltalake(uri, pa.table({"k": [1, 2, 3]}), mode="overwrite")
    snap = snapshot(uri)
    assert snap.num_rows == 3 and snap.files[0].startswith(uri)


@pytest.mark.slow
def test_pipeline_job_end_to_end_on_hdfs(hdfs_uri, tmp_path):
    """jobs/pipeline.py --lakehouse hdfs://...: tables, checkpoints, model and predictions all on HDFS."""
    lake = f"{hdfs_uri}/pipeline-lake"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--lakehouse", lake, "--sample-fraction", "0.01",
         "--epochs", "1", "--batch-size", "128", "--num-ranks", "2"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path, env=pipeline_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_pipeline_landed(lake, proc.stdout)
    assert os.listdir(tmp_path) == [] or set(os.listdir(tmp_path)) <= {"spark-warehouse", "metastore_db", "derby.log"}, \
        f"the job wrote to the local working folder: {os.listdir(tmp_path)}"



def test_missing_maven_fails_with_one_line_naming_it(tmp_path):
    """`make jars` on a machine without Maven and without the cache: one line, the tool and the fix."""
    env = {**os.environ, "SPARKDL_JARS_CACHE": str(tmp_path / "empty"), "PATH": "/nonexistent",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "storage.jars", "hdfs"], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: Maven (mvn) is needed once to fetch the 'hdfs' storage-test jars into {tmp_path / 'empty'}: "
        "install it (apt-get install maven) and rerun `make jars`"
    ]
