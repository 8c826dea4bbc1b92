"""Spark sessions from the named profiles in ``spark-conf/``.

A profile is a ``spark-submit --properties-file`` file; the same file configures sessions
built from Python, so a notebook and a scheduled job run with identical settings.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = ["spark_session", "profile_path", "read_profile", "PROFILES", "check_java"]

PROFILES = ("local", "local-cluster", "standalone", "gpu")


def _conf_dir() -> Path:
    """The profiles' folder: ``SPARKDL_CONF_DIR``, else the installed package's copy, else the checkout's."""
    from sparkdl._resources import resource_dir

    return resource_dir("spark-conf", env="SPARKDL_CONF_DIR")


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
    """Parse a properties file the way ``spark-submit --properties-file`` (Java ``Properties``) does:
    ``key value``, ``key=value`` or ``key: value`` lines, ``#``/``!`` comments, ``\\`` line continuations."""
    conf: dict[str, str] = {}
    pending = ""
    for raw in profile_path(profile).read_text().splitlines():
        line = pending + raw.lstrip()
        pending = ""
        if not line.strip() or line.startswith(("#", "!")):
            continue
        if line.endswith("\\") and not line.endswith("\\\\"):
            pending = line[:-1]
            continue
        m = _PROPERTY_RE.match(line)
        if m is None:  # a bare key: Java gives it an empty value
            conf[line.strip()] = ""
            continue
        conf[m.group("key")] = m.group("value").strip()
    return conf


_PROPERTY_RE = re.compile(r"(?P<key>[^\s=:]+)\s*(?:[=:]\s*|\s+)(?P<value>.*)$")
_JAVA_VERSION_RE = re.compile(r'version "(\d+)(?:\.(\d+))?')
SUPPORTED_JAVA = (17, 21)
# Settings whose value changes results, not speed: timestamps are written and read in UTC
# whatever the driver's zone, and Arrow carries pandas UDF batches. They fill in unset keys only.
_CORRECTNESS_DEFAULTS = {
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
}


def check_java() -> str:
    """Return the ``java -version`` banner, or raise naming Java 17 and how to get it."""
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    where = f"JAVA_HOME={java_home} has no bin/java" if java_home else "no java on PATH and JAVA_HOME is unset"
    if not java or not Path(java).exists():
        raise RuntimeError(
            f"Java 17 is required by Spark 4 and was not found ({where}); "
            "install it, e.g. 'apt-get install openjdk-17-jre-headless', or set JAVA_HOME to a Java 17 home"
        )
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    banner = out.splitlines()[0] if out else "java"
    m = _JAVA_VERSION_RE.search(out)
    if m:
        major = int(m.group(1)) if m.group(1) != "1" else int(m.group(2) or 0)
        if major not in SUPPORTED_JAVA:
            raise RuntimeError(
                f"Spark 4 needs Java 17 (or 21) but {java} is Java {major} ({banner}); install "
                "openjdk-17 and point JAVA_HOME at it (or put it first on PATH)"
            )
    return banner


def _resolve_scripts(settings: dict[str, str]) -> dict[str, str]:
    """A profile names its resource discovery scripts relative to the project
    (``spark-conf/gpu-discovery.sh``); Spark runs them from the executor's working directory.
    Point a relative one that exists beside the profiles at its absolute path (one machine,
    local-cluster, a shared install); one not found is left for spark-submit's --files."""
    out = dict(settings)
    for key, value in settings.items():
        if not key.endswith(".discoveryScript") or not value or Path(value).is_absolute():
            continue
        for candidate in (Path(value), _conf_dir() / Path(value).name):
            if candidate.is_file():
                out[key] = str(candidate.resolve())
                break
    return out


def _submitted_conf() -> "Any | None":
    """The SparkConf spark-submit gave this driver, or None when Python started on its own.

    spark-submit starts the JVM first and hands Python its gateway (PYSPARK_GATEWAY_PORT);
    the JVM's system properties then hold --master, --conf and --properties-file settings."""
    if not os.environ.get("PYSPARK_GATEWAY_PORT"):
        return None
    from pyspark import SparkConf, SparkContext

    SparkContext._ensure_initialized()  # connect to spark-submit's JVM, so SparkConf loads its properties
    conf = SparkConf()
    return conf if conf.contains("spark.master") else None


def spark_session(
    profile: str | None = None,
    *,
    app_name: str = "sparkdl",
    master: str | None = None,
    conf: Mapping[str, str] | None = None,
) -> "SparkSession":
    """Get or create a SparkSession configured by ``profile``.

    From plain Python, ``profile`` defaults to ``local`` and its settings apply. Under
    ``spark-submit``, what spark-submit was given (``--master``, ``--conf``,
    ``--properties-file``) wins: the profile (none by default) only fills in settings spark-submit
    left unset. ``master`` and ``conf`` always override both. Executors use this interpreter
    unless ``spark.pyspark.python`` says otherwise, so the driver and its Python workers agree
    on torch and pyarrow versions. A session that is already running is returned as it is.
    """
    check_java()
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        wanted = master or (read_profile(profile).get("spark.master") if profile else None)
        running = active.sparkContext.master
        if wanted and wanted != running:
            import warnings

            warnings.warn(
                f"a Spark session is already running on {running}; it is returned as it is, not one on "
                f"{wanted} (profile={profile!r}, master={master!r}): stop it first to get another",
                RuntimeWarning, stacklevel=2,
            )
        return active
    submitted = _submitted_conf()
    if profile is None:
        profile = None if submitted is not None else "local"
    settings = _resolve_scripts(read_profile(profile)) if profile else {}
    for key, value in _CORRECTNESS_DEFAULTS.items():
        settings.setdefault(key, value)
    if submitted is not None:
        settings = {k: v for k, v in settings.items() if not submitted.contains(k)}
    settings.update(conf or {})
    if master:
        settings["spark.master"] = master
    effective_master = settings.get("spark.master") or (submitted.get("spark.master") if submitted else "")
    if effective_master.startswith("local"):
        # Local masters stay on loopback: no traffic leaves the machine, and torch's
        # rendezvous address is one every rank can reach.
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        for key in ("spark.driver.host", "spark.driver.bindAddress"):
            if submitted is None or not submitted.contains(key):
                settings.setdefault(key, "127.0.0.1")
    for key in ("spark.pyspark.python", "spark.pyspark.driver.python"):
        if submitted is None or not submitted.contains(key):
            settings.setdefault(key, sys.executable)
    log4j = _conf_dir() / "log4j2.properties"
    if log4j.exists() and submitted is None:
        # Under spark-submit the driver JVM is already up: pass
        # --driver-java-options -Dlog4j.configurationFile=... there instead (docs/cluster.md).
        opt = f"-Dlog4j.configurationFile=file:{log4j}"
        for key in ("spark.driver.extraJavaOptions", "spark.executor.extraJavaOptions"):
            settings[key] = (settings.get(key, "") + " " + opt).strip()
    # Executors launched by local-cluster and standalone workers inherit these.
    os.environ.setdefault("PYSPARK_PYTHON", settings.get("spark.pyspark.python") or sys.executable)
    builder = SparkSession.builder.appName(app_name)
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark
