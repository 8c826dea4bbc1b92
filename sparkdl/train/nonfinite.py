"""The non-finite guard: stop every rank at the same step, before a NaN/inf loss or gradient is applied.

Strategy-agnostic: the flags of a step travel in one small tensor that the strategy reduces
on its group (all-reduce for lockstep strategies; the parameter server carries them in its
replies instead, so asynchronous workers never wait on each other for it).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch.distributed.tensor import DTensor

__all__ = ["NonFinite", "NonFiniteGuard"]


class NonFinite(Exception):
    """Raised on every rank at the same step; the loop turns it into a normal return (no relaunch)."""

    def __init__(self, step: int, what: str, value: float) -> None:
        super().__init__(f"{what} became {value} at step {step}")
        self.step, self.what, self.value = step, what, value


def _finite_stat(value: torch.Tensor) -> torch.Tensor:
    """[is nan, is inf, value or 0] of a scalar, to reduce: every rank learns what any rank saw."""
    v = value.double().reshape(())
    return torch.stack([torch.isnan(v).double(), torch.isinf(v).double(), torch.nan_to_num(v, 0.0, 0.0, 0.0)])


class NonFiniteGuard:
    """Collects a step's micro-batch losses, then checks loss and gradient norm in one reduction.

    ``check_grads`` is off under an fp16 scaler, which expects inf/NaN gradients now and then and
    skips those steps itself; without one, a finite loss can still give inf/NaN gradients, and
    stepping on them would write non-finite weights into the next checkpoint (the "good" one)."""

    def __init__(self, device: torch.device, *, check_grads: bool) -> None:
        self.device = device
        self.check_grads = check_grads
        # [nan seen, inf seen, loss sum] over the step's micro-batches.
        self._loss = torch.zeros(3, dtype=torch.float64, device=device)

    def add_loss(self, loss: torch.Tensor) -> None:
        self._loss += _finite_stat(loss.detach())

    def check(self, step: int, grads: Iterable[torch.Tensor], norm: torch.Tensor | None,
              reduce: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, int]:
        """Raise ``NonFinite`` if any rank's loss or gradient norm is not finite; else return
        (the loss summed over the ranks ``reduce`` spans, how many ranks that is).

        ``norm``: the gradient norm when clipping computed it already."""
        if self.check_grads:
            if norm is None:
                norm = torch.nn.utils.get_total_norm(list(grads))
            if isinstance(norm, DTensor):  # sharded gradients (FSDP): the norm over all shards
                norm = norm.full_tensor()
            grad_stat = _finite_stat(norm.detach().to(self.device))
        else:
            grad_stat = torch.zeros_like(self._loss)
        one = torch.ones(1, dtype=torch.float64, device=self.device)
        flags = reduce(torch.cat([self._loss, grad_stat, one])).tolist()
        self._loss.zero_()
        if flags[0] + flags[1] > 0:
            raise NonFinite(step, "loss", float("nan") if flags[0] > 0 else float("inf"))
        if flags[3] + flags[4] > 0:
            raise NonFinite(step, "gradient norm", float("nan") if flags[3] > 0 else float("inf"))
        return flags[2], int(flags[6])

    def check_parameters(self, step: int, params: Iterable[torch.Tensor],
                         reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Before a checkpoint: no rank may save non-finite weights as the last good state."""
        # Sharded parameters: each rank checks its own shard; the reduction covers the rest.
        tensors = [p.to_local() if isinstance(p, DTensor) else p for p in params]
        finite = torch.stack([torch.isfinite(p).all() for p in tensors]).all() if tensors else torch.tensor(True)
        bad = (~finite).double().reshape(1).to(self.device)
        if reduce(bad).item() > 0:
            raise NonFinite(step, "a parameter", float("nan"))
