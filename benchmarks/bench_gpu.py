"""GPU feeding: NCCL + bf16 DDP training fed by sparkdl's loader vs the same model fed from
GPU-resident tensors, side by side in one run (goal: loader-fed >= 0.9x GPU-resident).

Both variants run the same DDP training step (bf16 autocast, AdamW, one rank per GPU, local
mode: ranks are processes on this host, NCCL between them). The loader-fed variant streams a
synthetic Delta table (float32 feature columns + a label) through ``TableLoader`` with pinned
memory and non-blocking copies; the resident variant cycles through batches that were copied to
the GPU before timing, so it measures the model alone. Warm-up steps are excluded; samples/s are
global (all ranks). Variants alternate ``--reps`` times; medians are printed.

    .venv/bin/python benchmarks/bench_gpu.py [--rows 2000000] [--steps 300] [--batch-size 4096]

Without a CUDA device it prints why and exits (status 0: nothing to measure here).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time


def _make_table(path: str, rows: int, features: int) -> None:
    import numpy as np
    import pyarrow as pa
    from deltalake import write_deltalake

    rng = np.random.default_rng(0)
    cols = {f"f{i}": pa.array(rng.standard_normal(rows, dtype=np.float32)) for i in range(features)}
    cols["label"] = pa.array((rng.random(rows) < 0.3).astype(np.int32))
    write_deltalake(path, pa.table(cols), mode="overwrite")


def _model(features: int, hidden: int, layers: int):
    import torch

    blocks: list[torch.nn.Module] = [torch.nn.Linear(features, hidden), torch.nn.ReLU()]
    for _ in range(layers - 1):
        blocks += [torch.nn.Linear(hidden, hidden), torch.nn.ReLU()]
    blocks.append(torch.nn.Linear(hidden, 1))
    return torch.nn.Sequential(*blocks)


def train(table: str, variant: str, args: dict) -> float:
    """One rank: ``steps`` timed DDP steps after ``warmup``; returns global samples/s (rank 0)."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sparkdl.data import LoaderConfig, TableLoader
    from sparkdl.train import rank_context

    ctx = rank_context()
    device = ctx.device
    names = [f"f{i}" for i in range(args["features"])]
    torch.manual_seed(0)
    model = DDP(_model(args["features"], args["hidden"], args["layers"]).to(device), device_ids=[device.index])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loader = TableLoader(table, rank=ctx.rank, world_size=ctx.world_size, config=LoaderConfig(
        batch_size=args["batch_size"], columns=[*names, "label"], shuffle=True, pin_memory=True,
        prefetch_batches=8))

    def batches():
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    source = batches()
    if variant == "resident":  # the same batches, already on the GPU: the model's own speed
        resident = [{k: v.to(device) for k, v in next(source).items()} for _ in range(16)]
        source = (resident[i % len(resident)] for i in range(10**9))

    def step(batch) -> None:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        x = torch.stack([batch[n] for n in names], dim=1)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x).squeeze(1).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["label"].float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    try:
        for _ in range(args["warmup"]):
            step(next(source))
        torch.cuda.synchronize(device)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(args["steps"]):
            step(next(source))
        torch.cuda.synchronize(device)
        dist.barrier()
        elapsed = time.perf_counter() - t0
    finally:
        loader.close()
    return args["steps"] * args["batch_size"] * ctx.world_size / elapsed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2_000_000, help="rows of the synthetic table")
    p.add_argument("--features", type=int, default=32, help="float32 feature columns")
    p.add_argument("--hidden", type=int, default=4096, help="MLP width")
    p.add_argument("--layers", type=int, default=4, help="hidden layers")
    p.add_argument("--batch-size", type=int, default=4096, help="per-rank batch size")
    p.add_argument("--steps", type=int, default=300, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=30, help="untimed steps first")
    p.add_argument("--reps", type=int, default=2, help="alternating repetitions of each variant")
    p.add_argument("--ranks", type=int, default=None, help="ranks (GPUs); default: every visible GPU")
    p.add_argument("--table", default=None, help="reuse this synthetic Delta table instead of writing one")
    args = p.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device on this machine (torch.cuda.is_available() is False); "
              "nothing measured. Run it on a GPU host.")
        return 0
    from sparkdl.train import LaunchConfig, run_distributed

    ranks = args.ranks or torch.cuda.device_count()
    table = args.table or os.path.join(tempfile.mkdtemp(prefix="bench-gpu-"), "synthetic")
    if not args.table:
        t0 = time.perf_counter()
        _make_table(table, args.rows, args.features)
        print(f"wrote {args.rows:,} rows x {args.features} float32 features to {table} "
              f"in {time.perf_counter() - t0:.1f}s", flush=True)
    knobs = {k: getattr(args, k) for k in ("features", "hidden", "layers", "batch_size", "steps", "warmup")}
    launch = LaunchConfig(num_ranks=ranks, local_mode=True, use_gpu=True, torch_threads=None)
    runs: dict[str, list[float]] = {"loader-fed": [], "GPU-resident": []}
    for rep in range(args.reps):
        for name, variant in (("loader-fed", "loader"), ("GPU-resident", "resident")):
            rate = run_distributed(train, table, variant, knobs, config=launch)
            runs[name].append(rate)
            print(f"rep {rep + 1}: {name}: {rate:,.0f} samples/s", flush=True)
    med = {name: statistics.median(v) for name, v in runs.items()}
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(ranks))
    print(f"\nNCCL + bf16, {ranks} rank(s) on {names}; MLP {args.features}->{args.hidden}x{args.layers}->1, "
          f"batch {args.batch_size}/rank, median of {args.reps}:")
    for name, rate in med.items():
        print(f"  {name:13s} {rate:12,.0f} samples/s")
    print(f"  ratio loader-fed / GPU-resident: {med['loader-fed'] / med['GPU-resident']:.2f}x (goal >= 0.9x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
