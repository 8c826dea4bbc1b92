"""``parallelism="fsdp"``: parameters, gradients and optimizer state sharded over the ranks (FSDP2).

Every rank still trains on its own slice of the data (data parallel over all ranks); what it
holds of the model is 1/shards of it, gathered block by block for forward and backward. With
``data_parallel_size`` = d > 1 the mesh is (d replicas, world/d shards): HSDP, where gradients
are reduce-scattered within a replica group and all-reduced across replicas.

Communication per step (per rank, fp32, model size M): all-gather of M forward and again
backward, reduce-scatter of M: ~3 x (W-1)/W x M, against DDP's 2 x (W-1)/W x M.
Checkpoints are sharded (``sparkdl.train.parallel.sharded_checkpoint``: pickle-free safetensors);
the full weights are assembled only to publish, written from the ranks to the run folder.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from sparkdl.train.config import TrainConfig
from sparkdl.train.parallel.fsdp import materialize_meta, shard_model
from sparkdl.train.parallel.mesh import build_mesh, mesh_layout
from sparkdl.train.parallel.sharded_checkpoint import load_sharded, save_full_weights, save_sharded
from sparkdl.train.strategies.base import Strategy

__all__ = ["FullyShardedDataParallel"]


class FullyShardedDataParallel(Strategy):
    name = "fsdp"
    shards_model = True

    def __init__(self, cfg: TrainConfig, *, device: torch.device, group: dist.ProcessGroup | None = None) -> None:
        super().__init__(cfg, device=device, group=group)
        self.layout = mesh_layout(parallelism="fsdp", world_size=self.world, data_parallel_size=cfg.data_parallel_size)
        mesh = build_mesh(self.layout, device)
        # 1-D shard mesh for plain FSDP; the (replicate, shard) mesh makes fully_shard do HSDP.
        self.mesh = mesh["shard"] if self.layout.dp == 1 else mesh
        self.param_dtype = torch.bfloat16 if cfg.precision == "bf16" else None
        # gloo reduces bf16 slowly and with less range; gradients cross the wire in fp32 on CPU.
        self.reduce_dtype = torch.bfloat16 if cfg.precision == "bf16" and device.type == "cuda" else None

    def create_model(self, factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        if self.cfg.fsdp_meta_init:  # no rank ever holds the full model: shapes only until sharded
            with torch.device("meta"):
                return factory()
        return factory().to(self.device)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        self.model = shard_model(model, self.mesh, classes=self.cfg.fsdp_wrap, min_params=self.cfg.fsdp_min_params,
                                 param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype,
                                 offload=self.cfg.fsdp_offload)
        if self.cfg.fsdp_meta_init:
            materialize_meta(self.model, torch.device("cpu") if self.cfg.fsdp_offload else self.device,
                             seed=self.cfg.seed)
        return self.model

    @contextmanager
    def backward_sync(self, sync: bool) -> Iterator[None]:
        # Accumulation micro-steps keep unsharded gradients locally; the last one reduce-scatters.
        self.model.set_requires_gradient_sync(sync)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def step(self, opt, precision, step: int) -> None:
        numel = sum(p.numel() for p in self.model.parameters())
        self.bytes_sent += int(3 * (self.world - 1) / self.world * numel * 4)
        precision.step(opt)

    # ----- checkpoints and publishing -----
    def save_model_state(self, uri: str, opt: torch.optim.Optimizer) -> None:
        save_sharded(uri, self.model, opt)

    def load_model_state(self, uri: str, opt: torch.optim.Optimizer) -> None:
        load_sharded(uri, self.model, opt)

    def export_weights(self, uri: str) -> None:
        save_full_weights(uri, self.model)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "mesh": {"dp": self.layout.dp, "shard": self.layout.inner},
                "wrap": self.cfg.fsdp_wrap or {"min_params": self.cfg.fsdp_min_params},
                "param_dtype": str(self.param_dtype or torch.float32), "offload": self.cfg.fsdp_offload,
                "meta_init": self.cfg.fsdp_meta_init}
