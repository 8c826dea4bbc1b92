"""2 ranks vs 1 rank: samples/s of a CPU-bound MLP, one torch thread per rank, same per-rank
batch, measured side by side in one run (local mode: ranks are processes; gloo all-reduce).

The two configurations alternate ``--reps`` times (so a change in machine load hits both) and
the medians are compared; warm-up steps are excluded. Run it on an otherwise idle machine with
at least 2 cores: 2 ranks x 1 thread need 2 cores to themselves.

    .venv/bin/python benchmarks/bench_scaling.py [--steps 150] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def train(steps: int) -> float:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    if torch.get_num_threads() != 1:
        raise RuntimeError(f"each rank must run one torch thread, this one runs {torch.get_num_threads()}")
    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                                    torch.nn.ReLU(), torch.nn.Linear(1024, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(256, 256), torch.randn(256, 1)
    for i in range(steps + 10):
        if i == 10:  # warm-up steps excluded
            dist.barrier()
            t0 = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    dist.barrier()
    return steps * 256 * dist.get_world_size() / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--reps", type=int, default=3, help="alternating repetitions of each configuration")
    args = p.parse_args()
    from sparkdl.train import LaunchConfig, run_distributed

    rates: dict[int, list[float]] = {1: [], 2: []}
    for rep in range(args.reps):
        for ranks in (1, 2):
            rate = run_distributed(train, args.steps,
                                   config=LaunchConfig(num_ranks=ranks, local_mode=True, torch_threads=1))
            rates[ranks].append(rate)
            print(f"rep {rep + 1}: {ranks} rank(s): {rate:,.0f} samples/s", flush=True)
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    print(f"1 rank: {one:,.0f} samples/s   2 ranks: {two:,.0f} samples/s   ratio {two / one:.2f}x (goal >= 1.7x); "
          f"median of {args.reps}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
