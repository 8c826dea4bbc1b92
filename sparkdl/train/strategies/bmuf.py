"""``bmuf``: block-wise model update filtering (Chen & Huo 2016).

Every ``sync_every`` steps (a block) the replicas are averaged; the block's change G = avg - w_g
is filtered by block momentum: D <- eta D + zeta G, w_g <- w_g + D. Replicas restart from w_g
(or from w_g + eta D with the Nesterov option). w_g is the model validated and published.
eta=0, zeta=1 is plain model averaging. Communication: one all-reduce of the parameters per block.
"""

from __future__ import annotations

from typing import Any

import torch

from sparkdl.train.strategies.periodic import PeriodicSync

__all__ = ["BMUF"]


class BMUF(PeriodicSync):
    name = "bmuf"

    def init_state(self, flat: torch.Tensor) -> None:
        self.global_model = flat
        self.block_momentum = torch.zeros_like(flat)

    def sync(self, flat: torch.Tensor) -> torch.Tensor:
        eta, zeta = self.cfg.bmuf_block_momentum, self.cfg.bmuf_block_lr
        avg = self.reduce(flat.clone()) / self.world
        self.block_momentum.mul_(eta).add_(avg - self.global_model, alpha=zeta)
        self.global_model += self.block_momentum
        if self.cfg.bmuf_nesterov:
            return self.global_model + eta * self.block_momentum
        return self.global_model.clone()

    def global_flat(self) -> torch.Tensor:
        return self.global_model

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {"global_model": self.global_model, "block_momentum": self.block_momentum}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "sync_every": self.cfg.sync_every,
                "bmuf_block_momentum": self.cfg.bmuf_block_momentum, "bmuf_block_lr": self.cfg.bmuf_block_lr, "bmuf_nesterov": self.cfg.bmuf_nesterov}
