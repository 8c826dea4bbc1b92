"""Loader throughput and memory: TableLoader vs a raw pyarrow.dataset -> torch baseline.

Both read the same files in the same run, batch by batch into torch tensors:

* baseline: ``pyarrow.dataset.to_batches(batch_size=B)`` + ``torch.from_numpy`` per column (the
  array column flattened and reshaped), no sharding, no shuffle, no prefetch;
* loader: ``TableLoader`` (world_size=1) with shuffling on, off, and on under a
  ``max_memory_bytes`` budget.

Every pass runs in a fresh Python process (so one pass's allocator state cannot flatter or
hurt another), and the passes are interleaved round by round (baseline, loader, ...), so
that load from other processes on the machine hits both sides alike; the report gives the
median rows/s per mode, the median of the per-round ratios loader/baseline, and the CPU
seconds (all threads) per million rows, which contention distorts less than wall time.

Memory: the growth of the process's resident set while it iterates (VmHWM, the kernel's
high-water mark, reset before the pass, minus VmRSS at the start; the largest over a mode's
passes), and, in one extra pass per mode (not timed: sampling slows the threads it samples),
the peak of the live bytes Arrow's pool and glibc malloc (torch, numpy) hold, sampled every
2 ms; both against the loader's ``memory_bound`` plus one batch (the consumer's).

    .venv/bin/python benchmarks/bench_loader.py                  # 10M-row synthetic table
    .venv/bin/python benchmarks/bench_loader.py --rows 1000000   # quick run
    .venv/bin/python benchmarks/bench_loader.py --flights-table lakehouse/tables/flights_train --rows 0
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import torch

from sparkdl.data import LoaderConfig, TableLoader
from sparkdl.lakehouse import snapshot

MODES = ("baseline", "shuffle", "no-shuffle", "shuffle+budget")


def _cpu_seconds() -> float:
    """User + system CPU time of the whole process (every thread) so far."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ----- memory probes (Linux) -----
def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.mallinfo2.restype = _Mallinfo2
except (OSError, AttributeError):
    _LIBC = None


def _live_bytes() -> int:
    """Bytes Arrow's pool and glibc malloc (torch and numpy CPU memory) hold right now."""
    heap = 0
    if _LIBC is not None:
        info = _LIBC.mallinfo2()
        heap = info.uordblks + info.hblkhd
    return pa.total_allocated_bytes() + heap


class _Peak:
    def __init__(self, every_s: float = 0.002) -> None:
        self.every_s, self.peak, self.start = every_s, 0, 0

    def __enter__(self) -> "_Peak":
        self.start = _live_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, _live_bytes() - self.start)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _live_bytes() - self.start)


# ----- the two readers -----
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


def _child(args: argparse.Namespace) -> None:
    """One pass in this (fresh) process; prints one JSON line."""
    import warnings

    warnings.simplefilter("ignore")  # from_numpy on read-only Arrow memory
    torch.set_num_threads(1)
    uri, bs = args.uri, args.batch_size
    columns = _tensor_columns(uri)
    loader = None
    out: dict[str, Any] = {"mode": args.child, "batch_size": bs, "epochs": args.epochs}
    if args.child == "baseline":
        files = snapshot(uri).files

        def epochs() -> Iterable[dict[str, torch.Tensor]]:
            for _ in range(args.epochs):
                yield from baseline_batches(files, columns, bs)
    else:
        cfg = LoaderConfig(
            batch_size=bs, columns=columns, shuffle=args.child != "no-shuffle", prefetch_batches=args.prefetch,
            max_memory_bytes=args.budget_mib * 2**20 if args.child == "shuffle+budget" else None,
        )
        loader = TableLoader(uri, config=cfg)

        def epochs() -> Iterable[dict[str, torch.Tensor]]:
            for epoch in range(args.epochs):
                loader.set_epoch(epoch)
                yield from loader
        out.update(bound=loader.memory_bound.total, bound_text=str(loader.memory_bound), block_rows=loader.block_rows,
                   one_batch=int(bs * loader._sizes.batch))
    rows = 0
    _reset_peak_rss()
    rss0 = _status("VmRSS")
    # The live-bytes sampler locks malloc's arenas every few ms, which slows the threads it
    # samples: its passes measure memory only, the timed passes run without it.
    sampler = _Peak() if args.sample else None
    if sampler is not None:
        sampler.__enter__()
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    for batch in epochs():
        rows += len(next(iter(batch.values())))
    elapsed = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    if sampler is not None:
        sampler.__exit__()
    out.update(rows=rows, seconds=elapsed, rows_per_s=rows / elapsed, cpu_s_per_m=cpu / rows * 1e6,
               rss_growth=_status("VmHWM") - rss0,
               live_peak=sampler.peak if sampler is not None else None)
    if loader is not None:
        loader.close()
    print(json.dumps(out))


def _run_child(uri: str, mode: str, bs: int, epochs: int, args: argparse.Namespace, sample: bool = False) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", mode, "--uri", uri, "--batch-size", str(bs), "--epochs", str(epochs),
           "--prefetch", str(args.prefetch), "--budget-mib", str(args.budget_mib)] + (["--sample"] if sample else [])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.update(kv.split("=", 1) for kv in args.child_env)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def bench_table(uri: str, label: str, args: argparse.Namespace) -> None:
    snap = snapshot(uri)
    # Small tables are read several times per pass, so that a pass lasts long enough to time.
    epochs = max(1, -(-args.min_rows // snap.num_rows))
    print(f"\n== {label}: {uri} (version {snap.version}, {snap.num_rows:,} rows, {len(snap.files)} files, "
          f"{len(_tensor_columns(uri))} tensor columns); {epochs} epoch(s) per pass, {args.rounds} rounds, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    # Untimed pass first, so that every timed pass reads from a warm page cache.
    for _ in baseline_batches(snap.files, _tensor_columns(uri), 65_536):
        pass
    for bs in args.batch_sizes:
        modes = ["baseline", *[m for m in args.modes if m != "baseline"]]
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
        for _ in range(args.rounds):
            for mode in modes:
                runs[mode].append(_run_child(uri, mode, bs, epochs, args))
        sampled = {mode: _run_child(uri, mode, bs, epochs, args, sample=True) for mode in modes}
        base = [r["rows_per_s"] for r in runs["baseline"]]
        env = f", child env {' '.join(args.child_env)}" if args.child_env else ""
        print(f"batch_size={bs}  (load average now {os.getloadavg()[0]:.1f}{env})")
        print(f"  {'mode':15} {'rows/s (median)':>16} {'ratio (median, min..max)':>26} {'CPU s/M rows':>13} "
              f"{'RSS growth MiB':>15} {'live peak MiB':>14} {'bound+1 batch MiB':>18}")
        for mode in modes:
            rs = runs[mode]
            rps = statistics.median(r["rows_per_s"] for r in rs)
            ratios = [r["rows_per_s"] / b for r, b in zip(rs, base)]
            rss = max(r["rss_growth"] for r in [*rs, sampled[mode]])
            live = sampled[mode]["live_peak"]
            limit = f"{_mib(rs[0]['bound'] + rs[0]['one_batch'])}" if "bound" in rs[0] else "-"
            ratio = "-" if mode == "baseline" else (
                f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}..{max(ratios):.2f})")
            cpu = statistics.median(r["cpu_s_per_m"] for r in rs)
            print(f"  {mode:15} {rps:>16,.0f} {ratio:>26} {cpu:>13.2f} {_mib(rss):>15} {_mib(live):>14} {limit:>18}")
        for mode in modes[1:]:
            r = runs[mode][0]
            print(f"  {mode}: block_rows={r['block_rows']:,}, bound {r['bound_text']}")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"table": label, "uri": uri, "batch_size": bs, "runs": runs, "sampled": sampled}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000, help="rows of the synthetic table (default 10M; 0 skips it)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--prefetch", type=int, default=4, help="LoaderConfig.prefetch_batches")
    ap.add_argument("--budget-mib", type=int, default=64, help="max_memory_bytes of the shuffle+budget pass, MiB")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every mode")
    ap.add_argument("--min-rows", type=int, default=2_000_000, help="read smaller tables several times per pass")
    ap.add_argument("--flights-table", default=None, help="also measure this Delta table (skipped if absent)")
    ap.add_argument("--workdir", default=None, help="where to write the synthetic table (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic table")
    ap.add_argument("--json", default=None, help="append every pass's figures to this JSON-lines file")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="modes to run (baseline first)")
    ap.add_argument("--child-env", nargs="*", default=[], metavar="KEY=VALUE",
                    help="environment of the measured processes, e.g. MIMALLOC_PURGE_DELAY=0 MALLOC_ARENA_MAX=1")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--uri", help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--epochs", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--sample", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, pyarrow {pa.__version__}, "
          f"Arrow pool {pa.default_memory_pool().backend_name}")

    if args.flights_table:
        if Path(args.flights_table, "_delta_log").is_dir():
            bench_table(args.flights_table, "flights", args)
        else:
            print(f"skipping flights: no Delta table at {args.flights_table}")
    if args.rows <= 0:
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sparkdl-bench-loader-"))
    uri = str(work / f"synthetic_{args.rows}")
    try:
        if not Path(uri, "_delta_log").is_dir():
            t0 = time.perf_counter()
            make_synthetic(uri, args.rows)
            print(f"wrote {args.rows:,} rows to {uri} in {time.perf_counter() - t0:.1f}s")
        bench_table(uri, "synthetic", args)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
