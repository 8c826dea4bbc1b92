"""Spark profiles: the files in spark-conf/ parse, and bad names fail with the known ones listed."""

from __future__ import annotations

import pytest

from sparkdl.session import PROFILES, profile_path, read_profile


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_parses_and_keeps_the_ui_off(profile):
    conf = read_profile(profile)
    assert conf["spark.ui.enabled"] == "false"
    assert conf["spark.sql.session.timeZone"] == "UTC"


def test_local_cluster_profile_has_two_executor_jvms():
    assert read_profile("local-cluster")["spark.master"] == "local-cluster[2,1,1024]"


def test_gpu_profile_asks_one_gpu_per_task_with_a_discovery_script():
    conf = read_profile("gpu")
    assert conf["spark.task.resource.gpu.amount"] == "1"
    assert profile_path("gpu").parent.joinpath("gpu-discovery.sh").exists()


def test_unknown_profile_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown Spark profile 'nope'.*local-cluster"):
        read_profile("nope")


@pytest.mark.integration
def test_session_fixture_is_local_and_quiet(spark):
    assert spark.sparkContext.master == "local[2]"
    assert spark.conf.get("spark.ui.enabled") == "false"
    assert spark.conf.get("spark.sql.parquet.outputTimestampType") == "TIMESTAMP_MICROS"
