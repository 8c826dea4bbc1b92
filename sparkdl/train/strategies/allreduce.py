"""``allreduce``: DistributedDataParallel, gradients all-reduced on every optimizer step.

Communication per step: one all-reduce of all gradients (2(W-1)/W x model size per rank in a
ring), compressed by the fp16/bf16/PowerSGD hooks when ``compression`` asks for it.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from sparkdl.train.checkpoint import numpy_state_from_plain, numpy_state_to_plain
from sparkdl.train.strategies.base import Strategy

__all__ = ["AllReduce"]


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


class AllReduce(Strategy):
    name = "allreduce"

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

        self.model = model
        # DDP broadcasts rank 0's initial weights.
        self.ddp = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                       process_group=self.group, bucket_cap_mb=self.cfg.ddp_bucket_cap_mb,
                       gradient_as_bucket_view=self.cfg.ddp_bucket_view)
        self.hook_state = None
        compression = self.cfg.compression
        if compression == "fp16":
            self.ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        elif compression == "bf16":
            self.ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
        elif compression == "powersgd":
            self.hook_state = powerSGD_hook.PowerSGDState(
                process_group=self.group, matrix_approximation_rank=1, start_powerSGD_iter=2,
                random_seed=self.cfg.seed)
            self.ddp.register_comm_hook(self.hook_state, powerSGD_hook.powerSGD_hook)
        return self.ddp

    def backward_sync(self, sync: bool):
        return super().backward_sync(sync) if sync else self.ddp.no_sync()

    def step(self, opt, precision, step: int) -> None:
        numel = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        ratio = {"fp16": 0.5, "bf16": 0.5}.get(self.cfg.compression, 1.0)
        # Ring all-reduce: each rank sends 2(W-1)/W of the (compressed) gradient bytes.
        self.bytes_sent += int(2 * (self.world - 1) / self.world * numel * 4 * ratio)
        precision.step(opt)

    def state_dict(self) -> dict[str, Any]:
        """PowerSGD's per-rank state (step counter, error feedback, warm-start P/Q, its RNG) on the CPU."""
        state = self.hook_state
        if state is None:
            return {"comm_hook": None}
        saved = {}
        for slot in type(state).__slots__:
            value = getattr(state, slot)
            if slot == "process_group":
                continue
            saved[slot] = numpy_state_to_plain(value.get_state()) if isinstance(value, np.random.RandomState) else \
                _map_tensors(value, lambda t: t.detach().cpu().clone())
        return {"comm_hook": saved}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("comm_hook")
        if self.hook_state is None or not saved:
            return
        for slot, value in saved.items():
            if slot == "rng":
                self.hook_state.rng.set_state(numpy_state_from_plain(value))
            else:
                setattr(self.hook_state, slot, _map_tensors(value, lambda t: t.to(self.device)))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "compression": self.cfg.compression,
                "ddp_bucket_cap_mb": self.cfg.ddp_bucket_cap_mb, "ddp_bucket_view": self.cfg.ddp_bucket_view}


