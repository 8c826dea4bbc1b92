"""A real S3 endpoint (moto's server on 127.0.0.1) under sparkdl.

Python (deltalake, pyarrow, the loader, lakehouse files) reaches it through the standard AWS
variables (AWS_ENDPOINT_URL, keys, region); Spark through s3a:// with hadoop-aws and the AWS
SDK bundle, which only the pipeline job's own session loads, so the suite's shared ``spark``
stays jar-free.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pyarrow as pa
import pytest

from storage_fixtures import ROOT, assert_pipeline_landed, pipeline_env, spark_profile

pytestmark = pytest.mark.integration


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    for key, value in s3_endpoint.env().items():
        monkeypatch.setenv(key, value)
    from sparkdl import _fs

    _fs._fs_for.cache_clear()  # filesystems read the variables when they are made
    yield s3_endpoint
    _fs._fs_for.cache_clear()


def test_delta_commit_snapshot_and_loader_on_s3(s3_env):
    import deltalake
    import torch

    from sparkdl import _fs
    from sparkdl.data import LoaderConfig, TableLoader
    from sparkdl.lakehouse import snapshot

    uri = f"s3a://{s3_env.bucket}/driver/tables/t"
    deltalake.write_deltalake(_fs.pyarrow_uri(uri), pa.table({"id": list(range(300))}), mode="overwrite")
    deltalake.write_deltalake(_fs.pyarrow_uri(uri), pa.table({"id": list(range(300, 400))}), mode="append")
    snap = snapshot(uri)
    assert (snap.version, snap.num_rows) == (1, 400)
    ids = []
    for rank in range(2):
        with TableLoader(uri, rank=rank, world_size=2, config=LoaderConfig(batch_size=40, seed=1)) as loader:
            ids += torch.cat([b["id"] for b in loader]).tolist()
    assert sorted(ids) == list(range(400))
    # Lakehouse files (markers, model files) through pyarrow.fs on the same endpoint.
    _fs.write_text(f"s3a://{s3_env.bucket}/driver/models/m/v1/_COMMITTED", "ok")
    assert _fs.read_text(f"s3a://{s3_env.bucket}/driver/models/m/v1/_COMMITTED") == "ok"
    assert _fs.listdir(f"s3a://{s3_env.bucket}/driver/models/m/v1") == ["_COMMITTED"]


def test_the_endpoint_refuses_a_second_put_of_a_log_file(s3_env):
    """deltalake commits a version by a PUT with If-None-Match: *; the endpoint must refuse a second one."""
    import boto3
    from botocore.exceptions import ClientError

    s3 = boto3.client("s3", endpoint_url=s3_env.url)
    key = "cond/_delta_log/00000000000000000000.json"
    s3.put_object(Bucket=s3_env.bucket, Key=key, Body=b"{}", IfNoneMatch="*")
    with pytest.raises(ClientError, match="PreconditionFailed|412"):
        s3.put_object(Bucket=s3_env.bucket, Key=key, Body=b"{}", IfNoneMatch="*")


_APPENDER = """
import sys, time, deltalake, pyarrow as pa
uri, who, n, start = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
while time.time() < start:
    time.sleep(0.001)
for i in range(n):
    try:
        deltalake.write_deltalake(uri, pa.table({"writer": [who], "i": [i]}), mode="append")
        print("ok", i, flush=True)
    except Exception as e:
        print("failed", i, type(e).__name__, str(e).splitlines()[0], flush=True)
"""


def test_concurrent_appends_on_s3_all_land_or_fail_loudly(s3_env, tmp_path):
    """Two processes append at the same moment: every append either lands or reports a conflict."""
    import deltalake

    uri = f"s3://{s3_env.bucket}/concurrent/t"
    deltalake.write_deltalake(uri, pa.table({"writer": [0], "i": [0]}), mode="overwrite")
    script = tmp_path / "append.py"
    script.write_text(_APPENDER)
    start = time.time() + 3  # both interpreters are up and waiting by then
    env = pipeline_env(**s3_env.env())
    procs = [subprocess.Popen([sys.executable, str(script), uri, str(w), "5", str(start)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for w in (1, 2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    landed = {(w, int(line.split()[1])) for w, out in zip((1, 2), outputs) for line in out.splitlines()
              if line.startswith("ok ")}
    failed = [line for out in outputs for line in out.splitlines() if line.startswith("failed ")]
    assert len(landed) + len(failed) == 10, outputs
    for line in failed:  # a refused commit says why, naming the conflict
        assert "Commit" in line or "conflict" in line.lower(), line
    dt = deltalake.DeltaTable(uri)
    rows = set(zip(dt.to_pyarrow_table()["writer"].to_pylist(), dt.to_pyarrow_table()["i"].to_pylist()))
    assert rows - {(0, 0)} == landed, "an append reported as landed is missing, or one reported failed is there"
    assert dt.version() == len(landed), "each landed append is its own version"


@pytest.mark.slow
def test_pipeline_job_end_to_end_on_s3a(s3_env, tmp_path):
    """jobs/pipeline.py --lakehouse s3a://lake/...: Spark on s3a, deltalake and the ranks on the same endpoint."""
    lake = f"s3a://{s3_env.bucket}/pipeline-lake"
    profile = spark_profile(tmp_path / "s3.conf", s3_env.spark_conf())
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--lakehouse", lake, "--profile", str(profile),
         "--sample-fraction", "0.01", "--epochs", "1", "--batch-size", "128", "--num-ranks", "2"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path, env=pipeline_env(**s3_env.env()),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_pipeline_landed(lake, proc.stdout)
