"""Shared by easgd and bmuf: replicas step alone and meet every ``sync_every`` steps."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from sparkdl.train.strategies.base import Strategy, cpu_copy, flat_params, set_flat_params

__all__ = ["PeriodicSync"]


class PeriodicSync(Strategy):
    """Subclasses implement ``sync(flat)`` -> the replica's new flat parameters, and ``global_flat``
    (the agreed parameters), and list their tensors in ``_state_tensors``."""

    replicas_diverge = True

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        self.model = model
        self.broadcast_parameters()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.init_state(flat_params(self.params).clone())
        return model

    def init_state(self, flat: torch.Tensor) -> None:
        raise NotImplementedError

    def sync(self, flat: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def global_flat(self) -> torch.Tensor:
        raise NotImplementedError

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def step(self, opt, precision, step: int) -> None:
        precision.step(opt)
        if (step + 1) % self.cfg.sync_every == 0:
            numel = sum(p.numel() for p in self.params)
            self.bytes_sent += int(2 * (self.world - 1) / self.world * numel * 4)
            set_flat_params(self.params, self.sync(flat_params(self.params)))

    @contextmanager
    def consensus(self) -> Iterator[None]:
        mine = flat_params(self.params).clone()
        set_flat_params(self.params, self.global_flat())
        try:
            yield
        finally:
            set_flat_params(self.params, mine)

    def state_dict(self) -> dict[str, Any]:
        extra = {k: cpu_copy(v) for k, v in self._state_tensors().items()}
        return {"replica": cpu_copy(self.model.state_dict()), **extra}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["replica"])
        for k, t in self._state_tensors().items():
            t.copy_(state[k])
