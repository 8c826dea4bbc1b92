"""Optimizers, the learning-rate schedule and DDP gradient-compression hooks of a run."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from sparkdl.train.config import TrainConfig

__all__ = ["build_optimizer", "lr_factor", "register_comm_hook", "hook_state_dict", "load_hook_state"]


def build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of ``cfg.lr`` at a 0-based optimizer step: linear warm-up, then the schedule."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        span = max(1, total_steps - cfg.warmup_steps)
        frac = min(1.0, (step - cfg.warmup_steps) / span)
        return 0.5 * (1 + math.cos(math.pi * frac)) if cfg.lr_schedule == "cosine" else 1.0 - frac

    return factor


def register_comm_hook(ddp, cfg: TrainConfig) -> Any:
    """Install the compression hook; returns the hook's state (PowerSGD's must be checkpointed)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if cfg.compression == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif cfg.compression == "bf16":
        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif cfg.compression == "powersgd":
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=1, start_powerSGD_iter=2,
                                            random_seed=cfg.seed)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        return state
    return None


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def hook_state_dict(state: Any) -> dict[str, Any] | None:
    """PowerSGD's per-rank state (step counter, error feedback, warm-start P/Q, its RNG) on the CPU."""
    if state is None:
        return None
    from sparkdl.train.checkpoint import numpy_state_to_plain

    out = {slot: _map_tensors(getattr(state, slot), lambda t: t.detach().cpu().clone())
           for slot in type(state).__slots__ if slot not in ("process_group", "rng")}
    out["rng"] = numpy_state_to_plain(state.rng.get_state())  # weights_only checkpoints: no RandomState object
    return out


def load_hook_state(state: Any, saved: dict[str, Any] | None, device: torch.device) -> None:
    if state is None or not saved:
        return
    for slot, value in saved.items():
        if slot == "rng":
            from sparkdl.train.checkpoint import numpy_state_from_plain

            state.rng.set_state(numpy_state_from_plain(value))
            continue
        setattr(state, slot, _map_tensors(value, lambda t: t.to(device)))
