"""2 ranks vs 1 rank: samples/s of a CPU-bound MLP, one torch thread per rank, same per-rank
batch, measured side by side in one run (local mode: ranks are processes; gloo all-reduce).

The two configurations alternate ``--reps`` times (so a change in machine load hits both) and
the medians are compared; warm-up steps are excluded. Run it on an otherwise idle machine with
at least 2 cores: 2 ranks x 1 thread need 2 cores to themselves.

    .venv/bin/python benchmarks/bench_scaling.py [--steps 150] [--reps 3] [--batch 256 1024] \
        [--compression none fp16] [--accumulation 1 4]

Each configuration (per-rank batch x gradient compression) gets its own 1-rank vs 2-rank ratio.
The communication per step is fixed (the gradients, 5.2 MB in fp32), so the ratio grows with
the compute per step (the per-rank batch, or micro-batches accumulated with ``no_sync`` between
all-reduces, as ``TrainConfig.accumulation_steps`` does) and with compression (half the bytes in
fp16): on a 2-core machine gloo's all-reduce threads compete with the ranks for the same cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def train(steps: int, batch: int, compression: str, accumulation: int) -> float:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    if torch.get_num_threads() != 1:
        raise RuntimeError(f"each rank must run one torch thread, this one runs {torch.get_num_threads()}")
    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                                    torch.nn.ReLU(), torch.nn.Linear(1024, 1)))
    if compression == "fp16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(batch, 256), torch.randn(batch, 1)
    for i in range(steps + 10):
        if i == 10:  # warm-up steps excluded
            dist.barrier()
            t0 = time.perf_counter()
        opt.zero_grad()
        # As TrainConfig.accumulation_steps does: gradients are all-reduced on the last micro-batch only.
        for _ in range(accumulation - 1):
            with model.no_sync():
                torch.nn.functional.mse_loss(model(x), y).backward()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    dist.barrier()
    return steps * batch * accumulation * dist.get_world_size() / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--reps", type=int, default=3, help="alternating repetitions of each configuration")
    p.add_argument("--batch", type=int, nargs="+", default=[256, 1024], help="per-rank batch sizes to measure")
    p.add_argument("--compression", nargs="+", default=["none", "fp16"], choices=["none", "fp16"],
                   help="gradient compression (DDP communication hook) variants to measure")
    p.add_argument("--accumulation", type=int, nargs="+", default=[1, 4],
                   help="micro-batches per all-reduce (no_sync on the others) to measure")
    args = p.parse_args()
    from sparkdl.train import LaunchConfig, run_distributed

    configs = [(b, c, a) for b in args.batch for c in args.compression for a in args.accumulation]
    rates: dict[tuple[int, str, int, int], list[float]] = {(*cfg, r): [] for cfg in configs for r in (1, 2)}
    for rep in range(args.reps):
        for batch, compression, accumulation in configs:
            for ranks in (1, 2):
                rate = run_distributed(train, args.steps, batch, compression, accumulation,
                                       config=LaunchConfig(num_ranks=ranks, local_mode=True, torch_threads=1))
                rates[(batch, compression, accumulation, ranks)].append(rate)
                print(f"rep {rep + 1}: batch {batch}/rank, compression {compression}, accumulation {accumulation}, "
                      f"{ranks} rank(s): {rate:,.0f} samples/s", flush=True)
    print(f"\nmedian of {args.reps}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end (goal >= 1.7x)")
    print(f"{'batch/rank':>10} {'compression':>11} {'accumulation':>12} {'1 rank':>10} {'2 ranks':>10} {'ratio':>6}")
    for cfg in configs:
        one, two = statistics.median(rates[(*cfg, 1)]), statistics.median(rates[(*cfg, 2)])
        print(f"{cfg[0]:>10} {cfg[1]:>11} {cfg[2]:>12} {one:>10,.0f} {two:>10,.0f} {two / one:>5.2f}x")


if __name__ == "__main__":
    main()
