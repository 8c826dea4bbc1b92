"""ETL -> train -> evaluate -> predict as one batch job, for any dataset config.

    spark-submit --properties-file spark-conf/local.conf jobs/pipeline.py --lakehouse ./lakehouse --config my_data.yaml
    python jobs/pipeline.py --lakehouse ./lakehouse          # the bundled flights config, session from --profile

--config names the dataset YAML (docs/preprocessing.md); its train: section holds the training
options (TrainConfig fields), which the flags below override.

Exits 0 with a summary, or 1 with a one-line reason naming the failed stage.
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lakehouse", default="lakehouse", help="lakehouse root (default: ./lakehouse)")
    p.add_argument("--profile", default=None,
                   help="Spark profile from spark-conf/ (default: local from plain Python; under spark-submit, only what spark-submit was given, the profile filling in unset keys)")
    p.add_argument("--remote", default=None,
                   help="Spark Connect server to run on (sc://host:port; default: the SPARK_REMOTE environment "
                        "variable, else a classic session from --profile)")
    p.add_argument("--config", default=None, help="dataset YAML (default: the bundled flights config)")
    p.add_argument("--model", default=None, help="model factory (registered name or module:factory); default: the config's train.model")
    p.add_argument("--model-name", default=None, help="published model name (default: the config's train.model_name, else the dataset)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the config's)")
    p.add_argument("--batch-size", type=int, default=None, help="per-rank batch size (default: the config's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the config's)")
    p.add_argument("--num-ranks", type=int, default=None, help="training ranks (default: the config's)")
    p.add_argument("--seed", type=int, default=0, help="seed of training and the loader's shuffles (default 0)")
    p.add_argument("--local-mode", action="store_true", help="train in processes on this machine, not executors")
    p.add_argument("--use-gpu", action="store_true", help="train with NCCL on executor GPUs")
    p.add_argument("--min-count", type=int, default=None, help="ETL: min count of every vocabulary (default: the config's)")
    p.add_argument("--valid-fraction", type=float, default=None, help="ETL: validation fraction (default: the config's)")
    p.add_argument("--sample-fraction", type=float, default=1.0,
                   help="ETL: keep this fraction of the raw rows (default 1.0 = all)")
    p.add_argument("--force-etl", action="store_true", help="re-run the ETL even if its inputs are unchanged")
    p.add_argument("--score-table", default=None, help="table scored by the predict stage (default: the clean table, else valid)")
    p.add_argument("--predictions-table", default=None, help="predictions table to append to (default: <dataset>_predictions)")
    p.add_argument("--stages", default="etl,train,evaluate,predict", help="comma-separated subset of stages")
    p.add_argument("--tracking", action="store_true", help="log the run to MLflow")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (implies --tracking; default: sqlite under a local lakehouse)")
    p.add_argument("--experiment", default="sparkdl", help="MLflow experiment name (default sparkdl)")
    return p


def _reason(e: Exception) -> str:
    from sparkdl.pipeline import PipelineStageError, failure_reason

    if isinstance(e, (PipelineStageError, ValueError)):  # already a one-line, user-facing reason
        return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    return failure_reason(e)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from sparkdl.pipeline import PipelineConfig, check_stages, format_summary, run_pipeline, train_config
        from sparkdl.tracking import TrackingConfig, check_tracking

        # Everything that can be checked without Spark is checked before a JVM starts.
        stages = check_stages([s.strip() for s in args.stages.split(",") if s.strip()])
        config = PipelineConfig(
            lakehouse=args.lakehouse, config=args.config, train={"model": args.model} if args.model else {},
            model_name=args.model_name, epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, num_ranks=args.num_ranks, local_mode=args.local_mode,
            use_gpu=args.use_gpu, min_count=args.min_count, valid_fraction=args.valid_fraction,
            sample_fraction=args.sample_fraction, force_etl=args.force_etl, score_table=args.score_table,
            predictions_table=args.predictions_table, seed=args.seed,
            tracking=TrackingConfig(enabled=args.tracking or bool(args.tracking_uri), uri=args.tracking_uri,
                                    experiment=args.experiment),
        )
        check_tracking(config.tracking, lakehouse=config.lakehouse)
        train_config(config)  # the dataset config and the training options, checked before a JVM starts

        from sparkdl import spark_session

        spark = spark_session(args.profile, app_name="sparkdl-pipeline", remote=args.remote)
        result = run_pipeline(config, spark=spark, stages=stages)
    except Exception as e:  # a scheduler reads one line and the exit code
        print(f"sparkdl pipeline failed: {_reason(e)}", file=sys.stderr)
        return 1
    print(format_summary(result))
    return 0


if __name__ == "__main__":
    from sparkdl.cli import run_job

    sys.exit(run_job("pipeline", main))
