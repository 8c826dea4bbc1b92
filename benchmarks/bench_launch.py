"""Launch to first training step: sparkdl's run_distributed vs pyspark's TorchDistributor.

Both run the same function on 2 ranks as a barrier stage of the same SparkSession (local[2],
gloo): build a tiny DDP model and take one optimizer step; the function returns the wall-clock
time of that first step. Launch latency = first step time - the driver's call time. The two
launchers alternate, ``--reps`` times each, after one untimed warm-up of each (JVM, Python
workers, imports). Medians and the ratio are printed.

TorchDistributor starts ``torchrun`` in each barrier task, which spawns a fresh Python
process that imports torch and pickles the function through files; run_distributed runs the
function inside the task's own (reused) Python worker.

    .venv/bin/python benchmarks/bench_launch.py            # 3 reps each
    .venv/bin/python benchmarks/bench_launch.py --reps 5 --local-mode   # also local-mode processes
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import traceback

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")


def first_step(init_group: bool) -> float:
    """One DDP step of a tiny model; returns time.time() when the step has finished."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    if init_group:  # TorchDistributor only sets the env vars; torchrun's rank initializes the group
        dist.init_process_group("gloo")
    try:
        torch.manual_seed(0)
        model = DDP(torch.nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.randn(16, 8), torch.randn(16, 1)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return time.time()
    finally:
        if init_group:
            dist.destroy_process_group()


def _ours(spark, local_mode: bool) -> float:
    from sparkdl.train import LaunchConfig, run_distributed

    start = time.time()
    t = run_distributed(first_step, False, spark=spark, config=LaunchConfig(num_ranks=2, local_mode=local_mode))
    return t - start


def _torch_distributor(spark) -> float:
    from pyspark.ml.torch.distributor import TorchDistributor

    start = time.time()
    t = TorchDistributor(num_processes=2, local_mode=False, use_gpu=False).run(first_step, True)
    return t - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of each launcher")
    parser.add_argument("--local-mode", action="store_true", help="also time run_distributed's local mode")
    args = parser.parse_args()

    from sparkdl.session import spark_session

    spark = spark_session("local", master="local[2]", app_name="bench-launch",
                          conf={"spark.default.parallelism": "2"})
    runs: dict[str, list[float]] = {"run_distributed": [], "TorchDistributor": []}
    if args.local_mode:
        runs["run_distributed (local mode)"] = []
    launchers = {
        "run_distributed": lambda: _ours(spark, False),
        "TorchDistributor": lambda: _torch_distributor(spark),
        "run_distributed (local mode)": lambda: _ours(spark, True),
    }
    broken: dict[str, str] = {}
    try:
        for rep in range(args.reps + 1):  # rep 0 warms up the JVM, the Python workers and imports
            for name in runs:
                if name in broken:
                    continue
                try:
                    latency = launchers[name]()
                except Exception as e:
                    broken[name] = f"{type(e).__name__}: {e}"
                    traceback.print_exc()
                    continue
                print(f"{'warm-up' if rep == 0 else f'rep {rep}'}: {name}: {latency:.2f} s to first step", flush=True)
                if rep > 0:
                    runs[name].append(latency)
    finally:
        spark.stop()

    print(f"\nlaunch -> first DDP step, 2 ranks, local[2], median of {args.reps} (after a warm-up):")
    medians = {name: statistics.median(v) for name, v in runs.items() if v}
    for name, v in runs.items():
        if name in medians:
            print(f"  {name:30s} {medians[name]:7.2f} s   (runs: {', '.join(f'{x:.2f}' for x in v)})")
        else:
            print(f"  {name:30s} failed: {broken.get(name, 'no runs')[:500]}")
    if "run_distributed" in medians and "TorchDistributor" in medians:
        print(f"  ratio TorchDistributor / run_distributed: {medians['TorchDistributor'] / medians['run_distributed']:.1f}x")


if __name__ == "__main__":
    main()
