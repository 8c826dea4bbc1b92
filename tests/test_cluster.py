"""A real Spark standalone cluster on 127.0.0.1: Master and Worker started through
``spark-class``, a 2-rank training job submitted with ``spark-submit``, then both stopped."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).parent


def _cluster_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        SPARK_HOME=str(_spark_home()),
        SPARK_LOCAL_IP="127.0.0.1",
        SPARK_LOG_DIR=str(tmp / "logs"),
        SPARK_WORKER_DIR=str(tmp / "work"),
        PYSPARK_PYTHON=sys.executable,
        PYSPARK_DRIVER_PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
    )
    return env


def _wait_for_workers(ui_port: int, n: int, timeout: float = 90.0) -> dict:
    deadline = time.time() + timeout
    last: dict = {}
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/json", timeout=2) as r:
                last = json.load(r)
            if int(last.get("aliveworkers", 0)) >= n:
                return last
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"standalone cluster did not get {n} worker(s) in {timeout}s; last status {last}")


@pytest.fixture(scope="module")
def standalone_cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("standalone")
    env = _cluster_env(tmp)
    spark_class = str(_spark_home() / "bin" / "spark-class")
    port, ui_port, worker_ui = _free_port(), _free_port(), _free_port()
    logs = []
    procs = []
    try:
        master_log = open(tmp / "master.log", "w")
        logs.append(master_log)
        procs.append(subprocess.Popen(
            [spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
             "--port", str(port), "--webui-port", str(ui_port)],
            env=env, stdout=master_log, stderr=subprocess.STDOUT, start_new_session=True,
        ))
        worker_log = open(tmp / "worker.log", "w")
        logs.append(worker_log)
        procs.append(subprocess.Popen(
            [spark_class, "org.apache.spark.deploy.worker.Worker", f"spark://127.0.0.1:{port}",
             "--host", "127.0.0.1", "--cores", "2", "--memory", "3g", "--webui-port", str(worker_ui)],
            env=env, stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True,
        ))
        _wait_for_workers(ui_port, 1)
        yield {"master": f"spark://127.0.0.1:{port}", "env": env, "tmp": tmp}
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        for f in logs:
            f.close()


def test_two_rank_training_job_on_standalone_cluster(standalone_cluster, spark, tmp_path):
    from sparkdl.etl import run_digits_etl
    from sparkdl.registry import get_model_version

    lakehouse = tmp_path / "lakehouse"
    run_digits_etl(spark=spark, lakehouse=str(lakehouse))
    cmd = [
        str(_spark_home() / "bin" / "spark-submit"),
        "--master", standalone_cluster["master"],
        "--properties-file", str(ROOT / "spark-conf" / "standalone.conf"),
        "--conf", "spark.executor.memory=1g",
        "--conf", "spark.cores.max=2",
        str(ROOT / "jobs" / "train.py"),
        "--lakehouse", str(lakehouse),
        "--train-table", "digits_train", "--valid-table", "digits_valid",
        "--model", "digits_cnn", "--model-name", "digits_standalone",
        "--epochs", "1", "--batch-size", "64", "--num-ranks", "2",
    ]
    proc = subprocess.run(cmd, env=standalone_cluster["env"], capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, f"spark-submit exited {proc.returncode}:\n{tail}"
    mv = get_model_version(str(lakehouse), "digits_standalone")
    assert mv.version == 1
    assert mv.lineage, "published model must record its input tables"
