"""Spark sessions from the named profiles in ``spark-conf/``.

A profile is a ``spark-submit --properties-file`` file; the same file configures sessions
built from Python, so a notebook and a scheduled job run with identical settings.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = ["spark_session", "profile_path", "read_profile", "PROFILES", "check_java"]

PROFILES = ("local", "local-cluster", "standalone", "gpu")


def _conf_dir() -> Path:
    env = os.environ.get("SPARKDL_CONF_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "spark-conf"


def profile_path(profile: str) -> Path:
    """Path of the properties file of ``profile`` (a name from ``PROFILES`` or a file path)."""
    candidate = Path(profile)
    if candidate.suffix == ".conf" and candidate.exists():
        return candidate
    path = _conf_dir() / f"{profile}.conf"
    if not path.exists():
        known = sorted(p.stem for p in _conf_dir().glob("*.conf"))
        raise ValueError(
            f"unknown Spark profile {profile!r}: no file {path}; use one of {known} "
            "or pass the path of a properties file"
        )
    return path


def read_profile(profile: str) -> dict[str, str]:
    """Parse a properties file (``key value`` or ``key=value`` lines, ``#`` comments)."""
    conf: dict[str, str] = {}
    for raw in profile_path(profile).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, sep, value = line.partition("=") if "=" in line.split()[0] else line.partition(" ")
        conf[key.strip()] = value.strip()
    return conf


def check_java() -> str:
    """Return the ``java -version`` banner, or raise naming Java 17 and how to get it."""
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    if not java or not Path(java).exists():
        raise RuntimeError(
            "Java 17 is required by Spark 4 and was not found (no JAVA_HOME, no java on PATH); "
            "install it, e.g. 'apt-get install openjdk-17-jre-headless', or set JAVA_HOME"
        )
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    return out.splitlines()[0] if out else "java"


def spark_session(
    profile: str = "local",
    *,
    app_name: str = "sparkdl",
    master: str | None = None,
    conf: Mapping[str, str] | None = None,
) -> "SparkSession":
    """Get or create a SparkSession configured by ``profile``.

    ``master`` and ``conf`` override the profile's settings. Executors use this
    interpreter unless ``spark.pyspark.python`` says otherwise, so the driver and its
    Python workers agree on torch and pyarrow versions.
    """
    check_java()
    from pyspark.sql import SparkSession

    settings = read_profile(profile)
    settings.update(conf or {})
    if master:
        settings["spark.master"] = master
    if settings.get("spark.master", "").startswith("local"):
        # Local masters stay on loopback: no traffic leaves the machine, and torch's
        # rendezvous address is one every rank can reach.
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        settings.setdefault("spark.driver.host", "127.0.0.1")
        settings.setdefault("spark.driver.bindAddress", "127.0.0.1")
    settings.setdefault("spark.pyspark.python", sys.executable)
    settings.setdefault("spark.pyspark.driver.python", sys.executable)
    log4j = _conf_dir() / "log4j2.properties"
    if log4j.exists():
        opt = f"-Dlog4j.configurationFile=file:{log4j}"
        for key in ("spark.driver.extraJavaOptions", "spark.executor.extraJavaOptions"):
            settings[key] = (settings.get(key, "") + " " + opt).strip()
    # Executors launched by local-cluster and standalone workers inherit these.
    os.environ.setdefault("PYSPARK_PYTHON", settings["spark.pyspark.python"])
    builder = SparkSession.builder.appName(app_name)
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark
