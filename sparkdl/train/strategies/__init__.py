"""How ranks share the model, behind one interface (``Strategy``); chosen by TrainConfig.strategy.

Each strategy is one module; ``build_strategy`` imports only the one a run uses.
"""

from __future__ import annotations

import importlib

import torch
import torch.distributed as dist

from sparkdl.train.config import TrainConfig
from sparkdl.train.strategies.base import Strategy

__all__ = ["Strategy", "build_strategy"]

_CLASSES = {
    "allreduce": ("sparkdl.train.strategies.allreduce", "AllReduce"),
    "local_sgd": ("sparkdl.train.strategies.local_sgd", "LocalSGD"),
    "easgd": ("sparkdl.train.strategies.easgd", "EASGD"),
    "bmuf": ("sparkdl.train.strategies.bmuf", "BMUF"),
    "ssp": ("sparkdl.train.strategies.param_server", "StaleSynchronous"),
    "async": ("sparkdl.train.strategies.param_server", "Asynchronous"),
    "fedavg": ("sparkdl.train.strategies.fedavg", "FedAvg"),
}


# Model parallelism (TrainConfig.parallelism) replaces the replica strategy; mesh.py allows it
# with strategy="allreduce" only.
_PARALLEL = {
    "fsdp": ("sparkdl.train.strategies.fsdp", "FullyShardedDataParallel"),
    "pipeline": ("sparkdl.train.strategies.pipeline", "Pipeline"),
}


def build_strategy(cfg: TrainConfig, *, device: torch.device, group: dist.ProcessGroup | None = None) -> Strategy:
    module, cls = _PARALLEL.get(cfg.parallelism) or _CLASSES[cfg.strategy]
    return getattr(importlib.import_module(module), cls)(cfg, device=device, group=group)
