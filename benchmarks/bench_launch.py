"""Launch to first training step: sparkdl's barrier launcher vs pyspark's TorchDistributor.

Both run the same function (a tiny DDP model step on 2 ranks, gloo) in the same local[2]
SparkSession; the function returns the wall time of its first step, and latency is measured
from the driver's call. Prints medians and the ratio.

    .venv/bin/python benchmarks/bench_launch.py [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time


def first_step() -> float:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not dist.is_initialized():  # TorchDistributor's torchrun sets env:// variables
        dist.init_process_group("gloo")
    model = DDP(torch.nn.Linear(8, 1))
    loss = model(torch.randn(4, 8)).sum()
    loss.backward()
    return time.time()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    from pyspark.ml.torch.distributor import TorchDistributor

    from sparkdl import spark_session
    from sparkdl.train import LaunchConfig, run_distributed

    spark = spark_session("local", master="local[2]", app_name="bench-launch")
    ours, theirs = [], []
    for _ in range(args.reps):
        t0 = time.time()
        ours.append(run_distributed(first_step, spark=spark, config=LaunchConfig(num_ranks=2)) - t0)
        t0 = time.time()
        theirs.append(TorchDistributor(num_processes=2, local_mode=False, use_gpu=False).run(first_step) - t0)
    o, t = statistics.median(ours), statistics.median(theirs)
    print(f"sparkdl run_distributed: median {o:.2f}s to first step  {['%.2f' % x for x in ours]}")
    print(f"TorchDistributor:        median {t:.2f}s to first step  {['%.2f' % x for x in theirs]}")
    print(f"ratio (TorchDistributor / sparkdl): {t / o:.1f}x  (goal >= 5x)")
    spark.stop()


if __name__ == "__main__":
    main()
