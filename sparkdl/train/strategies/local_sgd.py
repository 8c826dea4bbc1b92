"""``local_sgd``: each rank steps alone; parameters are averaged every ``sync_every`` (H) steps.

Built on torch's own pieces: ``PostLocalSGDOptimizer`` wrapping the local optimizer with a
``PeriodicModelAverager`` (the averager's step counter is saved through the wrapper's
``state_dict``, pytorch#78988). With ``local_sgd_warmup_steps`` the first steps are ordinary
DDP all-reduce steps (post-local SGD, Lin et al. 2020): DDP carries torch's
``post_localSGD_hook`` with ``post_local_gradient_allreduce=False``, so after the warm-up each
rank keeps its own gradients; no ``dist.new_subgroups()`` is needed (it wants an explicit
``group_size`` on CPU, pytorch#99706). With ``outer_lr`` the averaged change of each block is
applied by an outer Nesterov SGD to the block's starting point (DiLoCo, Douillard et al. 2023).

Communication: one all-reduce of the parameters every H steps (1/H of all-reduce's bytes per step).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
from torch.distributed.optim import PostLocalSGDOptimizer

from sparkdl.train.optim import build_optimizer
from sparkdl.train.strategies.base import Strategy, cpu_copy, flat_params, set_flat_params

__all__ = ["LocalSGD"]


class LocalSGD(Strategy):
    name = "local_sgd"
    replicas_diverge = True

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        self.model = model
        self.ddp = self.hook_state = None
        warmup = self.cfg.local_sgd_warmup_steps
        if warmup > 0:
            from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (
                PostLocalSGDState, post_localSGD_hook)
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                           process_group=self.group)
            self.hook_state = PostLocalSGDState(process_group=self.group, subgroup=None,
                                                start_localSGD_iter=warmup, post_local_gradient_allreduce=False)
            self.ddp.register_comm_hook(self.hook_state, post_localSGD_hook)
        else:
            self.broadcast_parameters()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.anchor = self.outer = None
        if self.cfg.outer_lr is not None:
            self.anchor = [p.detach().clone() for p in self.params]
            self.outer = torch.optim.SGD(self.anchor, lr=self.cfg.outer_lr, momentum=self.cfg.outer_momentum,
                                         nesterov=self.cfg.outer_momentum > 0)
        return self.ddp if self.ddp is not None else model

    def build_optimizer(self, params) -> torch.optim.Optimizer:
        with warnings.catch_warnings():  # H=1 warns that DDP would do; H=1 is the equivalence test
            warnings.simplefilter("ignore")
            # The averager averages at steps warmup, warmup + H, ... (0-based, after the step): its
            # warm-up is shifted by H - 1 so the first average comes after H local steps, as in
            # easgd and bmuf.
            shifted = self.cfg.local_sgd_warmup_steps + self.cfg.sync_every - 1
            self.averager = PeriodicModelAverager(period=self.cfg.sync_every, warmup_steps=shifted,
                                                  process_group=self.group)
        return PostLocalSGDOptimizer(build_optimizer(self.cfg, params), self.averager)

    def backward_sync(self, sync: bool):
        return self.ddp.no_sync() if self.ddp is not None and not sync else super().backward_sync(sync)

    def _averages_now(self) -> bool:
        s, warmup = self.averager.step, self.averager.warmup_steps
        return s >= warmup and (s - warmup) % self.averager.period == 0

    def step(self, opt, precision, step: int) -> None:
        numel = sum(p.numel() for p in self.params)
        wire = int(2 * (self.world - 1) / self.world * numel * 4)
        warming = self.averager.step < self.cfg.local_sgd_warmup_steps
        if warming:
            self.bytes_sent += wire  # the warm-up's gradient all-reduce
        averages = self._averages_now()
        before = self.averager.step
        precision.step(opt)  # local step, then the averager's (a scaler may skip both)
        # Parameters may have been re-pointed by the averager: collect them again.
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if self.outer is not None and warming:  # the first outer block starts where the warm-up ends
            with torch.no_grad():
                for a, p in zip(self.anchor, self.params):
                    a.copy_(p)
        if self.averager.step == before or not averages:
            return
        self.bytes_sent += wire
        if self.outer is None:
            return
        with torch.no_grad():
            for a, p in zip(self.anchor, self.params):
                a.grad = a - p  # the outer "gradient": minus the block's averaged change
            self.outer.step()
            for a, p in zip(self.anchor, self.params):
                p.copy_(a)

    @contextmanager
    def consensus(self) -> Iterator[None]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        mine = flat_params(params).clone()
        avg = self.reduce(mine.clone()) / self.world
        set_flat_params(params, avg)
        try:
            yield
        finally:
            set_flat_params(params, mine)

    def state_dict(self) -> dict[str, Any]:
        outer = None
        if self.outer is not None:
            outer = {"anchor": cpu_copy(self.anchor), "optimizer": self.outer.state_dict()}
        return {"replica": cpu_copy(self.model.state_dict()), "outer": outer,
                "hook_iter": self.hook_state.iter if self.hook_state is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["replica"])
        if self.outer is not None and state.get("outer"):
            with torch.no_grad():
                for a, saved in zip(self.anchor, state["outer"]["anchor"]):
                    a.copy_(saved)
            self.outer.load_state_dict(state["outer"]["optimizer"])
        if self.hook_state is not None and state.get("hook_iter") is not None:
            self.hook_state.iter = state["hook_iter"]

    def describe(self) -> dict[str, Any]:
        d = {"name": self.name, "sync_every": self.cfg.sync_every,
             "local_sgd_warmup_steps": self.cfg.local_sgd_warmup_steps}
        if self.cfg.outer_lr is not None:
            d.update(outer_lr=self.cfg.outer_lr, outer_momentum=self.cfg.outer_momentum, outer="nesterov_sgd")
        return d
