"""2 ranks vs 1 rank: samples/s of a CPU-bound MLP, one torch thread per rank, same per-rank
batch, measured side by side in one run (local mode: ranks are processes; gloo all-reduce).

1-rank and 2-rank launches alternate ``--reps`` times (so a change in machine load hits both)
and the medians are compared; warm-up steps are excluded. Each launch measures every
configuration in turn (per-rank batch x accumulation x DDP variant), so the variants of one
launch see the same machine. Run it on an otherwise idle machine with at least 2 cores: 2 ranks
x 1 thread need 2 cores to themselves.

    .venv/bin/python benchmarks/bench_scaling.py [--steps 150] [--reps 3] [--batch 256 1024] \
        [--accumulation 1 4] [--variant default --variant view,zero=keep ...]

A ``--variant`` is a comma-separated list of DDP knobs (empty or ``default``: DDP's defaults):

    bucket_cap_mb=F      DDP(bucket_cap_mb=F): every bucket F MiB, the first one too
    bucket_caps=A:B:..   DDP(bucket_cap_mb_list=[A, B, ..]): bucket i (in gradient-ready order) at most its cap
    first_bucket_mb=F    first bucket F MiB, the others DDP's default 25 (dist._DEFAULT_FIRST_BUCKET_BYTES)
    view                 gradient_as_bucket_view=True (no copy of the reduced bucket back into .grad)
    zero=keep            optimizer.zero_grad(set_to_none=False): .grad stays a bucket view, so with
                         ``view`` backward accumulates straight into the bucket (no copy in either)
    static               static_graph=True
    batched_copy         batched_grad_copy=True (one foreach copy per bucket)
    hook=fp16            fp16 gradient compression (DDP communication hook)
    gloo_threads=N       the all-reduce on a gloo group with N worker threads (torch's default is 2)

Each configuration gets its own 1-rank vs 2-rank ratio, and the bucket sizes DDP settled on
after its first step are printed. The communication per step is fixed (the gradients, 5.2 MB in
fp32), so the ratio grows with the compute per step (the per-rank batch, or micro-batches
accumulated with ``no_sync`` between all-reduces, as ``TrainConfig.accumulation_steps`` does):
on a 2-core machine gloo's threads compete with the ranks for the same cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

__all__ = ["parse_variant", "train"]

_FLAGS = {"view", "static", "batched_copy"}
_VALUED = {"bucket_cap_mb", "bucket_caps", "first_bucket_mb", "zero", "hook", "gloo_threads"}


def parse_variant(spec: str) -> dict[str, str]:
    """``"view,bucket_cap_mb=8"`` -> ``{"view": "1", "bucket_cap_mb": "8"}``; ``default`` -> {}."""
    knobs: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if part == "default":
            continue
        key, _, value = part.partition("=")
        if key in _FLAGS and not value:
            knobs[key] = "1"
        elif key in _VALUED and value:
            knobs[key] = value
        else:
            raise argparse.ArgumentTypeError(f"unknown DDP knob {part!r} in variant {spec!r} (see --help)")
    if knobs.get("zero", "none") not in ("none", "keep") or knobs.get("hook", "fp16") != "fp16":
        raise argparse.ArgumentTypeError(f"variant {spec!r}: zero takes none|keep, hook takes fp16")
    return knobs


def _gloo_group(threads: int) -> Any:
    """A process group over the ranks of the default one whose gloo backend runs ``threads`` workers
    (init_process_group has no way to pass ProcessGroupGloo options)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torch.distributed import ProcessGroupGloo
    from torch.distributed.distributed_c10d import _get_default_store, _world

    rank, world = dist.get_rank(), dist.get_world_size()
    store = dist.PrefixStore(f"bench-gloo-{threads}", _get_default_store())
    opts = ProcessGroupGloo._Options()
    opts._timeout = timedelta(seconds=300)
    opts._devices = [ProcessGroupGloo.create_device(interface=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))]
    opts._threads = threads
    backend = ProcessGroupGloo(store, rank, world, opts)
    pg = dist.ProcessGroup(store, rank, world)
    pg._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
    pg._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, backend)
    _world.pg_map[pg] = ("gloo", store)
    _world.pg_group_ranks[pg] = {r: r for r in range(world)}
    _world.pg_names[pg] = f"bench-gloo-{threads}"
    return pg


def _measure(steps: int, batch: int, accumulation: int, knobs: dict[str, str], groups: dict[int, Any]
             ) -> tuple[float, list[int]]:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    kwargs: dict[str, Any] = {"gradient_as_bucket_view": "view" in knobs, "static_graph": "static" in knobs,
                              "batched_grad_copy": "batched_copy" in knobs}
    if "bucket_cap_mb" in knobs:
        kwargs["bucket_cap_mb"] = float(knobs["bucket_cap_mb"])
    if "bucket_caps" in knobs:
        kwargs["bucket_cap_mb_list"] = [float(c) for c in knobs["bucket_caps"].split(":")]
    if "gloo_threads" in knobs:
        threads = int(knobs["gloo_threads"])
        if threads not in groups:
            groups[threads] = _gloo_group(threads)
        kwargs["process_group"] = groups[threads]
    default_first = dist._DEFAULT_FIRST_BUCKET_BYTES
    if "first_bucket_mb" in knobs:
        dist._DEFAULT_FIRST_BUCKET_BYTES = int(float(knobs["first_bucket_mb"]) * 2**20)
    try:
        model = DDP(torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                                        torch.nn.ReLU(), torch.nn.Linear(1024, 1)), **kwargs)
    finally:
        dist._DEFAULT_FIRST_BUCKET_BYTES = default_first
    if knobs.get("hook") == "fp16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    set_to_none = knobs.get("zero", "none") == "none"
    x, y = torch.randn(batch, 256), torch.randn(batch, 1)
    for i in range(steps + 10):
        if i == 10:  # warm-up steps excluded (DDP rebuilds its buckets after the first one)
            dist.barrier()
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=set_to_none)
        # As TrainConfig.accumulation_steps does: gradients are all-reduced on the last micro-batch only.
        for _ in range(accumulation - 1):
            with model.no_sync():
                torch.nn.functional.mse_loss(model(x), y).backward()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    dist.barrier()
    rate = steps * batch * accumulation * dist.get_world_size() / (time.perf_counter() - t0)
    logged = model._get_ddp_logging_data()  # the buckets rebuilt in gradient-ready order after step 1
    buckets = [int(b) for b in str(logged.get("rebuilt_bucket_sizes") or logged.get("bucket_sizes", "")).split(", ") if b]
    return rate, buckets


def train(steps: int, configs: list[tuple[int, int, str]], variants: dict[str, dict[str, str]]
          ) -> dict[tuple[int, int, str], tuple[float, list[int]]]:
    """Each rank: every (batch, accumulation, variant name) in turn; samples/s of all ranks and DDP's bucket bytes."""
    import torch

    if torch.get_num_threads() != 1:
        raise RuntimeError(f"each rank must run one torch thread, this one runs {torch.get_num_threads()}")
    groups: dict[int, Any] = {}
    return {cfg: _measure(steps, cfg[0], cfg[1], variants[cfg[2]], groups) for cfg in configs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--reps", type=int, default=3, help="alternating 1-rank and 2-rank launches")
    p.add_argument("--batch", type=int, nargs="+", default=[256, 1024], help="per-rank batch sizes to measure")
    p.add_argument("--accumulation", type=int, nargs="+", default=[1, 4],
                   help="micro-batches per all-reduce (no_sync on the others) to measure")
    p.add_argument("--variant", action="append", default=None, metavar="KNOBS",
                   help="DDP knobs, comma-separated (repeat the option to compare variants; default: DDP's defaults)")
    args = p.parse_args()
    specs = args.variant or ["default"]
    variants = {spec: parse_variant(spec) for spec in specs}
    from sparkdl.train import LaunchConfig, run_distributed

    configs = [(b, a, v) for b in args.batch for a in args.accumulation for v in specs]
    rates: dict[tuple[int, int, str, int], list[float]] = {(*cfg, r): [] for cfg in configs for r in (1, 2)}
    buckets: dict[tuple[int, int, str], list[int]] = {}
    loads: list[float] = []
    for rep in range(args.reps):
        # Rotated each rep, so a load change during a launch does not always hit the same configuration.
        order = configs[rep % len(configs):] + configs[:rep % len(configs)]
        for ranks in (1, 2):
            out = run_distributed(train, args.steps, order, variants,
                                  config=LaunchConfig(num_ranks=ranks, local_mode=True, torch_threads=1))
            loads.append(os.getloadavg()[0])
            for cfg, (rate, sizes) in out.items():
                rates[(*cfg, ranks)].append(rate)
                if ranks == 2:
                    buckets[cfg] = sizes
                print(f"rep {rep + 1}: batch {cfg[0]}/rank x {cfg[1]}, {cfg[2]}, {ranks} rank(s): "
                      f"{rate:,.0f} samples/s", flush=True)
    print(f"\nmedian of {args.reps}, {os.cpu_count()} CPUs, load average (1 min) after each launch "
          f"{min(loads):.1f}-{max(loads):.1f} (goal >= 1.7x)")
    print(f"{'batch/rank':>10} {'accum':>5} {'1 rank':>10} {'2 ranks':>10} {'ratio':>6}  variant [2-rank buckets, KiB]")
    for cfg in configs:
        one, two = statistics.median(rates[(*cfg, 1)]), statistics.median(rates[(*cfg, 2)])
        sizes = " ".join(str(b // 1024) for b in buckets.get(cfg, []))
        print(f"{cfg[0]:>10} {cfg[1]:>5} {one:>10,.0f} {two:>10,.0f} {two / one:>5.2f}x  {cfg[2]} [{sizes}]")


if __name__ == "__main__":
    main()
