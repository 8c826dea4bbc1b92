"""ETL -> train -> evaluate -> predict as one batch job.

    spark-submit --properties-file spark-conf/local.conf jobs/pipeline.py --lakehouse ./lakehouse
    python jobs/pipeline.py --lakehouse ./lakehouse          # same, session from --profile

Exits 0 with a summary, or 1 with a one-line reason naming the failed stage.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lakehouse", default="lakehouse", help="lakehouse root (default: ./lakehouse)")
    p.add_argument("--profile", default=None,
                   help="Spark profile from spark-conf/ (default: local from plain Python; under spark-submit, only what spark-submit was given, the profile filling in unset keys)")
    p.add_argument("--model-name", default="flights_delay", help="published model name")
    p.add_argument("--epochs", type=int, default=2, help="training epochs (default 2)")
    p.add_argument("--batch-size", type=int, default=512, help="per-rank batch size (default 512)")
    p.add_argument("--lr", type=float, default=0.003, help="learning rate (default 0.003)")
    p.add_argument("--num-ranks", type=int, default=2, help="training ranks (default 2)")
    p.add_argument("--local-mode", action="store_true", help="train in processes on this machine, not executors")
    p.add_argument("--use-gpu", action="store_true", help="train with NCCL on executor GPUs")
    p.add_argument("--force-etl", action="store_true", help="re-run the ETL even if its inputs are unchanged")
    p.add_argument("--stages", default="etl,train,evaluate,predict", help="comma-separated subset of stages")
    p.add_argument("--tracking", action="store_true", help="log the run to MLflow")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default: sqlite under the lakehouse)")
    args = p.parse_args(argv)

    from sparkdl import spark_session
    from sparkdl.pipeline import PipelineConfig, PipelineStageError, format_summary, run_pipeline
    from sparkdl.tracking import TrackingConfig

    try:
        config = PipelineConfig(
            lakehouse=args.lakehouse, model_name=args.model_name, epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, num_ranks=args.num_ranks, local_mode=args.local_mode,
            use_gpu=args.use_gpu, force_etl=args.force_etl,
            tracking=TrackingConfig(enabled=args.tracking or bool(args.tracking_uri), uri=args.tracking_uri),
        )
        spark = spark_session(args.profile, app_name="sparkdl-pipeline")
        result = run_pipeline(config, spark=spark, stages=tuple(s.strip() for s in args.stages.split(",") if s.strip()))
    except (PipelineStageError, ValueError, RuntimeError) as e:
        print(f"sparkdl pipeline failed: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    print(format_summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
