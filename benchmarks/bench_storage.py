"""Loader rows/s from HDFS and from an S3 endpoint against local disk, on the same table.

One run starts a single-node HDFS (storage/minihdfs.py, `make jars` first) and moto's S3
server, both on 127.0.0.1, and writes the same synthetic table (same rows, same row groups,
one file per append) to a local folder, to hdfs:// and to s3://. Then, round by round, a
``TableLoader`` (world_size=1, shuffle on) streams one epoch from each store, in that order,
so load from other processes hits all three alike; the report gives the median rows/s per
store and the median per-round ratio against local disk.

Delta commit overhead: the median time of a one-row deltalake append (Parquet file + log
commit) on each store, and its ratio to local.

All three stores live on this machine: the figures measure the client stacks (hdfs-native,
pyarrow's S3 client over HTTP, deltalake's object_store), not a network.

    .venv/bin/python benchmarks/bench_storage.py                # 1M rows, 3 rounds
    .venv/bin/python benchmarks/bench_storage.py --rows 200000 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from storage.minihdfs import MiniHdfs  # noqa: E402


def _table(start: int, n: int) -> pa.Table:
    rng = np.random.default_rng(start)
    ids = np.arange(start, start + n, dtype=np.int64)
    return pa.table({
        "id": ids,
        "x": rng.random(n, dtype=np.float32),
        "label": (ids % 2).astype(np.int64),
        "v": pa.FixedSizeListArray.from_arrays(rng.random(n * 8, dtype=np.float32), 8),
    })


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto(workdir: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(workdir / "moto.log", "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=2).close()
            return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("moto server did not start")


def _write(uri: str, rows: int, files: int) -> None:
    import deltalake
    from deltalake import WriterProperties

    per = rows // files
    props = WriterProperties(max_row_group_size=16_384)
    for i in range(files):
        deltalake.write_deltalake(uri, _table(i * per, per), mode="overwrite" if i == 0 else "append",
                                  writer_properties=props)


def _epoch(uri: str) -> tuple[float, int]:
    from sparkdl.data import LoaderConfig, TableLoader

    t = time.perf_counter()
    n = 0
    with TableLoader(uri, config=LoaderConfig(batch_size=1024, seed=0)) as loader:
        for batch in loader:
            n += batch["id"].shape[0]
    return time.perf_counter() - t, n


def _commit(uri: str, reps: int) -> float:
    import deltalake

    times = []
    for i in range(reps):
        t = time.perf_counter()
        deltalake.write_deltalake(uri, pa.table({"k": [i]}), mode="append")
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--commits", type=int, default=7)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
        work = Path(tmp)
        hdfs = MiniHdfs(work / "hdfs")
        hdfs.start()
        moto, url = _start_moto(work)
        try:
            os.environ.update({"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                               "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true", "AWS_EC2_METADATA_DISABLED": "true"})
            import boto3

            boto3.client("s3", endpoint_url=url).create_bucket(Bucket="bench")
            stores = {"local": str(work / "local" / "t"), "hdfs": f"{hdfs.uri}/bench/t", "s3": "s3://bench/t"}
            write_s = {}
            for name, uri in stores.items():
                t = time.perf_counter()
                _write(uri, args.rows, args.files)
                write_s[name] = time.perf_counter() - t
            rates: dict[str, list[float]] = {k: [] for k in stores}
            for _ in range(args.rounds):
                for name, uri in stores.items():
                    seconds, n = _epoch(uri)
                    rates[name].append(n / seconds)
            commit = {name: _commit(uri.replace("/t", "/commits"), args.commits) for name, uri in stores.items()}
        finally:
            moto.terminate()
            hdfs.stop()
    print(f"storage: {args.rows:,} rows x {args.files} files (row groups of 16,384), {args.rounds} rounds, "
          f"loader world_size=1 shuffle on, batch 1024")
    print(f"{'store':6} {'rows/s (median)':>16} {'ratio vs local':>15} {'table write s':>14} {'1-row commit ms':>16} {'commit vs local':>16}")
    for name in stores:
        ratio = statistics.median(r / l for r, l in zip(rates[name], rates["local"]))
        print(f"{name:6} {statistics.median(rates[name]):16,.0f} {ratio:15.2f} {write_s[name]:14.2f} "
              f"{commit[name] * 1e3:16.1f} {commit[name] / commit['local']:16.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
