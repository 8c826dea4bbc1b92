"""Optimizers and the learning-rate schedule of a run (compression hooks live in strategies/allreduce.py)."""

from __future__ import annotations

import math
from typing import Callable

import torch

from sparkdl.train.config import TrainConfig

__all__ = ["build_optimizer", "lr_factor", "lr_factor_samples"]


def build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of ``cfg.lr`` at a 0-based optimizer step: linear warm-up, then the schedule
    (a run of one fixed global batch; see :func:`lr_factor_samples`)."""
    by_samples = lr_factor_samples(cfg, total_samples=total_steps, schedule_batch=1)
    return lambda step: by_samples(step, 1)


def lr_factor_samples(cfg: TrainConfig, *, total_samples: int, schedule_batch: int) -> Callable[[int, int], float]:
    """Multiplier of the lr for the step that starts after ``samples`` global samples and trains
    ``batch`` more. The schedule is sized in global samples, so it stays where it was when the
    world size (hence the global batch) changes: warm-up lasts ``warmup_steps`` x
    ``schedule_batch`` samples (the run's first global batch) and decay ends at ``total_samples``.
    With a constant global batch it equals the per-step schedule exactly (integer ratios)."""
    warm = cfg.warmup_steps * schedule_batch

    def factor(samples: int, batch: int) -> float:
        if samples < warm:
            return min(1.0, (samples + batch) / warm)
        if cfg.lr_schedule == "constant":
            return 1.0
        span = max(batch, total_samples - warm)
        frac = min(1.0, (samples - warm) / span)
        return 0.5 * (1 + math.cos(math.pi * frac)) if cfg.lr_schedule == "cosine" else 1.0 - frac

    return factor
