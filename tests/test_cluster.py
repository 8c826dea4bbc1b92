"""Cluster profiles: the GPU discovery script, and a real Spark standalone cluster on 127.0.0.1
(Master and Worker started through ``spark-class``, a 2-rank training job submitted with
``spark-submit``, then both stopped).

The cluster test proves the job ran on the cluster, not in a local master inside the
spark-submit driver: the Master lists the application as completed, and the Worker launched
executors for it that ran its tasks."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DISCOVERY = ROOT / "spark-conf" / "gpu-discovery.sh"
APP_NAME = "sparkdl-train"  # jobs/train.py's app name


# ----- GPU discovery script ------------------------------------------------------------------------
def _discover(tmp_path: Path, *, nvidia_smi: str | None, visible: str | None) -> subprocess.CompletedProcess:
    """Run the discovery script with a PATH holding only bash and, if given, a fake nvidia-smi."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "bash").symlink_to(shutil.which("bash"))
    if nvidia_smi is not None:
        (bin_dir / "nvidia-smi").write_text(f"#!{shutil.which('bash')}\n{nvidia_smi}\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    env = {"PATH": str(bin_dir), "HOSTNAME": "node1"}
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    return subprocess.run([str(DISCOVERY)], env=env, capture_output=True, text=True, timeout=30)


def test_discovery_lists_nvidia_smi_indexes(tmp_path):
    proc = _discover(tmp_path, nvidia_smi="printf '0\\n1\\n2\\n'", visible=None)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"name": "gpu", "addresses": ["0", "1", "2"]}


def test_discovery_lists_the_visible_devices_and_they_map_to_cuda_ordinals(tmp_path, monkeypatch):
    from sparkdl._gpu import cuda_ordinal

    # nvidia-smi would list all four GPUs; the executor may use only the two the manager gave it.
    proc = _discover(tmp_path, nvidia_smi="printf '0\\n1\\n2\\n3\\n'", visible="2, 3")
    assert proc.returncode == 0, proc.stderr
    addresses = json.loads(proc.stdout)["addresses"]
    assert addresses == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert [cuda_ordinal(a) for a in addresses] == [0, 1]
    uuids = _discover(tmp_path / "u", nvidia_smi=None, visible="GPU-1a2b,GPU-3c4d")
    assert json.loads(uuids.stdout)["addresses"] == ["GPU-1a2b", "GPU-3c4d"]


def test_discovery_without_nvidia_smi_fails_with_a_clear_message(tmp_path):
    proc = _discover(tmp_path, nvidia_smi=None, visible=None)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "nvidia-smi is not on PATH and CUDA_VISIBLE_DEVICES is unset" in proc.stderr
    assert "node1" in proc.stderr
    broken = _discover(tmp_path / "b", nvidia_smi="echo 'NVIDIA-SMI has failed: no driver'; exit 9", visible=None)
    assert broken.returncode == 1 and "NVIDIA-SMI has failed: no driver" in broken.stderr


# ----- standalone cluster ---------------------------------------------------------------------------
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
        # The REST submission server would take the fixed port 6066: off, so parallel runs can't clash.
        SPARK_MASTER_OPTS="-Dspark.master.rest.enabled=false",
        PYSPARK_PYTHON=sys.executable,
        PYSPARK_DRIVER_PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
    )
    return env


def _wait_for_log(path: Path, pattern: str, proc: subprocess.Popen, timeout: float = 120.0) -> re.Match:
    """The first match of ``pattern`` in a daemon's log (ports are chosen by the daemon: no race)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = re.search(pattern, path.read_text(errors="replace")) if path.exists() else None
        if m:
            return m
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    raise RuntimeError(f"no {pattern!r} in {path} after {timeout}s (exit code {proc.poll()}):\n"
                       f"{path.read_text(errors='replace')[-3000:] if path.exists() else ''}")


def _master_status(ui: str) -> dict:
    with urllib.request.urlopen(f"{ui}/json/", timeout=5) as r:
        return json.load(r)


def _wait_for_workers(ui: str, n: int, timeout: float = 120.0) -> dict:
    deadline = time.time() + timeout
    last: dict = {}
    while time.time() < deadline:
        try:
            last = _master_status(ui)
            if int(last.get("aliveworkers", 0)) >= n:
                return last
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"standalone cluster did not get {n} worker(s) in {timeout}s; last status {last}")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


class _Cluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.env = _cluster_env(tmp)
        self.procs: list[subprocess.Popen] = []
        self._logs: list = []
        self.ports: list[int] = []

    def _start(self, name: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.tmp / f"{name}.log"
        f = open(log, "w")
        self._logs.append(f)
        # spark-class execs java: the Popen pid is the daemon, in its own process group.
        p = subprocess.Popen([str(_spark_home() / "bin" / "spark-class"), *args], env=self.env,
                             stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p, log

    def start(self) -> None:
        master, log = self._start("master", ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                                             "--port", "0", "--webui-port", "0"])
        port = int(_wait_for_log(log, r"Starting Spark master at spark://127\.0\.0\.1:(\d+)", master).group(1))
        ui_port = int(_wait_for_log(log, r"Successfully started service 'MasterUI' on port (\d+)", master).group(1))
        self.master, self.ui = f"spark://127.0.0.1:{port}", f"http://127.0.0.1:{ui_port}"
        worker, wlog = self._start("worker", ["org.apache.spark.deploy.worker.Worker", self.master, "--host",
                                              "127.0.0.1", "--port", "0", "--webui-port", "0",
                                              "--cores", "2", "--memory", "3g"])
        self.ports = [port, ui_port]
        _wait_for_workers(self.ui, 1)
        self.ports.append(int(_wait_for_log(wlog, r"Successfully started service 'sparkWorker' on port (\d+)",
                                            worker).group(1)))

    def stop(self) -> None:
        for p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
        # The Worker's executors (and their Python workers) share its process group and exit
        # after it, once they notice: give them time, then make sure.
        deadline = time.time() + 60
        while time.time() < deadline and any(_group_alive(p.pid) for p in self.procs):
            time.sleep(0.5)
        for p in self.procs:
            if _group_alive(p.pid):
                os.killpg(p.pid, signal.SIGKILL)
        for f in self._logs:
            f.close()
        self._logs = []


@pytest.fixture(scope="module")
def standalone_cluster(tmp_path_factory):
    cluster = _Cluster(tmp_path_factory.mktemp("standalone"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()  # idempotent: the test stops it first to check that nothing is left


@pytest.mark.integration
@pytest.mark.slow
def test_two_rank_training_job_on_standalone_cluster(standalone_cluster, spark, tmp_path):
    from sparkdl.etl import run_digits_etl
    from sparkdl.registry import get_model_version

    cluster = standalone_cluster
    lakehouse = tmp_path / "lakehouse"
    run_digits_etl(spark=spark, lakehouse=str(lakehouse))
    cmd = [
        str(_spark_home() / "bin" / "spark-submit"),
        "--master", cluster.master,
        "--properties-file", str(ROOT / "spark-conf" / "standalone.conf"),
        "--conf", "spark.executor.memory=1g",
        "--conf", "spark.cores.max=2",
        str(ROOT / "jobs" / "train.py"),
        "--lakehouse", str(lakehouse),
        "--train-table", "digits_train", "--valid-table", "digits_valid",
        "--model", "digits_cnn", "--model-name", "digits_standalone",
        "--epochs", "1", "--batch-size", "64", "--num-ranks", "2",
    ]
    proc = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, f"spark-submit exited {proc.returncode}:\n{tail}"
    mv = get_model_version(str(lakehouse), "digits_standalone")
    assert mv.version == 1
    assert mv.lineage, "published model must record its input tables"

    # The application registered with this Master (a local master never would) and finished.
    status = _master_status(cluster.ui)
    apps = [a for a in status.get("completedapps", []) if a.get("name") == APP_NAME]
    assert len(apps) == 1, f"the Master did not run {APP_NAME}: {status}\n{tail}"
    assert apps[0]["state"] == "FINISHED", apps[0]
    # The Worker launched executors for it: the ranks ran there, as barrier tasks.
    executors = [p for p in (cluster.tmp / "work" / apps[0]["id"]).iterdir() if p.name.isdigit()]
    assert executors, f"the Worker launched no executor for {apps[0]['id']}"
    ran = sum(len(re.findall(r"Executor: Finished task", (p / "stderr").read_text(errors="replace")))
              for p in executors if (p / "stderr").exists())
    assert ran >= 2, "the executors must have run the job's tasks, the 2 ranks among them"

    cluster.stop()
    assert all(p.poll() is not None for p in cluster.procs)
    deadline = time.time() + 30  # killed processes linger as zombies until init reaps them
    while time.time() < deadline and any(_group_alive(p.pid) for p in cluster.procs):
        time.sleep(0.5)
    left = subprocess.run(["ps", "-o", "pid,pgid,cmd", "--sid", ",".join(str(p.pid) for p in cluster.procs)],
                          capture_output=True, text=True).stdout
    assert not any(_group_alive(p.pid) for p in cluster.procs), f"processes of the cluster outlived its stop:\n{left}"
    assert not any(_port_open(port) for port in cluster.ports), "a Master/Worker port is still open"
