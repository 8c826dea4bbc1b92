"""Spark sessions, and the one place where classic Spark and Spark Connect differ.

A profile is a ``spark-submit --properties-file`` file; the same file configures sessions
built from Python, so a notebook and a scheduled job run with identical settings. A session
made with ``remote="sc://host:port"`` (or ``SPARK_REMOTE``) is a Spark Connect client: no JVM,
no ``sparkContext``.

Everything else in sparkdl reaches Spark through DataFrames and the functions of this module
(``barrier_stage``, ``on_storage``, ``spark_master``, ``task_slots``, ``ship_py_files``, ...),
so no other module touches ``sparkContext`` or the JVM gateway (a test enforces it).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, TypeVar

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

T = TypeVar("T")

__all__ = ["spark_session", "profile_path", "read_profile", "PROFILES", "check_java", "is_connect", "spark_master",
           "conf_value", "task_slots", "registered_executors", "expected_executors", "ship_py_files",
           "job_description", "barrier_stage", "on_storage", "driver_session", "list_files", "delete_tree", "count_jobs"]

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


def _remote_only() -> bool:
    """True in a Python that has the Spark Connect client only (``pyspark-client``: no JVM side)."""
    try:
        from pyspark.util import is_remote_only
    except ImportError:  # pyspark 3.5: always the full package
        return False
    return bool(is_remote_only())


def _connect_session(remote: str, app_name: str, conf: Mapping[str, str] | None) -> "SparkSession":
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None and is_connect(active):
        return active
    spark = SparkSession.builder.remote(remote).appName(app_name).getOrCreate()
    # The server keeps its own static settings; the ones that change results are per session.
    for key, value in {**_CORRECTNESS_DEFAULTS, **dict(conf or {})}.items():
        try:
            spark.conf.set(key, value)
        except Exception as e:  # a static conf cannot be set from a client: say which and why
            raise ValueError(f"conf {key}={value!r} cannot be set from a Spark Connect client ({e}); set it on "
                             "the Connect server (start-connect-server.sh --conf ...)") from e
    return spark


def spark_session(
    profile: str | None = None,
    *,
    app_name: str = "sparkdl",
    master: str | None = None,
    conf: Mapping[str, str] | None = None,
    remote: str | None = None,
) -> "SparkSession":
    """Get or create a SparkSession configured by ``profile``.

    From plain Python, ``profile`` defaults to ``local`` and its settings apply. Under
    ``spark-submit``, what spark-submit was given (``--master``, ``--conf``,
    ``--properties-file``) wins: the profile (none by default) only fills in settings spark-submit
    left unset. ``master`` and ``conf`` always override both. Executors use this interpreter
    unless ``spark.pyspark.python`` says otherwise, so the driver and its Python workers agree
    on torch and pyarrow versions. A session that is already running is returned as it is.

    ``remote`` (default: the ``SPARK_REMOTE`` environment variable) makes a Spark Connect client
    session instead (``sc://host:port``): the server's own settings apply, ``conf`` sets runtime
    (SQL) settings only, and ``profile``/``master`` are refused.
    """
    remote = remote or os.environ.get("SPARK_REMOTE") or None
    if remote:
        if master or profile:
            raise ValueError(f"remote={remote!r} connects to a running Spark Connect server, whose master and "
                             "profile are the server's: drop profile=/master= (or unset SPARK_REMOTE)")
        return _connect_session(remote, app_name, conf)
    if _remote_only():
        raise RuntimeError("this Python has the Spark Connect client only (pyspark-client): pass "
                           "remote='sc://host:port' or set SPARK_REMOTE, or install 'sparkdl[spark]' for a local Spark")
    check_java()
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        wanted = master or (read_profile(profile).get("spark.master") if profile else None)
        running = spark_master(active)
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


# ---------------------------------------------------------------------------------------------
# The classic/Connect boundary. A Connect session has no SparkContext and no JVM gateway in this
# process; where classic Spark offers a driver-side shortcut it is used, else a DataFrame job.


def is_connect(spark: "SparkSession") -> bool:
    """Whether ``spark`` is a Spark Connect client session (no ``sparkContext`` here)."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def spark_master(spark: "SparkSession") -> str:
    """The master URL the session runs on (``local[2]``, ``yarn``, ...; the server's under Connect)."""
    if is_connect(spark):
        return conf_value(spark, "spark.master") or ""
    return spark.sparkContext.master


def conf_value(spark: "SparkSession", key: str, default: str | None = None) -> str | None:
    """A Spark setting, static (``spark.driver.host``) or runtime, or ``default`` when unset."""
    if not is_connect(spark):
        value = spark.sparkContext.getConf().get(key)
        if value is not None:
            return value
    try:
        value = spark.conf.get(key, None)
    except Exception:  # Connect refuses some static keys; they are then unknown here
        value = None
    return default if value is None else value


def task_slots(spark: "SparkSession") -> int | None:
    """Tasks the cluster can run at once now; None when it cannot be known (Spark Connect)."""
    if is_connect(spark):
        return None
    sc = spark.sparkContext._jsc.sc()
    return int(sc.maxNumConcurrentTasks(sc.resourceProfileManager().defaultResourceProfile()))


def registered_executors(spark: "SparkSession") -> int | None:
    if is_connect(spark):
        return None
    return max(0, int(spark.sparkContext._jsc.sc().getExecutorMemoryStatus().size()) - 1)  # minus the driver


def expected_executors(spark: "SparkSession") -> int | None:
    """Executors the cluster will have once started, when that is known up front."""
    m = re.match(r"local-cluster\[\s*(\d+)", spark_master(spark))
    if m:
        return int(m.group(1))
    if (conf_value(spark, "spark.dynamicAllocation.enabled") or "false").strip().lower() == "true":
        return None  # executors come and go with the load: only the timeout bounds the wait
    instances = (conf_value(spark, "spark.executor.instances") or "").strip()
    return int(instances) if instances.isdigit() else None


def ship_py_files(spark: "SparkSession", paths: list[str]) -> None:
    """Make ``.py``/``.zip`` files importable by the executors' Python workers."""
    for path in paths:
        if is_connect(spark):
            spark.addArtifacts(path, pyfile=True)
        else:
            spark.sparkContext.addPyFile(path)


@contextlib.contextmanager
def job_description(spark: "SparkSession", text: str) -> Iterator[None]:
    """Name the Spark jobs started inside the block in the Spark UI (classic; Connect: a job tag)."""
    if is_connect(spark):
        yield
        return
    sc = spark.sparkContext
    sc.setJobDescription(text)
    try:
        yield
    finally:
        sc.setJobDescription(None)  # type: ignore[arg-type]


@contextlib.contextmanager
def count_jobs(spark: "SparkSession", counts: dict[str, int], name: str) -> Iterator[None]:
    """Count the Spark jobs started inside the block into ``counts[name]`` (classic Spark only:
    a Connect client cannot see jobs, and counts nothing).

    Adaptive query execution is off inside the block: it runs every shuffle's map side as a
    job of its own, while an analyzer pass's result is one small row or list and gains nothing
    from re-planning; without it, a pass is one job of two or three stages."""
    aqe = spark.conf.get("spark.sql.adaptive.enabled", "true")
    spark.conf.set("spark.sql.adaptive.enabled", "false")
    if is_connect(spark):
        try:
            yield
        finally:
            spark.conf.set("spark.sql.adaptive.enabled", aqe)
        return
    sc = spark.sparkContext
    group = f"sparkdl-{name}-{uuid.uuid4().hex[:8]}"
    sc.setJobGroup(group, f"sparkdl: {name}")
    try:
        yield
    finally:
        spark.conf.set("spark.sql.adaptive.enabled", aqe)
        sc.setLocalProperty("spark.jobGroup.id", None)  # type: ignore[arg-type]
        sc.setLocalProperty("spark.job.description", None)  # type: ignore[arg-type]
        counts[name] = counts.get(name, 0) + len(sc.statusTracker().getJobIdsForGroup(group))


_RESULT_SCHEMA = "result binary"


def barrier_stage(spark: "SparkSession", num_tasks: int, task: Callable[[], "bytes | None"]) -> list[bytes]:
    """Run ``task()`` in ``num_tasks`` tasks of one barrier-mode stage; the non-None results.

    One code path for classic Spark and Spark Connect: ``mapInArrow(..., barrier=True)`` over
    ``range(n)`` in n partitions (Spark >= 3.5). Inside, ``BarrierTaskContext.get()`` gives the
    task its partition id and its peers' addresses. ``task`` travels pickled with the job."""
    import pyarrow as pa

    def run(batches: Iterator[Any]) -> Iterator[Any]:
        for _ in batches:  # one row per task; the rank is the partition id
            pass
        out = task()
        if out is not None:
            yield pa.RecordBatch.from_arrays([pa.array([out], pa.binary())], names=["result"])

    df = spark.range(num_tasks, numPartitions=num_tasks).mapInArrow(run, _RESULT_SCHEMA, barrier=True)
    return [row["result"] for row in df.collect()]


def driver_session(spark: "SparkSession | None") -> "SparkSession | None":
    """``spark`` where this process is Spark's driver (classic), None for a Connect client: what a
    function run through ``on_storage`` may use for driver-side shortcuts (Hadoop listings)."""
    return None if spark is None or is_connect(spark) else spark


def on_storage(spark: "SparkSession | None", fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` where the lakehouse storage is reachable, and its result.

    Classic Spark (or no session): here, on the driver, as before. Spark Connect: in one task on
    an executor, so a client without storage credentials or clients (no HDFS client, no cloud
    keys) still reads and writes the lakehouse, as the cluster does. ``fn`` and its arguments
    travel pickled with the job (sparkdl must be installed on the executors, as for training);
    its exception is raised here as the same class when it can be, else as a RuntimeError."""
    if spark is None or not is_connect(spark):
        return fn(*args, **kwargs)
    import pyarrow as pa
    from pyspark import cloudpickle

    payload = cloudpickle.dumps((fn, args, kwargs))

    def run(batches: Iterator[Any]) -> Iterator[Any]:
        from pyspark import cloudpickle as cp

        for _ in batches:
            pass
        try:
            f, a, k = cp.loads(payload)
            out = cp.dumps(("ok", f(*a, **k)))
        except Exception as e:
            try:
                out = cp.dumps(("error", e))
                cp.loads(out)  # an exception class that cannot travel back goes as text
            except Exception:
                out = cp.dumps(("error", RuntimeError(f"{type(e).__name__}: {e}")))
        yield pa.RecordBatch.from_arrays([pa.array([out], pa.binary())], names=["result"])

    rows = spark.range(1, numPartitions=1).mapInArrow(run, _RESULT_SCHEMA).collect()
    status, value = cloudpickle.loads(rows[0]["result"])
    if status == "error":
        raise value
    return value


def list_files(spark: "SparkSession | None", uri: str) -> list[tuple[str, int, int]]:
    """(path relative to ``uri`` as stored, size, mtime ms) of the visible files under ``uri``,
    recursively; [] when it does not exist. Classic Spark lists through its Hadoop filesystem
    (the one its writers used, ``s3a://`` and all); elsewhere through ``pyarrow.fs``."""
    if spark is not None and not is_connect(spark):
        jvm = spark.sparkContext._jvm
        path = jvm.org.apache.hadoop.fs.Path(uri)
        fs = path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
        if not fs.exists(path):
            return []
        base = fs.makeQualified(path).toString().rstrip("/")
        out = []
        it = fs.listFiles(path, True)
        while it.hasNext():
            st = it.next()
            full = st.getPath().toString()
            out.append((full[len(base) + 1:], int(st.getLen()), int(st.getModificationTime())))
        return out
    import pyarrow.fs as pafs

    from sparkdl import _fs

    fs, root = _fs.resolve(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except FileNotFoundError:
        return []
    base = root.rstrip("/")
    return [(i.path[len(base) + 1:], int(i.size or 0), int(i.mtime_ns // 1_000_000) if i.mtime_ns else 0)
            for i in infos if i.type == pafs.FileType.File]


def delete_tree(spark: "SparkSession | None", uri: str) -> None:
    """Delete the folder ``uri`` and what it holds (best effort: cleanup never masks a failure)."""
    try:
        if spark is not None and not is_connect(spark):
            jvm = spark.sparkContext._jvm
            path = jvm.org.apache.hadoop.fs.Path(uri)
            path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()).delete(path, True)
            return
        from sparkdl import _fs

        fs, root = _fs.resolve(uri)
        fs.delete_dir(root)
    except Exception:
        pass
