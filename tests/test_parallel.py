"""FSDP2, pipeline stages and their meshes on real gloo process groups (world 2; 4 for hybrid).

Each test spawns ranks with torch.multiprocessing; rank functions are top-level so spawn can
import them. Oracles: FSDP == DDP after the same steps; a 2-stage pipeline == one rank on the
same global batch; a sharded checkpoint resumes bit-exactly.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

pytestmark = pytest.mark.integration

STEPS = 3
BATCH = 8  # per data-parallel rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world: int, *args) -> None:
    mp.spawn(_entry, args=(fn, world, _free_port(), args), nprocs=world, join=True)


def _entry(rank: int, fn, world: int, port: int, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


class _Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(x + torch.tanh(self.fc(x)))


class _Net(nn.Module):
    """Dict batch in, one logit out; blocks named like an encoder so split points read naturally."""

    task = "binary"

    def __init__(self, dim: int = 16, depth: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(4, dim)
        self.blocks = nn.ModuleList(_Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 1)

    def forward(self, batch):
        x = self.inp(batch["x"])
        for b in self.blocks:
            x = b(x)
        return self.head(x).squeeze(1)


def _data(step: int, rows: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return {"x": torch.randn(rows, 4, generator=g)}, (torch.rand(rows, generator=g) > 0.5).float()


def _loss(logits, y):
    return nn.functional.binary_cross_entropy_with_logits(logits, y)


def _opt(params, kind: str):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9) if kind == "sgd" else torch.optim.AdamW(params, lr=0.01)


# ----- FSDP == DDP -----

def _train_ddp_or_fsdp(rank, world, mode, kind, out):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sparkdl.train.parallel import MeshLayout, build_mesh
    from sparkdl.train.parallel.fsdp import shard_model
    from sparkdl.train.parallel.sharded_checkpoint import save_full_weights

    torch.manual_seed(0)
    model = _Net()
    if mode == "ddp":
        net = DDP(model)
    else:
        mesh = build_mesh(MeshLayout("fsdp", 1, world), torch.device("cpu"))
        net = shard_model(model, mesh, classes=["_Block"])
    opt = _opt(net.parameters(), kind)
    for step in range(STEPS):
        x, y = _data(step, BATCH * world)
        mine = slice(rank * BATCH, (rank + 1) * BATCH)
        _loss(net({"x": x["x"][mine]}), y[mine]).backward()
        opt.step()
        opt.zero_grad()
    if mode == "ddp":
        if rank == 0:
            torch.save(model.state_dict(), out)
    else:
        save_full_weights(str(out), model)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_fsdp_matches_ddp(tmp_path, kind):
    from safetensors.torch import load_file

    _spawn(_train_ddp_or_fsdp, 2, "ddp", kind, tmp_path / "ddp.pt")
    _spawn(_train_ddp_or_fsdp, 2, "fsdp", kind, tmp_path / "fsdp.safetensors")
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    fsdp = load_file(tmp_path / "fsdp.safetensors")
    assert set(ddp) == set(fsdp)
    initial = _Net().state_dict()
    moved = 0
    for k in ddp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-5, atol=1e-6, msg=k)
        moved += not torch.equal(ddp[k], initial[k])
    assert moved >= len(ddp) - 2  # the comparison is about trained weights, not two copies of the init


def test_wrap_policy_by_size_and_class():
    from sparkdl.train.parallel.fsdp import wrap_targets

    net = _Net(dim=16, depth=3)
    assert wrap_targets(net, classes=["_Block"]) == ["blocks.0", "blocks.1", "blocks.2"]
    # 16*16+16 + 2*16 = 304 parameters per block: each block is its own unit, the rest stays with the root.
    assert wrap_targets(net, min_params=300) == ["blocks.0", "blocks.1", "blocks.2"]
    assert wrap_targets(net, min_params=10_000) == []
    with pytest.raises(ValueError, match="fsdp_wrap.*no module of class.*Missing"):
        wrap_targets(net, classes=["Missing"])
