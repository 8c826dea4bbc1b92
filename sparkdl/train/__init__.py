"""Distributed training: barrier-mode launcher, the fit loop, checkpoints."""

from sparkdl.train.config import TrainConfig
from sparkdl.train.context import RankContext, rank_context
from sparkdl.train.fit import TrainResult, fit
from sparkdl.train.launcher import LaunchConfig, run_distributed

__all__ = ["LaunchConfig", "RankContext", "TrainConfig", "TrainResult", "fit", "rank_context", "run_distributed"]
