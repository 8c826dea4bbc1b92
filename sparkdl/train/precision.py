"""Mixed precision, independent of how ranks share the model: autocast and the fp16 gradient scaler.

The loop asks this piece for the forward context, the backward call and the optimizer step;
strategies call ``step`` where they apply gradients, so a scaler's skip-on-inf works the same
under every strategy that steps a local optimizer.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch

__all__ = ["Precision"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """``precision`` is TrainConfig.precision: fp32, bf16 (autocast) or fp16 (autocast + scaler, GPU)."""

    def __init__(self, precision: str, device: torch.device) -> None:
        self.name = precision
        self.device = device
        self.dtype = _DTYPES.get(precision)
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    @property
    def skips_nonfinite_steps(self) -> bool:
        """True when inf/NaN gradients are expected now and then (the scaler skips those steps)."""
        return self.scaler is not None

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, opt: torch.optim.Optimizer) -> None:
        """Bring the gradients back to their true scale (before clipping or checking them)."""
        if self.scaler is not None:
            self.scaler.unscale_(opt)

    def step(self, opt: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()

    def state_dict(self) -> dict[str, Any] | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
