"""Score a Delta table with a published model and write a predictions Delta table.

    spark-submit jobs/predict.py --lakehouse ./lakehouse --model flights_delay \
        --input flights_clean --output flights_predictions

The prediction columns follow the model's task (sparkdl.tasks): binary prediction + score,
multiclass prediction + score + probabilities, multilabel prediction + probabilities vectors,
regression prediction. Exits 0 after printing where the predictions went, or 1 with a one-line
reason.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lakehouse", default="lakehouse", help="lakehouse root (default: ./lakehouse)")
    p.add_argument("--profile", default=None,
                   help="Spark profile from spark-conf/ (default: local from plain Python; under spark-submit, only what spark-submit was given, the profile filling in unset keys)")
    p.add_argument("--remote", default=None,
                   help="Spark Connect server to run on (sc://host:port; default: the SPARK_REMOTE environment "
                        "variable, else a classic session from --profile)")
    p.add_argument("--model", required=True, help="published model name")
    p.add_argument("--model-version", type=int, default=None, help="model version (default: latest)")
    p.add_argument("--input", required=True, help="input table name (under the lakehouse) or Delta URI")
    p.add_argument("--input-version", type=int, default=None, help="input table version (default: latest)")
    p.add_argument("--output", required=True, help="predictions table name or Delta URI")
    p.add_argument("--batch-size", type=int, default=1024, help="rows per model call (default 1024)")
    p.add_argument("--mode", choices=["append", "overwrite"], default="append", help="write mode (default append)")
    p.add_argument("--keep", default=None,
                   help="comma-separated input columns to copy next to the predictions (default: the id columns)")
    args = p.parse_args(argv)

    try:
        from sparkdl.predict import PredictConfig, predict_table

        config = PredictConfig(
            lakehouse=args.lakehouse, model_name=args.model, model_version=args.model_version,
            input_table=args.input, input_version=args.input_version, output_table=args.output,
            batch_size=args.batch_size, mode=args.mode,
            keep_columns=[c.strip() for c in args.keep.split(",")] if args.keep else None,
        )
        from sparkdl import spark_session

        res = predict_table(config, spark=spark_session(args.profile, app_name="sparkdl-predict", remote=args.remote))
    except Exception as e:  # one line for a scheduler; the cause of a Spark failure included
        from sparkdl.pipeline import failure_reason

        print(f"sparkdl predict failed: {failure_reason(e)}", file=sys.stderr)
        return 1
    print(
        f"wrote {res.rows} predictions of {res.model_name} v{res.model_version} on {res.input_uri} "
        f"v{res.input_version} to {res.output_uri} v{res.output_version} in {res.seconds:.1f}s"
    )
    return 0


if __name__ == "__main__":
    from sparkdl.cli import run_job

    sys.exit(run_job("predict", main))
