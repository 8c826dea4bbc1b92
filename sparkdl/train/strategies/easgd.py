"""``easgd``: elastic averaging SGD (Zhang, Choromanska & LeCun 2015), synchronous variant.

Every tau = ``sync_every`` steps each replica x_i and the center x~ pull on each other with the
moving rate alpha: x_i <- x_i - alpha (x_i - x~), x~ <- x~ + alpha sum_i (x_i - x~). The center
lives on every rank (identical: it is updated from one all-reduce) and is the model that is
validated and published. Communication: one all-reduce of the parameters every tau steps.
"""

from __future__ import annotations

from typing import Any

import torch

from sparkdl.train.strategies.periodic import PeriodicSync

__all__ = ["EASGD"]


class EASGD(PeriodicSync):
    name = "easgd"

    def init_state(self, flat: torch.Tensor) -> None:
        self.center = flat

    def sync(self, flat: torch.Tensor) -> torch.Tensor:
        alpha = self.cfg.easgd_alpha
        diff = flat - self.center
        total = self.reduce(diff.clone())
        self.center += alpha * total
        return flat - alpha * diff

    def global_flat(self) -> torch.Tensor:
        return self.center

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {"center": self.center}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "sync_every": self.cfg.sync_every, "easgd_alpha": self.cfg.easgd_alpha}
