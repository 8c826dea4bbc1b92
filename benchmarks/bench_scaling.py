"""2 ranks vs 1 rank: samples/s of a CPU-bound MLP, one torch thread per rank, same per-rank
batch, measured side by side in one run (local mode: ranks are processes).

    .venv/bin/python benchmarks/bench_scaling.py [--steps 150]
"""

from __future__ import annotations

import argparse
import time


def train(steps: int) -> float:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

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
    return steps * 256 * dist.get_world_size() / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=150)
    args = p.parse_args()
    from sparkdl.train import LaunchConfig, run_distributed

    one = run_distributed(train, args.steps, config=LaunchConfig(num_ranks=1, local_mode=True, torch_threads=1))
    two = run_distributed(train, args.steps, config=LaunchConfig(num_ranks=2, local_mode=True, torch_threads=1))
    print(f"1 rank: {one:,.0f} samples/s   2 ranks: {two:,.0f} samples/s   ratio {two / one:.2f}x (goal >= 1.7x)")


if __name__ == "__main__":
    main()
