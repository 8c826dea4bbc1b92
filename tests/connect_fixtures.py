"""Spark Connect fixtures: one real Connect server and one pyspark-client venv per test session.

Pulled into tests/conftest.py with one import line, like storage_fixtures.py. The server and the
venv are made by tests/connect_support.py (shared with benchmarks/bench_launch.py --connect):

- ``connect_client_python``: the cached client venv (:class:`connect_support.ClientVenv`;
  ``.python`` is its interpreter) with ``pyspark-client`` and sparkdl's runtime dependencies, no
  ``pyspark``, ``py4j`` or jars. The first build downloads torch (minutes); later runs reuse it.
- ``connect_server``: a Spark Connect server (the main venv's pyspark) on
  ``local-cluster[2,1,1024]``, gRPC on 127.0.0.1, ready once a client ran a 2-task barrier stage;
  ``.url`` is ``sc://127.0.0.1:PORT``, ``.log_path`` its log. Stopped, executors included, at the end.
- ``run_client``: ``run_client(script, *args, env=None, timeout=600, check=True)`` runs Python
  source in the client venv with SPARK_REMOTE set to the server and the checkout on PYTHONPATH;
  a non-zero exit fails the test showing both streams.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import connect_support

__all__ = ["connect_client_python", "connect_server", "run_client"]


def _report(request, line: str) -> None:
    """A line in the terminal even without -s (server start and venv build times)."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(f"[connect] {line}")


@pytest.fixture(scope="session")
def connect_client_python(request) -> connect_support.ClientVenv:
    try:
        venv = connect_support.ensure_client_venv()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    _report(request, f"client venv {venv.path} ({'built' if venv.created else 'cached'}, {venv.seconds:.1f} s)")
    return venv


@pytest.fixture(scope="session")
def connect_server(request, tmp_path_factory) -> connect_support.ConnectServer:
    server = connect_support.start_connect_server(tmp_path_factory.mktemp("connect-server"))
    try:
        # The JVM starts while the client venv is checked (or built): the two overlap.
        venv = request.getfixturevalue("connect_client_python")
        try:
            seconds = server.wait_ready(venv.python)
        except RuntimeError as e:
            pytest.fail(str(e), pytrace=False)
        _report(request, f"Spark Connect server {server.url} ready in {seconds:.1f} s (log {server.log_path})")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def run_client(connect_server, connect_client_python):
    def run(script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 600.0,
            check: bool = True, cwd: Path | str | None = None):
        try:
            return connect_support.run_client(connect_client_python.python, script, *args, remote=connect_server.url,
                                              env=env, timeout=timeout, check=check, cwd=cwd)
        except connect_support.ClientFailed as e:
            pytest.fail(f"{e}\n--- tail of the server log {connect_server.log_path} ---\n{connect_server.log_tail(3000)}",
                        pytrace=False)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"client script ran past {timeout:.0f} s\n--- stdout ---\n{(e.stdout or b'')[-4000:]!r}\n"
                        f"--- tail of the server log ---\n{connect_server.log_tail(3000)}", pytrace=False)

    return run
