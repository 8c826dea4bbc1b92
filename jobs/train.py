r"""Train a model on lakehouse tables in one barrier-mode Spark stage and publish it.

    spark-submit --properties-file spark-conf/local.conf jobs/train.py --lakehouse ./lakehouse \
        --train-table flights_train --valid-table flights_valid --model tabular_mlp --model-name flights_delay

The run id is printed first; after a failure, continue the run with --resume --run-id <id>.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys


_LISTS = ("feature_columns", "pipeline_split", "fsdp_wrap")  # comma-separated on the command line


def _field_docs(cls: type) -> dict[str, str]:
    """Field docstrings (the string literal after each field) as --help text."""
    docs: dict[str, str] = {}
    src = inspect.getsource(cls).splitlines()
    names = {f.name for f in dataclasses.fields(cls)}
    for i, line in enumerate(src[:-1]):
        name = line.strip().split(":")[0]
        if name in names and src[i + 1].strip().startswith('"""'):
            docs[name] = src[i + 1].strip().strip('"')
    return docs


def _parser() -> argparse.ArgumentParser:
    from sparkdl.tasks import TASKS
    from sparkdl.train.config import COMPRESSION, OPTIMIZERS, PRECISION, SCHEDULES, STRATEGIES, TrainConfig
    from sparkdl.train.parallel.mesh import PARALLELISMS, PIPELINE_SCHEDULES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default=None,
                   help="Spark profile from spark-conf/ (default: local from plain Python; under spark-submit, only "
                        "what spark-submit was given, the profile filling in unset keys)")
    p.add_argument("--remote", default=None,
                   help="Spark Connect server to run on (sc://host:port; default: the SPARK_REMOTE environment "
                        "variable, else a classic session from --profile)")
    p.add_argument("--debug", action="store_true", help="on failure, also print the failing rank's traceback")
    choices = {"optimizer": OPTIMIZERS, "compression": COMPRESSION, "precision": PRECISION, "lr_schedule": SCHEDULES,
               "strategy": STRATEGIES, "task": TASKS,
               "parallelism": PARALLELISMS, "pipeline_schedule": PIPELINE_SCHEDULES}
    docs = _field_docs(TrainConfig)
    floats = ("lr", "grad_clip", "momentum", "weight_decay", "start_timeout_s", "collective_timeout_s", "outer_lr",
              "outer_momentum", "easgd_alpha", "bmuf_block_momentum", "bmuf_block_lr", "ps_timeout_s", "fedavg_local_lr",
              "dp_clip", "dp_noise_multiplier", "dp_delta", "ddp_bucket_cap_mb")
    optional_ints = ("train_version", "valid_version", "max_steps", "fedavg_clients_per_round", "num_classes",
                     "data_parallel_size")
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("fault_injection", "model_kwargs", "straggler"):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = None if f.default is dataclasses.MISSING else f.default
        help_text = f"{docs.get(f.name, '')} (default: {default})"
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif f.name in _LISTS:
            p.add_argument(flag, default=None, help=help_text + "; comma-separated")
        else:
            typ = float if f.name in floats else int if isinstance(default, int) or f.name in optional_ints else str
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            p.add_argument(flag, type=typ, default=default, required=required, choices=choices.get(f.name),
                           help=help_text)
    p.add_argument("--model-kwargs", default="{}", help="JSON object of model factory arguments (default: {})")
    p.add_argument("--tracking", action="store_true",
                   help="log the run to MLflow: parameters, per-epoch metrics, curves and the published model")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (implies --tracking; default: sqlite under a local lakehouse)")
    p.add_argument("--experiment", default="sparkdl", help="MLflow experiment name (default: sparkdl)")
    return p


def _resume_hint(config) -> str:
    from sparkdl.lakehouse import Lakehouse
    from sparkdl.train.checkpoint import latest_checkpoint

    try:
        ckpt = latest_checkpoint(Lakehouse(config.lakehouse).run(config.run_id))
    except Exception:  # the hint must never hide the real error
        ckpt = None
    if ckpt is None:
        return f"run {config.run_id} wrote no checkpoint; fix the cause and start again"
    return f"run {config.run_id} is kept at its last checkpoint; continue it with --resume --run-id {config.run_id}"


def main(argv: list[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    profile = args.pop("profile")
    remote = args.pop("remote")
    debug = args.pop("debug")
    tracking_flags = (args.pop("tracking"), args.pop("tracking_uri"), args.pop("experiment"))
    try:
        args["model_kwargs"] = json.loads(args.pop("model_kwargs"))
    except ValueError as e:
        print(f"sparkdl train failed: --model-kwargs is not JSON: {e}", file=sys.stderr)
        return 1
    for name in _LISTS:
        if args.get(name):
            args[name] = [c.strip() for c in args[name].split(",")]
    from sparkdl.errors import SparkDLError
    from sparkdl.tracking import TrackingConfig, check_tracking, track_fit
    from sparkdl.train import TrainConfig, fit

    try:
        config = TrainConfig(**args)
        enabled, uri, experiment = tracking_flags
        tracking = TrackingConfig(enabled=enabled or bool(uri), uri=uri, experiment=experiment)
        check_tracking(tracking, lakehouse=config.lakehouse)  # a bad store fails before any training
    except (ValueError, RuntimeError) as e:
        print(f"sparkdl train failed: {e}", file=sys.stderr)
        return 1
    print(f"run {config.run_id}{' (resumed)' if config.resume else ''}", flush=True)
    spark = None
    try:
        if not config.local_mode:
            from sparkdl import spark_session

            spark = spark_session(profile, app_name="sparkdl-train", remote=remote)
        result = fit(config, spark=spark)
    except (SparkDLError, ValueError, RuntimeError, FloatingPointError) as e:
        text = str(e).strip()
        print(f"sparkdl train failed: {text.splitlines()[0] if text else type(e).__name__}", file=sys.stderr)
        if debug and "\n" in text:
            print(text, file=sys.stderr)
        print(_resume_hint(config), file=sys.stderr)
        return 1
    finally:
        if spark is not None:
            spark.stop()
    print(f"run {result.run_id}: {result.steps} steps in {result.elapsed:.1f}s; metrics {json.dumps(result.metrics)}")
    if result.model_version:
        print(f"published {result.model_name} v{result.model_version}")
    print(f"curves: {result.curves_png}")
    try:
        mlflow_run = track_fit(tracking, lakehouse=config.lakehouse, train_config=config, result=result)
    except Exception as e:  # the model is published already: say so, and fail the job
        print(f"sparkdl train: the model was published, but logging to MLflow failed: {type(e).__name__}: {e}",
              file=sys.stderr)
        return 1
    if mlflow_run:
        print(f"mlflow run {mlflow_run} ({tracking.uri or 'sqlite under the lakehouse'})")
    return 0


if __name__ == "__main__":
    from sparkdl.cli import run_job

    sys.exit(run_job("train", main, owns_debug_flag=True))
