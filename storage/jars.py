"""JVM jars of the storage tests, fetched from Maven Central and cached.

Three groups, each a small pom beside this file:

- ``hdfs``: hadoop-hdfs + hadoop-common, to run a NameNode and a DataNode (storage/minihdfs.py);
- ``s3a``: hadoop-aws and its AWS SDK v2 bundle, for Spark's ``s3a://``;
- ``delta``: delta-spark + delta-storage, for the interoperability tests, and the pyspark
  release that delta-spark was built for (pip-installed into the cache: no delta-spark release
  runs on Spark 4.3 yet, see docs/storage.md).

Hadoop's version is read from the jars pyspark ships, so the daemons and connectors match the
client inside Spark. ``mvn dependency:build-classpath`` resolves each pom into a private local
repository under the cache (``SPARKDL_JARS_CACHE``, default ``~/.cache/sparkdl-jars``) and
writes the classpath to a file; a later run finds the file and does not touch the network.

``python -m storage.jars`` (``make jars``) fetches what is missing. Every failure is one line
that names the missing prerequisite.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["GROUPS", "MissingPrerequisite", "cache_dir", "classpath", "delta_pyspark", "fetch", "hadoop_version"]

HERE = Path(__file__).resolve().parent
GROUPS = ("hdfs", "s3a", "delta")


class MissingPrerequisite(RuntimeError):
    """A tool, jar or service the storage tests need is not there; the message is one line."""


def cache_dir() -> Path:
    return Path(os.environ.get("SPARKDL_JARS_CACHE", "~/.cache/sparkdl-jars")).expanduser()


def _pyspark_jars() -> Path:
    try:
        import pyspark
    except ImportError as e:
        raise MissingPrerequisite("pyspark is not installed in this Python: run `make venv` first") from e
    return Path(pyspark.__file__).resolve().parent / "jars"


def hadoop_version() -> str:
    """The Hadoop version of pyspark's own client (``hadoop-client-api-<v>.jar``)."""
    found = sorted(_pyspark_jars().glob("hadoop-client-api-*.jar"))
    if not found:
        raise MissingPrerequisite(f"no hadoop-client-api-*.jar under {_pyspark_jars()}: reinstall pyspark")
    return found[0].name[len("hadoop-client-api-"):-len(".jar")]


def _pom_property(group: str, name: str) -> str:
    text = (HERE / group / "pom.xml").read_text()
    start = text.index(f"<{name}>") + len(name) + 2
    return text[start:text.index(f"</{name}>", start)]


def _key(group: str) -> str:
    if group == "delta":
        return f"{_pom_property('delta', 'delta.artifact')}-{_pom_property('delta', 'delta.version')}"
    return f"hadoop-{hadoop_version()}"


def _classpath_file(group: str) -> Path:
    return cache_dir() / f"{group}-{_key(group)}.classpath"


def _read(group: str) -> list[str] | None:
    path = _classpath_file(group)
    if not path.exists():
        return None
    jars = [j for j in path.read_text().strip().split(os.pathsep) if j]
    return jars if jars and all(os.path.exists(j) for j in jars) else None


def _delta_pyspark_dir() -> Path:
    return cache_dir() / f"pyspark-{_pom_property('delta', 'spark.version')}"


def delta_pyspark() -> Path:
    """A folder to put first on PYTHONPATH for a pyspark that delta-spark runs on."""
    path = _delta_pyspark_dir()
    if not (path / "pyspark" / "jars").is_dir():
        raise MissingPrerequisite(f"the pyspark for delta-spark is not in {path}: run `make jars` (needs pip and PyPI)")
    return path


def _fetch_delta_pyspark(quiet: bool) -> None:
    path = _delta_pyspark_dir()
    if (path / "pyspark" / "jars").is_dir():
        return
    version = _pom_property("delta", "spark.version")
    if not quiet:
        print(f"installing pyspark=={version} (for delta-spark) into {path}", flush=True)
    tmp = path.with_name(path.name + ".tmp")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-warn-conflicts", "--target", str(tmp), f"pyspark=={version}"],
        capture_output=True, text=True,
    )
    if done.returncode != 0:
        last = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["no output"]
        raise MissingPrerequisite(f"pip could not install pyspark=={version} for delta-spark: {last[0]}")
    tmp.replace(path)


def fetch(groups: tuple[str, ...] = GROUPS, *, quiet: bool = False) -> None:
    """Resolve the jars of ``groups`` that are not cached yet (needs Maven and Maven Central)."""
    for group in groups:
        if group == "delta":
            _fetch_delta_pyspark(quiet)
        if _read(group) is not None:
            continue
        mvn = shutil.which("mvn")
        if mvn is None:
            raise MissingPrerequisite(
                f"Maven (mvn) is needed once to fetch the {group!r} storage-test jars into {cache_dir()}: "
                "install it (apt-get install maven) and rerun `make jars`"
            )
        out = _classpath_file(group)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        cmd = [
            mvn, "-q", "-B", "-f", str(HERE / group / "pom.xml"),
            f"-Dmaven.repo.local={cache_dir() / 'm2'}",
            f"-Dhadoop.version={hadoop_version()}",
            "dependency:build-classpath", "-DincludeScope=runtime", f"-Dmdep.outputFile={tmp}",
        ]
        if not quiet:
            print(f"fetching the {group!r} jars ({_key(group)}) from Maven Central into {cache_dir()}", flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not tmp.exists():
            last = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["no output"]
            raise MissingPrerequisite(f"mvn could not fetch the {group!r} jars ({_key(group)}): {last[0]}")
        tmp.replace(out)


def classpath(group: str) -> list[str]:
    """The cached jars of ``group``; a one-line MissingPrerequisite when they were not fetched."""
    if group not in GROUPS:
        raise ValueError(f"unknown jar group {group!r}; use one of {GROUPS}")
    jars = _read(group)
    if jars is None:
        raise MissingPrerequisite(
            f"the {group!r} storage-test jars ({_key(group)}) are not in {cache_dir()}: run `make jars` (needs mvn)"
        )
    return jars


def main(argv: list[str]) -> int:
    groups = tuple(argv) or GROUPS
    try:
        fetch(groups)
        for group in groups:
            print(f"{group}: {len(classpath(group))} jars ({_key(group)})")
    except MissingPrerequisite as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
