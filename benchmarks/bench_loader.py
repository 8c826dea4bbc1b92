"""Loader throughput and memory: TableLoader vs a raw pyarrow.dataset -> torch baseline.

Both read the same files in the same run, batch by batch into torch tensors:

* baseline: ``pyarrow.dataset.to_batches(batch_size=B)`` + ``torch.from_numpy`` per column (the
  array column flattened and reshaped), no sharding, no shuffle, no prefetch;
* loader: ``TableLoader`` (world_size=1) with shuffling on (and, for reference, off).

Prints rows/s, the ratio loader/baseline, and the peak memory of each pass (RSS growth over
the pass, sampled every few ms, and Arrow's peak allocation) against the loader's memory
estimate from its configuration: the block read ahead, the current block and its permuted copy
(3 shuffle buffers), the row groups those blocks slice and the one being decoded (3), the
prefetched batches and the consumer's batch. Only the prefetched batches are a hard bound
(prefetch_batches / max_bytes_in_flight); the rest follows from shuffle_buffer_rows and the
table's row-group size, and does not grow with the table.

    .venv/bin/python benchmarks/bench_loader.py                  # 10M-row synthetic table
    .venv/bin/python benchmarks/bench_loader.py --rows 1000000   # quick run
    .venv/bin/python benchmarks/bench_loader.py --flights-table lakehouse/tables/flights_train
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch

from sparkdl.data import LoaderConfig, TableLoader
from sparkdl.lakehouse import snapshot

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: ru_maxrss is a lifetime peak, the best available
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _PeakSampler:
    """Peak RSS growth and peak Arrow allocation while the ``with`` body runs."""

    def __init__(self, every_s: float = 0.005) -> None:
        self.every_s = every_s
        self.rss_peak = 0
        self.arrow_peak = 0

    def __enter__(self) -> "_PeakSampler":
        self._stop = threading.Event()
        self._rss0 = _rss()
        self._arrow0 = pa.total_allocated_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        self.rss_peak = max(self.rss_peak, _rss() - self._rss0)
        self.arrow_peak = max(self.arrow_peak, pa.total_allocated_bytes() - self._arrow0)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def make_synthetic(path: str, rows: int, *, numeric: int = 20, vector: int = 16, rows_per_group: int = 65_536) -> None:
    """A Delta table of ``numeric`` float32/int64 columns and one array<float32>[vector] column."""
    import deltalake
    from deltalake import WriterProperties

    rng = np.random.default_rng(0)
    props = WriterProperties(max_row_group_size=rows_per_group, compression="SNAPPY")
    chunk = 1_000_000
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        cols: dict[str, pa.Array] = {"id": pa.array(np.arange(start, start + n, dtype=np.int64))}
        for j in range(numeric - 1):
            if j % 4 == 3:
                cols[f"i{j}"] = pa.array(rng.integers(0, 1000, n, dtype=np.int64))
            else:
                cols[f"f{j}"] = pa.array(rng.random(n, dtype=np.float32))
        flat = pa.array(rng.random(n * vector, dtype=np.float32))
        offsets = pa.array(np.arange(0, (n + 1) * vector, vector, dtype=np.int32))
        # A variable-length LIST, as Spark writes array<float>.
        cols["vec"] = pa.ListArray.from_arrays(offsets, flat)
        deltalake.write_deltalake(path, pa.table(cols), mode="append", writer_properties=props)


def _tensor_columns(uri: str) -> list[str]:
    """Columns both paths turn into tensors (numbers and arrays of numbers)."""
    out = []
    for f in snapshot(uri).schema:
        t = f.type
        while pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            t = t.value_type
        if pa.types.is_integer(t) or pa.types.is_floating(t):
            out.append(f.name)
    return out


def baseline_batches(files: list[str], columns: list[str], batch_size: int) -> Iterable[dict[str, torch.Tensor]]:
    dataset = ds.dataset(files, format="parquet")
    for rb in dataset.to_batches(columns=columns, batch_size=batch_size):
        batch = {}
        for name, col in zip(rb.schema.names, rb.columns):
            if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                values = col.flatten().to_numpy(zero_copy_only=False)
                batch[name] = torch.from_numpy(values).reshape(len(col), -1)
            else:
                batch[name] = torch.from_numpy(col.to_numpy(zero_copy_only=False))
        yield batch


def measure(make_iter: Callable[[], Iterable[dict[str, torch.Tensor]]]) -> tuple[float, int, _PeakSampler]:
    rows = 0
    with _PeakSampler() as peak:
        t0 = time.perf_counter()
        for batch in make_iter():
            rows += len(next(iter(batch.values())))
        elapsed = time.perf_counter() - t0
    return rows / elapsed, rows, peak


def bench_table(uri: str, label: str, batch_sizes: list[int], prefetch: int) -> None:
    snap = snapshot(uri)
    columns = _tensor_columns(uri)
    print(f"\n== {label}: {uri} (version {snap.version}, {len(snap.files)} files, {len(columns)} tensor columns)")
    # Untimed pass first: both paths then read from a warm page cache and warm allocators.
    for _ in baseline_batches(snap.files, columns, 65_536):
        pass
    for bs in batch_sizes:
        base_rps, base_rows, base_peak = measure(lambda: baseline_batches(snap.files, columns, bs))
        results = {}
        for shuffle in (True, False):
            cfg = LoaderConfig(batch_size=bs, columns=columns, shuffle=shuffle, prefetch_batches=prefetch)
            with TableLoader(uri, config=cfg) as loader:
                rps, rows, peak = measure(lambda: loader)
                one_batch = sum(t.element_size() * t.numel() for t in next(iter(loader)).values())
            results[shuffle] = (rps, rows, peak)
        row_bytes = one_batch / bs
        block_bytes = cfg.block_rows * row_bytes
        group_rows = max(pq.read_metadata(f).row_group(i).num_rows
                         for f in snap.files for i in range(pq.read_metadata(f).num_row_groups))
        bound = 3 * block_bytes + 3 * group_rows * row_bytes + (prefetch + 1) * one_batch
        print(f"batch_size={bs}: baseline {base_rps:,.0f} rows/s ({base_rows:,} rows), "
              f"RSS +{base_peak.rss_peak / 2**20:.0f} MiB, Arrow peak {base_peak.arrow_peak / 2**20:.0f} MiB")
        for shuffle, (rps, rows, peak) in results.items():
            print(f"  loader shuffle={shuffle!s:5}: {rps:,.0f} rows/s ({rows:,} rows)  ratio {rps / base_rps:.2f}x  "
                  f"RSS +{peak.rss_peak / 2**20:.0f} MiB, Arrow peak {peak.arrow_peak / 2**20:.0f} MiB "
                  f"= {peak.arrow_peak / bound:.2f} x estimate")
        print(f"  estimate {bound / 2**20:.0f} MiB = 3 x {cfg.block_rows:,}-row shuffle buffer ({block_bytes / 2**20:.1f} MiB) "
              f"+ 3 x {group_rows:,}-row group + {prefetch} prefetched + 1 consumer batch of {one_batch / 2**20:.2f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000, help="rows of the synthetic table (default 10M)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--prefetch", type=int, default=4, help="LoaderConfig.prefetch_batches")
    ap.add_argument("--flights-table", default=None, help="also measure this Delta table (skipped if absent)")
    ap.add_argument("--workdir", default=None, help="where to write the synthetic table (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic table")
    args = ap.parse_args()
    torch.set_num_threads(1)

    if args.flights_table:
        if Path(args.flights_table, "_delta_log").is_dir():
            bench_table(args.flights_table, "flights", args.batch_sizes, args.prefetch)
        else:
            print(f"skipping flights: no Delta table at {args.flights_table}")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="sparkdl-bench-loader-"))
    uri = str(work / f"synthetic_{args.rows}")
    try:
        if not Path(uri, "_delta_log").is_dir():
            t0 = time.perf_counter()
            make_synthetic(uri, args.rows)
            print(f"wrote {args.rows:,} rows to {uri} in {time.perf_counter() - t0:.1f}s")
        bench_table(uri, "synthetic", args.batch_sizes, args.prefetch)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
