"""What a training function can ask about the rank it runs in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["RankContext", "rank_context"]

_CURRENT: "RankContext | None" = None


@dataclass(frozen=True)
class RankContext:
    """The rank's place in the run; set by the launcher before the training function runs."""

    rank: int
    """Global rank, 0..world_size-1 (the barrier task's partition id)."""
    world_size: int
    """Number of ranks in the process group."""
    local_rank: int
    """Index among the ranks on the same host (picks the GPU in local mode)."""
    device: torch.device
    """Where this rank's tensors go: cuda:<gpu> with use_gpu, else cpu."""
    attempt: int
    """0-based launch attempt; above 0 the stage was relaunched after a failure."""
    local_mode: bool
    """True when ranks are local processes rather than Spark barrier tasks."""
    backend: str
    """torch.distributed backend of the group (gloo or nccl)."""
    _reporter: Any = field(default=None, repr=False, compare=False)

    def report(self, event: dict) -> None:
        """Send ``event`` to the driver's ``on_progress`` (with ``"rank"`` added).

        Best effort: returns at once, never raises; events are dropped when the driver is
        unreachable or too many are pending. Values must be JSON-able (numbers, strings,
        lists, dicts; numpy/torch scalars are converted)."""
        if self._reporter is not None and isinstance(event, dict):
            self._reporter.send(event)


def rank_context() -> RankContext:
    """The current rank's context; RuntimeError outside a rank started by ``run_distributed``."""
    if _CURRENT is None:
        raise RuntimeError("rank_context() is only available inside a function run by sparkdl.train.run_distributed")
    return _CURRENT


def _set(ctx: RankContext | None) -> None:
    global _CURRENT
    _CURRENT = ctx
