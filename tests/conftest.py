"""Shared fixtures: one SparkSession for the whole run, synthetic tables per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
# One torch thread per process keeps the 2-core CI machine from oversubscribing when
# Spark's Python workers and torch ranks run side by side.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]

from storage_fixtures import hdfs_uri, s3_endpoint  # noqa: E402,F401  (HDFS and S3 servers: tests/storage_fixtures.py)
from connect_fixtures import connect_client_python, connect_server, run_client  # noqa: E402,F401  (Spark Connect: tests/connect_fixtures.py)


@pytest.fixture(scope="session")
def spark():
    """The one SparkSession of the test run: local[2], UI off, quiet logs."""
    from sparkdl.session import spark_session

    session = spark_session(
        "local",
        master="local[2]",
        app_name="sparkdl-tests",
        conf={"spark.sql.shuffle.partitions": "4", "spark.default.parallelism": "2"},
    )
    yield session
    session.stop()


@pytest.fixture(scope="session")
def lakehouse_root(tmp_path_factory) -> Path:
    """A lakehouse root shared by the session's tests (tables written once, read many times)."""
    return tmp_path_factory.mktemp("lakehouse")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if item.get_closest_marker("gpu") is not None:
                item.add_marker(skip)
