"""A real Spark Connect server and a client venv with only ``pyspark-client``, for tests and benchmarks.

Used by tests/connect_fixtures.py (pytest fixtures) and benchmarks/bench_launch.py --connect; it
imports no pytest and nothing of sparkdl, so both can use it as a plain module.

- :func:`start_connect_server` runs ``spark-submit --class ...SparkConnectServer`` of the main
  environment's pyspark on ``local-cluster[2,1,1024]`` with the ``local-cluster`` profile, gRPC on
  127.0.0.1 only, executors on the same Python (torch + sparkdl) and the checkout on their
  PYTHONPATH. :meth:`ConnectServer.wait_ready` waits until a client runs a 2-task barrier stage
  (so both executors are up); :meth:`ConnectServer.stop` ends the server, its executors and their
  Python workers (one process session).
- :func:`ensure_client_venv` builds (once, cached under ``~/.cache/sparkdl-venvs``) a Python 3.11
  venv holding ``pyspark-client`` and sparkdl's other runtime dependencies, without ``pyspark``,
  ``py4j`` or any jar. sparkdl itself is not installed there: :func:`client_env` puts the checkout
  on PYTHONPATH, so one cached venv serves every checkout.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ROOT", "PYSPARK_CLIENT", "ConnectServer", "ClientVenv", "start_connect_server", "ensure_client_venv",
    "client_requirements", "client_env", "run_client", "run_source", "ClientFailed",
]

ROOT = Path(__file__).resolve().parents[1]
# The newest pyspark-client on PyPI; the server is the main venv's pyspark (4.3). A client a minor
# release behind the server is the usual Connect set-up (the protocol is versioned, not the jars).
PYSPARK_CLIENT = os.environ.get("SPARKDL_PYSPARK_CLIENT", "pyspark-client==4.2.0")
# Connect ships UDFs as cloudpickle of the client's Python; the executors' Python must match it.
CLIENT_PYTHON = (3, 11)
SERVER_CLASS = "org.apache.spark.sql.connect.service.SparkConnectServer"
# Runtime dependencies the client does not need from pyproject.toml (the server side has them).
_NOT_ON_CLIENT = {"pyspark", "py4j", "pyspark-client", "pyspark-connect"}


# ----- the server ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spark_home() -> Path:
    import pyspark  # the main environment's full pyspark: it carries the jars and bin/spark-submit

    return Path(pyspark.__file__).parent


def _port_answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class ConnectServer:
    """A Spark Connect server started by :func:`start_connect_server`."""

    url: str
    port: int
    log_path: Path
    workdir: Path
    process: subprocess.Popen
    started_at: float = field(default_factory=time.time)
    ready_seconds: float | None = None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def _fail(self, what: str) -> RuntimeError:
        return RuntimeError(f"Spark Connect server {self.url}: {what}\n--- tail of {self.log_path} ---\n{self.log_tail()}")

    def wait_ready(self, client_python: Path | str, timeout: float = 300.0) -> float:
        """Wait for the gRPC port, then for a 2-task barrier stage run by ``client_python`` (both
        executors registered). Returns the seconds since the start; raises with the log's tail."""
        deadline = self.started_at + timeout
        while not _port_answers(self.port):
            if self.process.poll() is not None:
                raise self._fail(f"exited with code {self.process.returncode} before listening on port {self.port}")
            if time.time() > deadline:
                raise self._fail(f"port {self.port} did not answer within {timeout:.0f} s")
            time.sleep(0.5)
        left = max(10.0, deadline - time.time())
        try:
            proc = run_client(client_python, PROBE, remote=self.url, timeout=left, check=False)
        except subprocess.TimeoutExpired:
            raise self._fail(f"a 2-task barrier stage did not finish within {left:.0f} s "
                             "(are both executors up?)") from None
        if proc.returncode != 0 or "probe ok" not in proc.stdout:
            raise self._fail(f"the readiness probe failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        self.ready_seconds = time.time() - self.started_at
        return self.ready_seconds

    def descendants(self) -> list[int]:
        """Live processes of the server's session (the server, executors, Python workers)."""
        sid = self.process.pid
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp session ...
            if int(fields[3]) == sid and fields[0] != "Z":
                out.append(int(d.name))
        return out

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the server's process session, SIGKILL what is left after ``timeout``; raises if
        a process of it survives."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.time() + timeout
        while self.descendants() and time.time() < deadline:
            time.sleep(0.5)
        for pid in self.descendants():  # executors or workers that ignored SIGTERM
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        time.sleep(0.5)
        left = self.descendants()
        if left:
            raise RuntimeError(f"Spark Connect server {self.url}: processes {left} still running after stop")

    def __enter__(self) -> "ConnectServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_connect_server(
    workdir: Path,
    *,
    master: str = "local-cluster[2,1,1024]",
    executor_python: str | None = None,
    conf: dict[str, str] | None = None,
) -> ConnectServer:
    """Launch a Spark Connect server (returns at once; call :meth:`ConnectServer.wait_ready`).

    Settings are those of sparkdl's ``local-cluster`` profile (spark-conf/local-cluster.conf) and of
    ``sparkdl.session.spark_session`` for local masters: everything on 127.0.0.1, executors on
    ``executor_python`` (default: this interpreter, which has torch and sparkdl's dependencies),
    log4j from spark-conf/log4j2.properties, UTC. The checkout is on the executors' PYTHONPATH so
    they import the sparkdl under test."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    home = _spark_home()
    python = executor_python or sys.executable
    port = _free_port()
    log4j = ROOT / "spark-conf" / "log4j2.properties"
    pythonpath = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    java_opts = f"-Dlog4j.configurationFile=file:{log4j}"
    settings = {
        "spark.master": master,
        "spark.connect.grpc.binding.address": "127.0.0.1",
        "spark.connect.grpc.binding.port": str(port),
        "spark.connect.grpc.port.maxRetries": "0",
        "spark.driver.host": "127.0.0.1",
        "spark.driver.bindAddress": "127.0.0.1",
        "spark.pyspark.python": python,
        "spark.pyspark.driver.python": python,
        "spark.executorEnv.PYTHONPATH": pythonpath,
        "spark.executorEnv.OMP_NUM_THREADS": "1",
        "spark.executorEnv.SPARK_LOCAL_IP": "127.0.0.1",
        "spark.driver.extraJavaOptions": java_opts,
        "spark.executor.extraJavaOptions": java_opts,
        "spark.sql.session.timeZone": "UTC",
        "spark.default.parallelism": "2",
        **(conf or {}),
    }
    cmd = [str(home / "bin" / "spark-submit"), "--class", SERVER_CLASS, "--name", "sparkdl-connect-tests",
           "--properties-file", str(ROOT / "spark-conf" / "local-cluster.conf")]
    for key, value in settings.items():
        cmd += ["--conf", f"{key}={value}"]
    env = dict(os.environ)
    env.update(
        SPARK_HOME=str(home),
        SPARK_LOCAL_IP="127.0.0.1",
        SPARK_WORKER_DIR=str(workdir / "work"),
        SPARK_LOG_DIR=str(workdir / "logs"),
        SPARK_LOCAL_DIRS=str(workdir / "local"),
        PYSPARK_PYTHON=python,
        PYSPARK_DRIVER_PYTHON=python,
        PYTHONPATH=pythonpath,
        OMP_NUM_THREADS="1",
    )
    env.pop("SPARK_REMOTE", None)  # the server is the cluster; a remote URL would make pyspark a client
    env.pop("SPARK_CONNECT_MODE_ENABLED", None)
    log_path = workdir / "connect-server.log"
    log = open(log_path, "ab")
    try:
        process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=workdir, start_new_session=True)
    finally:
        log.close()
    return ConnectServer(url=f"sc://127.0.0.1:{port}", port=port, log_path=log_path, workdir=workdir, process=process)


# A 2-task barrier stage over Connect: both executors must be up (one core each), and the barrier
# context (allGather) must work through the Connect server's Python workers.
PROBE = textwrap.dedent(
    """
    import os, sys
    from pyspark.sql import SparkSession

    spark = SparkSession.builder.remote(os.environ["SPARK_REMOTE"]).getOrCreate()
    assert sorted(r.id for r in spark.range(4, numPartitions=2).collect()) == [0, 1, 2, 3]

    def stage(batches):
        import pyarrow as pa
        from pyspark import BarrierTaskContext

        ctx = BarrierTaskContext.get()
        for _ in batches:
            pass
        pids = ctx.allGather(str(os.getpid()))
        yield pa.RecordBatch.from_pydict({"rank": [ctx.partitionId()], "pids": [",".join(pids)]})

    rows = spark.range(2, numPartitions=2).mapInArrow(stage, "rank long, pids string", barrier=True).collect()
    assert sorted(r.rank for r in rows) == [0, 1], rows
    pids = {p for r in rows for p in r.pids.split(",")}
    assert len(pids) == 2, f"both ranks ran in one process: {rows}"
    print("probe ok", spark.version, sorted(pids))
    spark.stop()
    """
)


# ----- the client venv ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ClientVenv:
    """A cached venv with pyspark-client and sparkdl's runtime dependencies (not sparkdl, not pyspark)."""

    path: Path
    requirements: tuple[str, ...]
    created: bool  # built by this call (False: reused from the cache)
    seconds: float  # time this call took (build, or check of the cached one)

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def client_requirements() -> list[str]:
    """pyspark-client plus pyproject.toml's runtime dependencies and its ``examples`` and ``connect``
    extras (where they exist), without pyspark or py4j; each pinned to the version this interpreter
    has (the main venv's, so pip takes them from its cache), else kept as pyproject's range."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    specs = [*project.get("dependencies", []), *extras.get("examples", []), *extras.get("connect", [])]
    reqs = [PYSPARK_CLIENT]
    for spec in specs:
        name = re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0]
        if name.lower() in _NOT_ON_CLIENT or any(r.split("==")[0].split("[")[0].lower() == name.lower() for r in reqs):
            continue
        have = _dist_version(name)
        reqs.append(f"{name}=={have}" if have else spec)
    return reqs


def _base_python() -> str:
    """A Python 3.11 interpreter to make the venv with."""
    if sys.version_info[:2] == CLIENT_PYTHON:
        return getattr(sys, "_base_executable", None) or sys.executable
    want = "python%d.%d" % CLIENT_PYTHON
    found = shutil.which(want) or next(iter(sorted(Path("/root/.pyenv/versions").glob(f"{want[6:]}.*/bin/python"))), None)
    if not found:
        raise RuntimeError(f"{want} is needed for the Spark Connect client venv (its UDFs must match the "
                           "executors' Python) and was not found on PATH")
    return str(found)


_CHECK = textwrap.dedent(
    """
    import importlib.util, pathlib, sys
    import pyspark, pyspark.sql.connect.session
    from pyspark.version import __version__
    assert importlib.util.find_spec("py4j") is None, "py4j is installed"
    root = pathlib.Path(pyspark.__file__).parent
    assert not (root / "jars").exists(), f"{root}/jars exists: this is the full pyspark, not pyspark-client"
    print(__version__)
    """
)


def ensure_client_venv(cache_root: Path | None = None, *, log=None) -> ClientVenv:
    """The client venv under ``~/.cache/sparkdl-venvs/connect-client-<hash>`` (key: pyproject.toml
    and the requirement list), built when missing; a lock keeps parallel runs from building it twice.
    Raises RuntimeError when it has a JVM part (pyspark/jars, py4j) or no pyspark.sql.connect."""
    t0 = time.time()
    cache_root = Path(cache_root or os.environ.get("SPARKDL_VENV_CACHE") or Path.home() / ".cache" / "sparkdl-venvs")
    reqs = client_requirements()
    key = hashlib.sha256(((ROOT / "pyproject.toml").read_text() + "\n".join(reqs)).encode()).hexdigest()[:16]
    path = cache_root / f"connect-client-{key}"
    stamp = path / ".sparkdl-complete"
    cache_root.mkdir(parents=True, exist_ok=True)
    created = False
    with open(cache_root / f"connect-client-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not stamp.exists():
            created = True
            shutil.rmtree(path, ignore_errors=True)
            steps = [
                [_base_python(), "-m", "venv", str(path)],
                [str(path / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", *reqs],
            ]
            for cmd in steps:
                if log:
                    log(f"client venv: {' '.join(cmd)}")
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"building the Spark Connect client venv failed: {' '.join(cmd[:4])} ... "
                                       f"(exit {proc.returncode})\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            stamp.write_text("\n".join(reqs) + "\n")
    check = run_source(path / "bin" / "python", _CHECK, capture_output=True, text=True, cwd=path,
                        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SPARK_HOME")})
    if check.returncode != 0:
        raise RuntimeError(f"the Spark Connect client venv {path} is not a pyspark-client-only venv "
                           f"(delete it to rebuild):\n{check.stderr[-3000:]}")
    return ClientVenv(path=path, requirements=tuple(reqs), created=created, seconds=time.time() - t0)


# ----- running client scripts ---------------------------------------------------------------------
def run_source(python: Path | str, source: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    """Run Python source from a file, not ``python -c``: pyspark-client (4.2) takes a ``__main__``
    without ``__file__`` for its doctest runner, and its ``import pyspark.sql.connect`` then exits
    looking for a SPARK_HOME (pyspark/sql/connect/utils.py check_dependencies)."""
    with tempfile.TemporaryDirectory(prefix="sparkdl-client-") as tmp:
        script = Path(tmp) / "client_script.py"
        script.write_text(source)
        return subprocess.run([str(python), str(script), *args], **kwargs)


class ClientFailed(AssertionError):
    """A client script exited non-zero; the message holds its stdout and stderr."""


def client_env(remote: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a client script: SPARK_REMOTE, the checkout first on PYTHONPATH, no
    SPARK_HOME or JVM settings of the caller's environment."""
    out = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "SPARK_HOME", "PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", "PYSPARK_GATEWAY_PORT")}
    out.update(SPARK_REMOTE=remote, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out.update(env or {})
    return out


def run_client(python: Path | str, script: str, *args: str, remote: str, env: dict[str, str] | None = None,
               timeout: float = 300.0, check: bool = True, cwd: Path | str | None = None) -> subprocess.CompletedProcess:
    """Run ``script`` (Python source) with ``python`` (the client venv's) and ``args``; with ``check``,
    a non-zero exit raises :class:`ClientFailed` showing both streams."""
    proc = run_source(python, script, *args, capture_output=True, text=True, timeout=timeout,
                       env=client_env(remote, env), cwd=cwd, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise ClientFailed(f"client script exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}\n"
                           f"--- stderr ---\n{proc.stderr[-8000:]}")
    return proc
