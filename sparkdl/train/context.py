"""What a training function can ask about the rank it runs in."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RankContext", "rank_context"]

_CURRENT: "RankContext | None" = None


@dataclass(frozen=True)
class RankContext:
    """The rank's place in the run; set by the launcher before the training function runs."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    attempt: int
    local_mode: bool
    backend: str


def rank_context() -> RankContext:
    """The current rank's context; RuntimeError outside a rank started by ``run_distributed``."""
    if _CURRENT is None:
        raise RuntimeError("rank_context() is only available inside a function run by sparkdl.train.run_distributed")
    return _CURRENT


def _set(ctx: RankContext | None) -> None:
    global _CURRENT
    _CURRENT = ctx
