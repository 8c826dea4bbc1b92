"""Storage fixtures: one HDFS and one S3 endpoint per test session, both on 127.0.0.1.

Pulled into tests/conftest.py with one import line. A missing prerequisite (Maven, a jar, Java,
a daemon that does not come up) fails the test that needs it with one line naming it; the
jars are fetched by `make jars`, which `make test` runs first (docs/storage.md).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # storage/ (jar cache, HDFS launcher) lives beside sparkdl/
    sys.path.insert(0, str(ROOT))

__all__ = ["hdfs_uri", "s3_endpoint", "S3Endpoint", "require", "spark_profile", "pipeline_env", "assert_pipeline_landed"]


def require(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; a MissingPrerequisite fails the test with its one line, no traceback."""
    from storage.jars import MissingPrerequisite

    try:
        return fn(*args, **kwargs)
    except MissingPrerequisite as e:
        pytest.fail(str(e), pytrace=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def hdfs_uri(tmp_path_factory) -> str:
    """``hdfs://127.0.0.1:<port>`` of a NameNode + DataNode started for this test session."""
    from storage.minihdfs import MiniHdfs

    cluster = MiniHdfs(tmp_path_factory.mktemp("hdfs"))
    require(cluster.start)
    yield cluster.uri
    cluster.stop()


@dataclass(frozen=True)
class S3Endpoint:
    """A local S3-compatible server (moto) and one bucket in it."""

    url: str
    bucket: str
    access_key: str = "testing"
    secret_key: str = "testing"
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        """Variables deltalake (object_store), pyarrow's S3FileSystem and boto3 all read."""
        return {
            "AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region, "AWS_ALLOW_HTTP": "true", "AWS_EC2_METADATA_DISABLED": "true",
        }

    def storage_options(self) -> dict[str, str]:
        return {k: v for k, v in self.env().items() if k != "AWS_EC2_METADATA_DISABLED"}

    def spark_conf(self) -> dict[str, str]:
        """Spark's s3a:// on this endpoint: hadoop-aws + the AWS SDK bundle (make jars) and the endpoint."""
        from storage.jars import classpath

        return {
            "spark.jars": ",".join(require(classpath, "s3a")),
            "spark.hadoop.fs.s3a.endpoint": self.url,
            "spark.hadoop.fs.s3a.endpoint.region": self.region,
            "spark.hadoop.fs.s3a.access.key": self.access_key,
            "spark.hadoop.fs.s3a.secret.key": self.secret_key,
            "spark.hadoop.fs.s3a.path.style.access": "true",
            "spark.hadoop.fs.s3a.connection.ssl.enabled": "false",
        }


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory) -> S3Endpoint:
    """moto's S3 server on 127.0.0.1 for this test session, with a bucket ``lake``."""
    try:
        import boto3
        import moto  # noqa: F401
    except ImportError as e:
        pytest.fail(f"the S3 tests need moto[server] and boto3 ({e.name} missing): run `make venv`", pytrace=False)
    port = _free_port()
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the moto S3 server did not start on 127.0.0.1:{port}: see {log}", pytrace=False)
            time.sleep(0.3)
    endpoint = S3Endpoint(url=url, bucket="lake")
    boto3.client("s3", endpoint_url=url, aws_access_key_id=endpoint.access_key,
                 aws_secret_access_key=endpoint.secret_key, region_name=endpoint.region).create_bucket(Bucket="lake")
    yield endpoint
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def spark_profile(path: Path, extra: dict[str, str]) -> Path:
    """A spark-submit properties file: spark-conf/local.conf on local[2] plus ``extra``."""
    base = (ROOT / "spark-conf" / "local.conf").read_text()
    lines = [base, "spark.master local[2]", "spark.sql.shuffle.partitions 4"]
    lines += [f"{k} {v}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def pipeline_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    env.update(extra)
    return env


def assert_pipeline_landed(lake: str, summary: str) -> None:
    """The pipeline's tables, checkpoint, model and predictions are all under ``lake``."""
    from sparkdl import _fs
    from sparkdl.lakehouse import Lakehouse, snapshot

    lh = Lakehouse(lake)
    assert f"-> {lh.table('flights_predictions')} v0" in summary, summary
    model = _fs.join(lh.model("flights_delay"), "v1")
    assert _fs.exists(_fs.join(model, "model.safetensors")), f"no model under {model}"
    runs = _fs.listdir(_fs.join(lake, "runs"))
    assert any(_fs.listdir(_fs.join(lake, "runs", r, "checkpoints")) for r in runs), f"no checkpoint under {lake}/runs"
    clean = snapshot(lh.table("flights_clean"))
    preds = snapshot(lh.table("flights_predictions"))
    assert all(f.startswith(lake) for f in clean.files + preds.files)
    assert _rows(preds.files) == _rows(clean.files) > 0, "every clean row is scored once"


def _rows(files: list[str]) -> int:
    """Rows in the Parquet files, from their footers, read through sparkdl._fs (the ranks' path)."""
    import pyarrow.parquet as pq

    from sparkdl import _fs

    total = 0
    for uri in files:
        fs, path = _fs.resolve(uri)
        with fs.open_input_file(path) as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total
