"""Loader throughput, memory and shuffle quality: TableLoader against Petastorm and the row-group-read limit.

Side by side, in one run, on the same Parquet files (issue 12):

* ``limit``: pyarrow reading each row group (one core, ``use_threads=False``) and handing out
  zero-copy slices of it as torch tensors: the machine's limit for a reader of this table;
* ``petastorm`` / ``petastorm-shuffle``: Petastorm 0.13 ``make_batch_reader`` +
  ``BatchedDataLoader``, unshuffled, and shuffled (row groups shuffled + a 100,000-row shuffling
  queue). Petastorm needs pyarrow 14, so it runs in a side venv (``--petastorm-venv``, created on
  demand with the recipe of issue 12; never a dependency of the package);
* ``noshuffle`` / ``shuffle``: ``TableLoader`` (world size 1) with shuffling off and on (default
  shuffle buffer and lanes); ``shuffle-nocrc``: shuffled without page-checksum verification (the
  check's cost); ``shuffle-nolanes``: shuffled with lanes off (``shuffle_window_bytes=None``, the
  mixing lanes buy and what they cost); ``shuffle-wide``: shuffled with ``--wide-rows`` rows per shuffle block (the mixing knob);
  ``shuffle-queue``: blocks of ``--queue-block-rows`` ordered by a 100,000-row deterministic
  shuffling queue (``shuffle_queue_rows``, Petastorm's queue size).

The consumer only counts rows. Every pass runs in a fresh process; the passes are interleaved
round by round, so machine load hits every mode alike; the report gives the median rows/s, the
median per-round ratio to Petastorm's unshuffled rate and to the limit, CPU seconds per million
rows (all threads) and the growth of the resident set (VmHWM minus VmRSS before iterating)
against the loader's ``memory_bound`` plus one batch.

Shuffle quality, in one extra untimed pass per shuffled mode over a whole epoch: distinct row
groups per batch (mean) and the fraction of the table (in file order) a batch spans (median).

    .venv/bin/python benchmarks/bench_loader.py --flights-table lakehouse/tables/flights_train
    .venv/bin/python benchmarks/bench_loader.py --rows 1000000 --rounds 1 --no-petastorm   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SPARKDL_MODES = ("noshuffle", "shuffle", "shuffle-nocrc", "shuffle-nolanes", "shuffle-wide", "shuffle-queue")
PETASTORM_MODES = ("petastorm", "petastorm-shuffle")
MODES = ("limit", *PETASTORM_MODES, *SPARKDL_MODES)
MIX_MODES = ("shuffle", "shuffle-nolanes", "shuffle-wide", "shuffle-queue", "petastorm-shuffle")
PETASTORM_QUEUE = 100_000
_PETASTORM_PACKAGES = ["pyspark==4.3.0", "petastorm", "pyarrow==14.0.2", "pandas<3", "numpy<2", "sympy", "networkx",
                       "jinja2", "filelock", "typing-extensions"]


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


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


# ----- tables -----
def make_synthetic(folder: str, rows: int, rows_per_group: int = 131_072) -> list[str]:
    """Issue 12's synthetic table: id, 15 float32, 4 int64; 131,072-row groups; page CRCs written."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    chunk = 8 * rows_per_group
    files = []
    for i, start in enumerate(range(0, rows, chunk)):
        n = min(chunk, rows - start)
        cols: dict[str, Any] = {"id": np.arange(start, start + n, dtype=np.int64)}
        cols.update({f"f{j}": rng.random(n, dtype=np.float32) for j in range(15)})
        cols.update({f"i{j}": rng.integers(0, 1000, n, dtype=np.int64) for j in range(4)})
        path = f"{folder}/part-{i:05d}.parquet"
        pq.write_table(pa.table(cols), path, row_group_size=rows_per_group, compression="snappy",
                       write_page_checksum=True)
        files.append(path)
    return files


def _local(path: str) -> str:
    return path.removeprefix("file://")


# ----- the readers (in the child process) -----
def _limit_batches(files: list[str], batch_size: int) -> Iterable[dict[str, Any]]:
    import torch

    for f in files:
        pf = pq.ParquetFile(f)
        for g in range(pf.num_row_groups):
            t = pf.read_row_group(g, use_threads=False)
            cols = {n: torch.from_dlpack(c.combine_chunks()) for n, c in zip(t.column_names, t.columns)}
            for lo in range(0, t.num_rows, batch_size):
                yield {k: v[lo:lo + batch_size] for k, v in cols.items()}


def _petastorm_batches(files: list[str], batch_size: int, shuffle: bool, epochs: int) -> Iterable[dict[str, Any]]:
    from petastorm import make_batch_reader
    from petastorm.pytorch import BatchedDataLoader

    urls = ["file://" + _local(f) for f in files]
    with make_batch_reader(urls, num_epochs=epochs, shuffle_row_groups=shuffle, seed=0 if shuffle else None) as reader:
        loader = BatchedDataLoader(reader, batch_size=batch_size,
                                   shuffling_queue_capacity=PETASTORM_QUEUE if shuffle else 0)
        yield from loader


def _child(args: argparse.Namespace) -> None:
    """One pass in this (fresh) process; prints one JSON line."""
    import warnings

    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(1)
    files = json.loads(Path(args.files).read_text())
    mode, bs, epochs = args.child, args.batch_size, args.epochs
    out: dict[str, Any] = {"mode": mode, "batch_size": bs, "epochs": epochs}
    loader = None
    if mode == "limit":
        def batches() -> Iterable[dict[str, Any]]:
            for _ in range(epochs):
                yield from _limit_batches(files, bs)
    elif mode in PETASTORM_MODES:
        def batches() -> Iterable[dict[str, Any]]:
            yield from _petastorm_batches(files, bs, mode == "petastorm-shuffle", epochs)
    else:
        from sparkdl.data import LoaderConfig, TableLoader

        extra: dict[str, Any] = {}
        if mode == "shuffle-wide":
            extra = {"shuffle_buffer_rows": args.wide_rows, "shuffle_window_bytes": None}
        elif mode == "shuffle-nolanes":
            extra = {"shuffle_window_bytes": None}
        elif mode == "shuffle-queue":
            extra = {"shuffle_buffer_rows": args.queue_block_rows, "shuffle_queue_rows": PETASTORM_QUEUE}
        cfg = LoaderConfig(batch_size=bs, shuffle=mode != "noshuffle", verify_checksums=mode != "shuffle-nocrc",
                           **extra)
        loader = TableLoader(files, config=cfg)
        out.update(bound=loader.memory_bound.total, bound_text=str(loader.memory_bound), block_rows=loader.block_rows,
                   lanes=loader.shuffle_lanes,
                   one_batch=int(bs * loader._sizes.batch))

        def batches() -> Iterable[dict[str, Any]]:
            for epoch in range(epochs):
                loader.set_epoch(epoch)
                yield from loader
    rows = 0
    if args.mix:
        # Which row group (in file order) and which position each id has: from the footers and the id column.
        ids, groups = [], []
        g0 = 0
        for f in files:
            pf = pq.ParquetFile(_local(f))
            for g in range(pf.num_row_groups):
                col = pf.read_row_group(g, columns=[args.id_column]).column(0).to_numpy()
                ids.append(col)
                groups.append(np.full(len(col), g0 + g))
            g0 += pf.num_row_groups
        all_ids = np.concatenate(ids)
        order = np.argsort(all_ids)
        sorted_ids, group_of, pos_of = all_ids[order], np.concatenate(groups)[order], order
        n = len(all_ids)
        distinct, spans = [], []
        for batch in batches():
            v = batch[args.id_column].numpy()
            k = np.searchsorted(sorted_ids, v)
            distinct.append(len(np.unique(group_of[k])))
            pos = pos_of[k]
            spans.append((pos.max() - pos.min()) / n)
            rows += len(v)
        out.update(rows=rows, groups_per_batch=float(np.mean(distinct)), span_median=float(np.median(spans)),
                   row_groups=int(g0))
    else:
        _reset_peak_rss()
        rss0 = _status("VmRSS")
        cpu0 = _cpu_seconds()
        t0 = time.perf_counter()
        for batch in batches():
            rows += len(next(iter(batch.values())))
        elapsed = time.perf_counter() - t0
        out.update(rows=rows, seconds=elapsed, rows_per_s=rows / elapsed,
                   cpu_s_per_m=(_cpu_seconds() - cpu0) / rows * 1e6, rss_growth=_status("VmHWM") - rss0)
    if loader is not None:
        loader.close()
    print(json.dumps(out))


# ----- the parent -----
def ensure_petastorm_venv(venv: str) -> str | None:
    python = os.path.join(venv, "bin", "python")
    check = [python, "-c", "import petastorm, torch, pyarrow; assert pyarrow.__version__.startswith('14')"]
    if os.path.exists(python) and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    if not os.path.exists(os.path.join(venv, "bin", "petastorm-generate-metadata.py")):
        print(f"creating the Petastorm side venv {venv} (issue 12's recipe) ...", flush=True)
        try:
            subprocess.run(["python3.11", "-m", "venv", venv], check=True)
            pip = [os.path.join(venv, "bin", "pip"), "install", "-q"]
            subprocess.run([*pip, "--no-deps", "torch==2.13.0"], check=True)
            subprocess.run([*pip, *_PETASTORM_PACKAGES], check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            print(f"cannot build the Petastorm venv ({e}); Petastorm is left out")
            return None
    if subprocess.run(check, capture_output=True).returncode != 0:
        # A CUDA build of torch installed --no-deps lacks the nvidia-* libraries it preloads:
        # let the side venv see this interpreter's nvidia package (only that folder, by a link).
        import importlib.util

        spec = importlib.util.find_spec("nvidia")
        if spec is not None and spec.submodule_search_locations:
            shim = Path(venv, "nvidia-shim")
            shim.mkdir(exist_ok=True)
            link = shim / "nvidia"
            if not link.exists():
                link.symlink_to(list(spec.submodule_search_locations)[0])
            site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True).stdout.strip()
            Path(site, "sparkdl-bench-nvidia.pth").write_text(str(shim) + "\n")
    result = subprocess.run(check, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"the Petastorm venv {venv} does not import ({result.stderr.strip().splitlines()[-1:]}); left out")
        return None
    return python


def _run_child(files_json: str, mode: str, bs: int, epochs: int, args: argparse.Namespace, id_column: str,
               mix: bool = False) -> dict[str, Any]:
    python = args.petastorm_python if mode in PETASTORM_MODES else sys.executable
    cmd = [python, os.path.abspath(__file__), "--child", mode, "--files", files_json, "--batch-size", str(bs),
           "--epochs", str(epochs), "--wide-rows", str(args.wide_rows), "--queue-block-rows",
           str(args.queue_block_rows), "--id-column", id_column]
    if mix:
        cmd.append("--mix")
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if mode not in PETASTORM_MODES:
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    else:
        env.pop("PYTHONPATH", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def bench_table(label: str, files: list[str], id_column: str, args: argparse.Namespace, work: Path) -> list[dict]:
    files_json = str(work / f"{label}.files.json")
    Path(files_json).write_text(json.dumps(files))
    num_rows = sum(pq.ParquetFile(_local(f)).metadata.num_rows for f in files)
    groups = sum(pq.ParquetFile(_local(f)).metadata.num_row_groups for f in files)
    epochs = max(1, -(-args.min_rows // num_rows))
    modes = [m for m in args.modes if args.petastorm_python or m not in PETASTORM_MODES]
    print(f"\n== {label}: {num_rows:,} rows, {len(files)} files, {groups} row groups; {epochs} epoch(s) per pass, "
          f"{args.rounds} rounds; load average {_load()}", flush=True)
    for _ in _limit_batches(files, 65_536):  # warm the page cache
        pass
    results = []
    for bs in args.batch_sizes:
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
        for _ in range(args.rounds):
            for mode in modes:
                runs[mode].append(_run_child(files_json, mode, bs, epochs, args, id_column))
        print(f"batch_size={bs}  (load average now {_load()})")
        print(f"  {'mode':18} {'rows/s (median)':>16} {'vs petastorm':>13} {'vs limit':>9} {'CPU s/M rows':>13} "
              f"{'RSS growth MiB':>15} {'bound+1 batch MiB':>18}")
        ref = runs.get("petastorm")
        for mode in modes:
            rs = runs[mode]
            rps = statistics.median(r["rows_per_s"] for r in rs)

            def ratio(other: list[dict[str, Any]] | None) -> str:
                if not other:
                    return "-"
                return f"{statistics.median(r['rows_per_s'] / o['rows_per_s'] for r, o in zip(rs, other)):.2f}x"

            limit = _mib(rs[0]["bound"] + rs[0]["one_batch"]) if "bound" in rs[0] else "-"
            cpu = statistics.median(r["cpu_s_per_m"] for r in rs)
            rss = max(r["rss_growth"] for r in rs)
            print(f"  {mode:18} {rps:>16,.0f} {ratio(ref):>13} {ratio(runs['limit']):>9} {cpu:>13.3f} {_mib(rss):>15} "
                  f"{limit:>18}")
        for mode in modes:
            if "bound_text" in runs[mode][0]:
                print(f"  {mode}: block_rows={runs[mode][0]['block_rows']:,}, bound {runs[mode][0]['bound_text']}")
        results.append({"table": label, "batch_size": bs, "runs": runs})
    if args.mix_batch_size:
        print(f"shuffle quality at batch_size={args.mix_batch_size} (one epoch; row groups of the table: {groups})")
        for mode in [m for m in MIX_MODES if m in modes]:
            r = _run_child(files_json, mode, args.mix_batch_size, 1, args, id_column, mix=True)
            if not r.get("rows"):
                print(f"  {mode:18} no batches came out ({r})")
                continue
            print(f"  {mode:18} row groups per batch {r['groups_per_batch']:6.2f}   "
                  f"median span {r['span_median']:6.1%}")
            results.append({"table": label, "mix": mode, **r})
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=5_000_000, help="rows of the synthetic table (0 skips it)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every mode")
    ap.add_argument("--min-rows", type=int, default=2_000_000, help="read smaller tables several times per pass")
    ap.add_argument("--wide-rows", type=int, default=524_288, help="shuffle_buffer_rows of the shuffle-wide mode")
    ap.add_argument("--queue-block-rows", type=int, default=4_194_304,
                    help="shuffle_buffer_rows of the shuffle-queue mode (its queue holds 100,000 rows)")
    ap.add_argument("--mix-batch-size", type=int, default=1024, help="batch size of the shuffle-quality pass (0: none)")
    ap.add_argument("--flights-table", default=None, help="also measure this Delta table (skipped if absent)")
    ap.add_argument("--flights-id", default="flight_id", help="the flights table's row id column")
    ap.add_argument("--workdir", default=None, help="where to write the synthetic table (default: a temp dir)")
    ap.add_argument("--petastorm-venv", default="/tmp/petastorm-venv")
    ap.add_argument("--no-petastorm", action="store_true")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--json", default=None, help="write every pass's figures to this JSON file")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--files", help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--epochs", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--id-column", default="id", help=argparse.SUPPRESS)
    ap.add_argument("--mix", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return
    import torch

    args.petastorm_python = None if args.no_petastorm else ensure_petastorm_venv(args.petastorm_venv)
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, pyarrow {pa.__version__}, Petastorm "
          f"{'in ' + args.petastorm_venv if args.petastorm_python else 'left out'}; load average {_load()}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sparkdl-bench-loader-"))
    work.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    if args.rows > 0:
        folder = work / f"synthetic_{args.rows}"
        files = sorted(str(p) for p in folder.glob("*.parquet")) if folder.is_dir() else []
        if not files:
            t0 = time.perf_counter()
            files = make_synthetic(str(folder), args.rows)
            print(f"wrote {args.rows:,} rows to {folder} in {time.perf_counter() - t0:.1f}s")
        results += bench_table("synthetic", files, "id", args, work)
    if args.flights_table:
        if Path(args.flights_table, "_delta_log").is_dir():
            from sparkdl.lakehouse import snapshot

            results += bench_table("flights", snapshot(args.flights_table).files, args.flights_id, args, work)
        else:
            print(f"skipping flights: no Delta table at {args.flights_table}")
    if args.json:
        Path(args.json).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
