"""DDP vs FSDP vs pipeline at world size 2 on the same token transformer: per-rank model-state
memory (parameters + gradients + optimizer state), process RSS and samples/s; then one model
that does not fit under a per-process memory limit with DDP but trains under it with FSDP.

The ranks run the strategies the training loop runs (sparkdl.train.strategies: AllReduce,
FullyShardedDataParallel, Pipeline), on synthetic token batches held in memory, so the figures
are the strategies' own (no loader, no Spark). gloo on CPU by default; ``--gpu`` runs NCCL with
bf16 (FSDP param/reduce dtype, autocast elsewhere) on 2 GPUs.

    .venv/bin/python benchmarks/bench_parallelism.py [--dim 512 --layers 8] [--steps 3] \
        [--limit-dim 1024 --limit-layers 12 --limit-gb 1.3] [--gpu]

Model state is counted from the tensors each rank holds after a step (local shards for FSDP,
this stage's tensors for the pipeline); DDP's gradient buckets (a second copy of the gradients,
M bytes) are on top of that and show in RSS. The memory limit is RLIMIT_AS set inside each rank
after torch and the process group are up (address space in use then + the budget), with
MALLOC_ARENA_MAX=2 so allocator arenas do not eat the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _token_model(vocab: int, length: int, dim: int, layers: int):
    """The built-in token transformer (sparkdl.models.TokenEncoder, tasks branch) when present;
    the same architecture otherwise."""
    import torch
    from torch import nn

    try:
        from sparkdl.models import TokenEncoder

        return TokenEncoder("tokens", vocab, length, 1, dim=dim, heads=max(1, dim // 64), layers=layers, dropout=0.0)
    except ImportError:
        pass

    class TokenEncoder(nn.Module):
        task = "binary"

        def __init__(self) -> None:
            super().__init__()
            self.tokens = nn.Embedding(vocab, dim, padding_idx=0)
            self.positions = nn.Embedding(length, dim)
            self.encoder = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(dim, max(1, dim // 64), 2 * dim, dropout=0.0, batch_first=True), layers,
                enable_nested_tensor=False)
            self.head = nn.Linear(dim, 1)

        def forward(self, batch):
            ids = batch["tokens"].long()
            x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
            return self.head(self.encoder(x).mean(1))

    return TokenEncoder()


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _vm_peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmPeak:"):
                return int(line.split()[1]) * 1024
    return 0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def _state_tensors(opt):
    import torch

    return [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


def rank_main(rank: int, world: int, port: int, args: dict, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    backend = "nccl" if args["gpu"] else "gloo"
    device = torch.device("cuda", rank) if args["gpu"] else torch.device("cpu")
    if args["gpu"]:
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    result: dict = {"rank": rank, "mode": args["mode"]}
    phase = "setup"
    try:
        from sparkdl.train import TrainConfig
        from sparkdl.train.precision import Precision
        from sparkdl.train.strategies import build_strategy

        mode, dim, layers, length, batch = args["mode"], args["dim"], args["layers"], args["length"], args["batch"]
        extra = {"fsdp": dict(parallelism="fsdp", fsdp_wrap=["TransformerEncoderLayer"],
                              fsdp_meta_init=args["meta_init"]),
                 "pipeline": dict(parallelism="pipeline", pipeline_split=[f"encoder.layers.{layers // 2}"],
                                  microbatches=4)}.get(mode, {})
        cfg = TrainConfig(train_table="synthetic", num_ranks=world, batch_size=batch, optimizer="adamw",
                          precision="bf16" if args["gpu"] else "fp32", use_gpu=args["gpu"], **extra)
        torch.manual_seed(0)
        strategy = build_strategy(cfg, device=device)
        vocab = 1000
        g = torch.Generator().manual_seed(rank)

        def make_batch(rows: int) -> dict:
            return {"tokens": torch.randint(1, vocab, (rows, length), generator=g).to(device),
                    "label": torch.randint(0, 2, (rows,), generator=g).float().to(device)}

        strategy.example_batch = lambda rows: {"tokens": make_batch(rows)["tokens"]}
        if args["limit_bytes"]:
            # Set late, after the imports and the mesh, so libraries loaded on the way do not count.
            import torch.distributed.fsdp  # noqa: F401
            import torch.distributed.tensor  # noqa: F401

            result["limit_bytes"] = args["limit_bytes"]
            resource.setrlimit(resource.RLIMIT_AS, (_vm_bytes() + args["limit_bytes"], resource.RLIM_INFINITY))
        result["vm_base_bytes"] = _vm_bytes()
        phase = "build model"
        model = strategy.create_model(lambda: _token_model(vocab, length, dim, layers))
        result["params_total"] = sum(p.numel() for p in model.parameters())
        phase = "wrap"
        net = strategy.wrap(model)
        opt = strategy.build_optimizer(net.parameters())
        precision = Precision(cfg.precision, device)

        def loss_fn(logits, y):
            return torch.nn.functional.binary_cross_entropy_with_logits(logits.reshape(-1), y)

        def one_step(step: int) -> None:
            b = make_batch(batch)
            if strategy.owns_forward_backward:
                strategy.forward_backward(b, label="label", loss_fn=loss_fn, precision=precision, scale=1.0)
            else:
                with precision.autocast():
                    loss = loss_fn(net(b).float(), b["label"])
                precision.backward(loss)
            strategy.step(opt, precision, step)

        phase = "first step"
        one_step(0)  # warm-up: optimizer state exists from here
        params = list(net.parameters())
        result["param_bytes"] = _local_bytes(params)
        result["grad_bytes"] = _local_bytes([p.grad for p in params])
        result["optim_bytes"] = _local_bytes(_state_tensors(opt))
        result["model_state_bytes"] = result["param_bytes"] + result["grad_bytes"] + result["optim_bytes"]
        opt.zero_grad(set_to_none=False)
        phase = "timed steps"
        dist.barrier()
        t0 = time.perf_counter()
        for step in range(1, args["steps"] + 1):
            one_step(step)
            opt.zero_grad(set_to_none=False)
        dist.barrier()
        elapsed = time.perf_counter() - t0
        dp = strategy.data_parallel[1]
        result["samples_per_s"] = args["steps"] * batch * dp / elapsed
        result["rss_bytes"] = _rss_bytes()
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result["vm_growth_bytes"] = _vm_peak_bytes() - result["vm_base_bytes"]
        if args["gpu"]:
            result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
        result["ok"] = True
    except (MemoryError, RuntimeError) as e:  # the allocation that did not fit under the limit
        result.update(ok=False, phase=phase, error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    if result.get("ok"):
        dist.destroy_process_group()
    else:
        os._exit(0)  # a peer may be stuck in a collective: do not wait for it


def run(mode: str, world: int, args: argparse.Namespace, *, dim: int, layers: int, limit_bytes: int = 0,
        meta_init: bool = False, timeout: float = 900) -> list[dict]:
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(tempfile.mkdtemp(prefix="bench-par-"), "r")
    conf = {"mode": mode, "dim": dim, "layers": layers, "length": args.length, "batch": args.batch,
            "steps": args.steps, "gpu": args.gpu, "limit_bytes": limit_bytes, "meta_init": meta_init}
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=rank_main, args=(r, world, port, conf, out)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.time() + timeout
    for p in procs:
        p.join(max(1.0, deadline - time.time()))
    for p in procs:
        if p.is_alive():
            p.kill()
    results = []
    for r in range(world):
        try:
            with open(f"{out}.{r}") as f:
                results.append(json.load(f))
        except FileNotFoundError:
            results.append({"rank": r, "mode": mode, "ok": False, "error": "no result (killed or crashed)"})
    return results


def _mb(b: float) -> str:
    return f"{b / 2**20:,.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--limit-dim", type=int, default=1024)
    p.add_argument("--limit-layers", type=int, default=12)
    p.add_argument("--limit-gb", type=float, default=1.3,
                   help="per-rank address-space budget on top of what torch + the process group use")
    p.add_argument("--limit-batch", type=int, default=2)
    p.add_argument("--skip-limit", action="store_true")
    p.add_argument("--gpu", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["MALLOC_ARENA_MAX"] = "2"
    world = 2
    rows = {}
    for mode in ("allreduce", "fsdp", "pipeline"):
        res = run(mode, world, args, dim=args.dim, layers=args.layers)
        rows[mode] = res
        print(mode, json.dumps(res), flush=True)
    ddp_state = max(r.get("model_state_bytes", 0) for r in rows["allreduce"])
    print(f"\nModel: token transformer dim={args.dim} layers={args.layers} "
          f"({rows['allreduce'][0].get('params_total', 0) / 1e6:.1f} M parameters), AdamW, seq {args.length}, "
          f"batch {args.batch}/replica, world {world}, {'NCCL+bf16' if args.gpu else 'gloo fp32'}\n")
    print("| strategy | params MB/rank | grads MB/rank | optimizer MB/rank | model state MB/rank (max) | "
          "vs DDP | RSS MB/rank (max) | samples/s |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, res in rows.items():
        if not all(r.get("ok") for r in res):
            print(f"| {mode} | failed: {res[0].get('error')} |")
            continue
        worst = max(res, key=lambda r: r["model_state_bytes"])
        print(f"| {mode} | {_mb(worst['param_bytes'])} | {_mb(worst['grad_bytes'])} | {_mb(worst['optim_bytes'])} | "
              f"{_mb(worst['model_state_bytes'])} | {worst['model_state_bytes'] / ddp_state:.2f}x | "
              f"{_mb(max(r['peak_rss_bytes'] for r in res))} | {res[0]['samples_per_s']:.1f} |")
    if args.skip_limit:
        return
    limit = int(args.limit_gb * 2**30)
    print(f"\nMemory limit: RLIMIT_AS = address space after start-up + {args.limit_gb} GiB per rank; "
          f"model dim={args.limit_dim} layers={args.limit_layers}, AdamW, 1 step")
    for mode, meta in (("allreduce", False), ("fsdp", True)):
        res = run(mode, world, argparse.Namespace(**{**vars(args), "steps": 1, "batch": args.limit_batch}), dim=args.limit_dim,
                  layers=args.limit_layers, limit_bytes=limit, meta_init=meta)
        print(mode, json.dumps(res), flush=True)
        r0 = res[0]
        status = "trains" if all(r.get("ok") for r in res) else f"fails in {r0.get('phase')}: {r0.get('error')}"
        params = r0.get("params_total")
        print(f"| {mode}{' (meta init)' if meta else ''} | {params / 1e6:.1f} M params | "
              f"{_mb(r0['model_state_bytes']) + ' MB model state/rank' if 'model_state_bytes' in r0 else '-'} | "
              f"{status} |" if params else f"| {mode} | {status} |")


if __name__ == "__main__":
    main()
