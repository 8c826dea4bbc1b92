"""``parallelism="pipeline"``: the model cut into stages over ranks, micro-batches flowing through.

Mesh (dp, pp): ranks ``r*pp .. r*pp+pp-1`` hold the stages of replica r. Every stage of a
replica reads the same rows (the loader shards by the replica index, not the global rank);
the first stage feeds the features in, the last computes the loss against the labels.
Replicas of a stage average their gradients on the dp group before the optimizer steps.

Communication per step: each stage boundary carries the activations forward and their
gradients back, per micro-batch (2 x batch x activation width); plus, with dp > 1, an
all-reduce of each stage's gradients (2 (dp-1)/dp x stage size).

Each rank keeps only its stage's parameters; the other stages' tensors are emptied after the
split and gathered back (``consensus``) only for validation and publishing.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from sparkdl.train.config import TrainConfig
from sparkdl.train.parallel.mesh import build_mesh, mesh_layout
from sparkdl.train.parallel.pipeline import StageRunner, split_model
from sparkdl.train.parallel.sharded_checkpoint import load_sharded, save_sharded
from sparkdl.train.strategies.base import Strategy

__all__ = ["Pipeline"]


class Pipeline(Strategy):
    name = "pipeline"
    shards_model = True
    owns_forward_backward = True

    def __init__(self, cfg: TrainConfig, *, device: torch.device, group: dist.ProcessGroup | None = None) -> None:
        super().__init__(cfg, device=device, group=group)
        self.layout = mesh_layout(parallelism="pipeline", world_size=self.world, pipeline_split=cfg.pipeline_split)
        mesh = build_mesh(self.layout, device)
        self.dp_group = mesh.get_group("dp")
        self.pp_group = mesh.get_group("pp")
        self.dp_rank, self.stage_index = self.layout.coords(self.rank)
        self.runner: StageRunner | None = None
        self._loss: Callable | None = None
        self._others: dict[str, torch.Tensor] = {}

    @property
    def data_parallel(self) -> tuple[int, int]:
        return self.dp_rank, self.layout.dp

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.example_batch is None:
            raise RuntimeError("the pipeline strategy needs the loop to set example_batch before wrap()")
        self.model = model
        example = self.example_batch(self.cfg.batch_size // self.cfg.microbatches)
        self.input_keys = sorted(example)
        pipe = split_model(model, self.cfg.pipeline_split, example)
        self.runner = StageRunner(pipe, stage_index=self.stage_index, device=self.device, group=self.pp_group,
                                  microbatches=self.cfg.microbatches, schedule=self.cfg.pipeline_schedule,
                                  loss_fn=lambda out, y: self._loss(out, y))
        stage = self.runner.module
        mine = {id(t) for t in [*stage.parameters(), *stage.buffers()]}
        # Free what other stages own: this rank never computes with it (consensus brings it back).
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if id(t) not in mine:
                self._others[name] = t
                t.data = torch.empty(0, dtype=t.dtype, device=t.device)
        return stage

    def forward_backward(self, batch: dict[str, torch.Tensor], *, label: str, loss_fn: Callable, precision: Any,
                         scale: float) -> torch.Tensor | None:
        self._loss = lambda out, y: loss_fn(out.float(), y) * scale
        inputs = {k: batch[k] for k in self.input_keys} if self.runner.is_first else None
        with precision.autocast():
            loss = self.runner.step(inputs, batch[label] if self.runner.is_last else None)
        return loss

    def reduce_flags(self, tensor: torch.Tensor) -> torch.Tensor:
        # NonFiniteGuard's last element counts the ranks whose loss is in the sum: only last
        # stages compute one, so the reported loss is the mean over the dp replicas.
        tensor[-1] = 1.0 if self.runner.is_last else 0.0
        return self.reduce(tensor)

    def step(self, opt, precision, step: int) -> None:
        if self.layout.dp > 1:
            grads = [p.grad for p in self.runner.module.parameters() if p.grad is not None]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.dp_group)
            flat /= self.layout.dp
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
            self.bytes_sent += int(2 * (self.layout.dp - 1) / self.layout.dp * flat.numel() * 4)
        precision.step(opt)

    @contextmanager
    def consensus(self) -> Iterator[None]:
        """The full model on every rank (each replica's stages exchange their weights)."""
        mine = {k: v.detach().cpu() for k, v in self.runner.module.state_dict().items()}
        parts: list[Any] = [None] * self.layout.inner
        dist.all_gather_object(parts, mine, group=self.pp_group)
        full = {k: v for part in parts for k, v in part.items()}
        for name, t in self._others.items():
            t.data = full[name].to(self.device)
        try:
            yield
        finally:
            for t in self._others.values():
                t.data = torch.empty(0, dtype=t.dtype, device=t.device)

    # ----- checkpoints and publishing -----
    def save_model_state(self, uri: str, opt: torch.optim.Optimizer) -> None:
        save_sharded(uri, self.runner.module, opt)

    def load_model_state(self, uri: str, opt: torch.optim.Optimizer) -> None:
        load_sharded(uri, self.runner.module, opt)

    def export_weights(self, uri: str) -> None:
        from safetensors.torch import save

        from sparkdl import _fs

        with self.consensus():
            if self.rank == 0:
                _fs.write_bytes(uri, save({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}))
        dist.barrier()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "mesh": {"dp": self.layout.dp, "pp": self.layout.inner},
                "split": list(self.cfg.pipeline_split), "schedule": self.cfg.pipeline_schedule,
                "microbatches": self.cfg.microbatches}
