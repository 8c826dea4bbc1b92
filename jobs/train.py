"""Train a model on lakehouse tables in one barrier-mode Spark stage and publish it.

    spark-submit --properties-file spark-conf/local.conf jobs/train.py --lakehouse ./lakehouse \
        --train-table flights_train --valid-table flights_valid --model flights_mlp --model-name flights_delay
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def _parser() -> argparse.ArgumentParser:
    from sparkdl.train.config import COMPRESSION, OPTIMIZERS, PRECISION, SCHEDULES, TrainConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default=None,
                   help="Spark profile from spark-conf/ (default: local from plain Python; under spark-submit, only what spark-submit was given, the profile filling in unset keys)")
    choices = {"optimizer": OPTIMIZERS, "compression": COMPRESSION, "precision": PRECISION, "lr_schedule": SCHEDULES}
    docs = {f.name: (f.metadata.get("doc") or "") for f in dataclasses.fields(TrainConfig)}
    import inspect

    # Field docstrings follow each field in the source: reuse them as --help text.
    src = inspect.getsource(TrainConfig).splitlines()
    for i, line in enumerate(src):
        name = line.strip().split(":")[0]
        if name in docs and i + 1 < len(src) and src[i + 1].strip().startswith('"""'):
            docs[name] = src[i + 1].strip().strip('"')
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("fault_injection", "model_kwargs"):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = None if f.default is dataclasses.MISSING else f.default
        help_text = f"{docs[f.name]} (default: {default})"
        if f.type in ("bool",) or isinstance(default, bool):
            p.add_argument(flag, action="store_true", default=default, help=help_text)
        elif f.name == "feature_columns":
            p.add_argument(flag, default=None, help=help_text + "; comma-separated")
        else:
            typ = float if isinstance(default, float) or f.name in ("lr", "grad_clip") else (
                int if isinstance(default, int) or f.name in ("train_version", "valid_version", "max_steps") else str)
            p.add_argument(flag, type=typ, default=default, required=f.default is dataclasses.MISSING and
                           f.default_factory is dataclasses.MISSING, choices=choices.get(f.name), help=help_text)
    p.add_argument("--model-kwargs", default="{}", help="JSON object of model factory arguments (default: {})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    profile = args.pop("profile")
    args["model_kwargs"] = json.loads(args.pop("model_kwargs"))
    if args.get("feature_columns"):
        args["feature_columns"] = [c.strip() for c in args["feature_columns"].split(",")]
    from sparkdl import spark_session
    from sparkdl.train import TrainConfig, fit

    try:
        config = TrainConfig(**args)
        spark = None if config.local_mode else spark_session(profile, app_name="sparkdl-train")
        result = fit(config, spark=spark)
    except (ValueError, RuntimeError) as e:
        print(f"sparkdl train failed: {e}", file=sys.stderr)
        return 1
    print(f"run {result.run_id}: {result.steps} steps in {result.elapsed:.1f}s; metrics {json.dumps(result.metrics)}")
    if result.model_version:
        print(f"published {result.model_name} v{result.model_version}")
    print(f"curves: {result.curves_png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
