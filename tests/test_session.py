"""Spark profiles: the files in spark-conf/ parse, and bad names fail with the known ones listed."""

from __future__ import annotations

import os
from pathlib import Path

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
    # Quiet: the driver JVM runs with the profile folder's log4j2.properties, root level WARN.
    jvm = spark.sparkContext._jvm
    assert "log4j2.properties" in (jvm.java.lang.System.getProperty("log4j.configurationFile") or "")
    assert str(jvm.org.apache.logging.log4j.LogManager.getRootLogger().getLevel()) == "WARN"


def test_properties_syntax_matches_java(tmp_path):
    conf = tmp_path / "p.conf"
    conf.write_text(
        "# comment\n! also a comment\n"
        "spark.a = 1\n"
        "spark.b\t2\n"
        "spark.c:3\n"
        "spark.d    four words here\n"
        "spark.e = first \\\n     second\n"
        "spark.bare\n"
    )
    assert read_profile(str(conf)) == {
        "spark.a": "1", "spark.b": "2", "spark.c": "3", "spark.d": "four words here",
        "spark.e": "first second", "spark.bare": "",
    }


def _fake_java(folder, banner: str):
    java = folder / "bin" / "java"
    java.parent.mkdir(parents=True)
    java.write_text(f"#!/bin/sh\necho '{banner}' >&2\n")
    java.chmod(0o755)
    return folder


@pytest.mark.parametrize("banner, major", [
    ('openjdk version "11.0.2" 2019-01-15', 11),
    ('java version "1.8.0_392"', 8),
])
def test_check_java_refuses_an_old_java_on_path(tmp_path, monkeypatch, banner, major):
    from sparkdl.session import check_java

    home = _fake_java(tmp_path / "jdk", banner)
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", f"{home / 'bin'}:/usr/bin:/bin")
    with pytest.raises(RuntimeError, match=rf"needs Java 17 \(or 21\) but .*jdk/bin/java is Java {major} "):
        check_java()
    monkeypatch.setenv("JAVA_HOME", str(home))
    with pytest.raises(RuntimeError, match=rf"is Java {major} "):
        check_java()


def test_check_java_names_the_java_home_it_tried(tmp_path, monkeypatch):
    from sparkdl.session import check_java

    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-jdk-here"))
    with pytest.raises(RuntimeError, match=rf"Java 17 is required .*JAVA_HOME={tmp_path / 'no-jdk-here'} has no bin/java"):
        check_java()
    home = _fake_java(tmp_path / "jdk17", 'openjdk version "17.0.15" 2025-04-15')
    monkeypatch.setenv("JAVA_HOME", str(home))
    assert check_java() == 'openjdk version "17.0.15" 2025-04-15'


@pytest.mark.integration
def test_built_wheel_carries_the_profiles_and_schemas(tmp_path):
    """A wheel is a whole install: spark-conf/ and schemas/ travel inside the package."""
    import shutil
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    src.mkdir()
    # Built from a copy, so the build leaves nothing in the checkout.
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy(root / name, src / name)
    for name in ("sparkdl", "schemas", "spark-conf"):
        shutil.copytree(root / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("sparkdl-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)

    probe = (
        "import sparkdl, sparkdl.session as s, sparkdl.schema as sc\n"
        "print(sparkdl.__file__)\n"
        "print(s.read_profile('local')['spark.master'])\n"
        "print(s.profile_path('gpu').parent.joinpath('gpu-discovery.sh').exists())\n"
        "print(sc.DatasetSchema.load('digits').column('image').codec)\n"
        "print(sorted(p.stem for p in sc.schemas_dir().glob('*.yaml')))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARKDL_")}
    env["PYTHONPATH"] = str(site)
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    where, master, discovery, codec, names = run.stdout.splitlines()
    assert where.startswith(str(site))  # the wheel's copy, not the checkout
    assert (master, discovery, codec) == ("local[*]", "True", "png")
    assert names == str(sorted(p.stem for p in (root / "schemas").glob("*.yaml")))


def test_relative_discovery_script_resolves_beside_the_profiles(tmp_path, monkeypatch):
    from sparkdl.session import _resolve_scripts

    monkeypatch.chdir(tmp_path)  # not the project root: "spark-conf/..." does not exist from here
    key = "spark.executor.resource.gpu.discoveryScript"
    resolved = _resolve_scripts(read_profile("gpu"))
    assert Path(resolved[key]).is_absolute() and Path(resolved[key]) == profile_path("gpu").parent.resolve() / "gpu-discovery.sh"
    assert _resolve_scripts({key: "elsewhere/missing.sh"})[key] == "elsewhere/missing.sh"
    assert _resolve_scripts({key: "/opt/x.sh"})[key] == "/opt/x.sh"


@pytest.mark.integration
def test_running_session_is_returned_with_a_warning_when_another_master_is_asked(spark):
    from sparkdl.session import spark_session

    with pytest.warns(RuntimeWarning, match=r"already running on local\[2\].*not one on local\[\*\]"):
        assert spark_session("local") is spark
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert spark_session(master="local[2]") is spark
