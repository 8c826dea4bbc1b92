"""A single-node HDFS (one NameNode, one DataNode) on 127.0.0.1, from Apache Hadoop's own jars.

Used by the session-scoped ``hdfs_uri`` test fixture and by ``make hdfs-up`` / ``make hdfs-down``:

    python -m storage.minihdfs up   [--dir DIR] [--port PORT]   # prints hdfs://127.0.0.1:PORT
    python -m storage.minihdfs down [--dir DIR]

The daemons are the real ``NameNode`` and ``DataNode`` main classes (not MiniDFSCluster), with
every RPC, data-transfer and HTTP socket bound to 127.0.0.1 (the HTTP ones on ephemeral ports).
Permissions are off and replication is 1: this is a test and development cluster, not a
secure one. The jars come from storage/jars.py (``make jars``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from storage.jars import MissingPrerequisite, classpath

__all__ = ["MiniHdfs"]

_READY = "Successfully sent block report"  # the DataNode's first report reached the NameNode
_JVM = ["-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Djava.net.preferIPv4Stack=true"]
_LOG4J = """log4j.rootLogger=WARN,console
log4j.appender.console=org.apache.log4j.ConsoleAppender
log4j.appender.console.target=System.err
log4j.appender.console.layout=org.apache.log4j.PatternLayout
log4j.appender.console.layout.ConversionPattern=%d{HH:mm:ss} %p %c{1}: %m%n
log4j.logger.org.apache.hadoop.hdfs.server.namenode.NameNode=INFO
log4j.logger.org.apache.hadoop.hdfs.server.datanode.DataNode=INFO
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _site(props: dict[str, str]) -> str:
    body = "".join(f"  <property><name>{k}</name><value>{v}</value></property>\n" for k, v in props.items())
    return f"<?xml version=\"1.0\"?>\n<configuration>\n{body}</configuration>\n"


class MiniHdfs:
    """NameNode + DataNode under ``workdir`` (conf/, data/, logs, state.json)."""

    def __init__(self, workdir: str | os.PathLike, *, port: int | None = None,
                 conf: dict[str, str] | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self._extra = dict(conf or {})  # hdfs-site.xml settings on top of the defaults below
        self.port = port or _free_port()
        self.uri = f"hdfs://127.0.0.1:{self.port}"
        self._procs: dict[str, subprocess.Popen] = {}

    # -- configuration -------------------------------------------------------------------
    def _write_conf(self) -> Path:
        conf = self.workdir / "conf"
        # The daemons look their web UIs up as classpath folders; the Maven jars carry none.
        for app in ("hdfs", "datanode", "secondary", "static"):
            (conf / "webapps" / app).mkdir(parents=True, exist_ok=True)
        data = self.workdir / "data"
        (conf / "core-site.xml").write_text(_site({
            "fs.defaultFS": self.uri,
            "hadoop.tmp.dir": str(data / "tmp"),
        }))
        local = "127.0.0.1:0"
        (conf / "hdfs-site.xml").write_text(_site({
            "dfs.replication": "1",
            "dfs.permissions.enabled": "false",
            "dfs.namenode.rpc-address": f"127.0.0.1:{self.port}",
            "dfs.namenode.rpc-bind-host": "127.0.0.1",
            "dfs.namenode.http-address": local,
            "dfs.namenode.secondary.http-address": local,
            "dfs.datanode.address": local,
            "dfs.datanode.http.address": local,
            "dfs.datanode.ipc.address": local,
            "dfs.datanode.hostname": "127.0.0.1",
            "dfs.namenode.name.dir": str(data / "name"),
            "dfs.datanode.data.dir": str(data / "data"),
            "dfs.namenode.safemode.extension": "0",
            "dfs.namenode.safemode.threshold-pct": "0",
            # One DataNode: a pipeline with a failed node cannot be repaired by replacing it.
            "dfs.client.block.write.replace-datanode-on-failure.enable": "false",
            "dfs.heartbeat.interval": "1",
            **self._extra,
        }))
        (conf / "log4j.properties").write_text(_LOG4J)
        return conf

    def _java(self, conf: Path, main: str, *args: str, log: str) -> subprocess.Popen:
        cp = os.pathsep.join([str(conf), *classpath("hdfs")])
        out = open(self.workdir / log, "ab")
        return subprocess.Popen(
            ["java", *_JVM, "-cp", cp, main, *args],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # `down` and the fixture stop the daemons, not their parent's group
        )

    # -- lifecycle -----------------------------------------------------------------------
    def start(self, timeout: float = 90.0) -> str:
        """Format (first time), start both daemons, wait until a block can be placed; the URI."""
        import shutil

        if shutil.which("java") is None:
            raise MissingPrerequisite("java is not on PATH: the HDFS test cluster needs Java 17")
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self._write_conf()
        if not (self.workdir / "data" / "name" / "current").exists():
            fmt = self._java(conf, "org.apache.hadoop.hdfs.server.namenode.NameNode",
                             "-format", "-nonInteractive", "-force", log="format.log")
            if fmt.wait(timeout) != 0:
                raise MissingPrerequisite(f"HDFS NameNode -format failed: see {self.workdir / 'format.log'}")
        for name, main in (("namenode", "NameNode"), ("datanode", "DataNode")):
            log = self.workdir / f"{name}.log"
            log.write_bytes(b"")
            pkg = "namenode" if name == "namenode" else "datanode"
            self._procs[name] = self._java(conf, f"org.apache.hadoop.hdfs.server.{pkg}.{main}", log=log.name)
        (self.workdir / "state.json").write_text(json.dumps(
            {"uri": self.uri, "pids": {k: p.pid for k, p in self._procs.items()}}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    self.stop()
                    raise MissingPrerequisite(
                        f"the HDFS {name} exited with code {proc.returncode}: see {self.workdir / (name + '.log')}")
            if _READY in (self.workdir / "datanode.log").read_text(errors="replace"):
                return self.uri
            time.sleep(0.3)
        self.stop()
        raise MissingPrerequisite(f"HDFS did not come up within {timeout:.0f}s: see {self.workdir}/*.log")

    def stop(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._procs.clear()
        (self.workdir / "state.json").unlink(missing_ok=True)

    def __enter__(self) -> "MiniHdfs":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _down(workdir: Path) -> int:
    state = workdir / "state.json"
    if not state.exists():
        print(f"no HDFS recorded under {workdir}")
        return 0
    for pid in json.loads(state.read_text())["pids"].values():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    state.unlink()
    print(f"stopped the HDFS under {workdir}")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m storage.minihdfs", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--dir", default=".hdfs", help="working folder: config, data, logs (default .hdfs)")
    parser.add_argument("--port", type=int, default=9000, help="NameNode RPC port on 127.0.0.1 (default 9000)")
    args = parser.parse_args(argv)
    workdir = Path(args.dir).resolve()
    if args.action == "down":
        return _down(workdir)
    if (workdir / "state.json").exists():
        print(f"an HDFS is already recorded under {workdir}: {json.loads((workdir / 'state.json').read_text())['uri']}"
              " (make hdfs-down first)")
        return 1
    cluster = MiniHdfs(workdir, port=args.port)
    try:
        cluster.start()
    except MissingPrerequisite as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    cluster._procs.clear()  # leave the daemons running; `down` stops them by the recorded pids
    print(cluster.uri)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
