"""The seam between the training loop and "how ranks share the model".

A ``Strategy`` wraps the model, tells the loader its data-parallel (rank, world), builds the
optimizer, controls gradient sync on accumulation micro-steps, applies the optimizer step (or
reaches its sync point), reduces on its own process group and hands out its per-rank state for
checkpoints. The loop (sparkdl/train/loop.py) knows nothing else about it.

Everything ``state_dict`` returns must load with ``torch.load(weights_only=True)``: tensors,
numbers, strings and lists/dicts of them (no numpy arrays, no objects).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Callable, ClassVar, Iterator

import torch
import torch.distributed as dist

from sparkdl.train.config import TrainConfig
from sparkdl.train.optim import build_optimizer

__all__ = ["Strategy", "cpu_copy", "flat_params", "set_flat_params"]


def cpu_copy(obj: Any) -> Any:
    """Detached CPU copies of the tensors in a nested dict/list (for checkpoints)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [cpu_copy(v) for v in obj]
    return obj


def flat_params(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def set_flat_params(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    offset = 0
    with torch.no_grad():
        for p in params:
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


class Strategy:
    """Base: one replica per rank, trained alone. Subclasses add the communication.

    ``group`` is the process group the strategy reduces on (the data-parallel group); None is the
    default group. Sharded or pipelined strategies (issue 13) give the loader a data-parallel
    (rank, world) that differs from the global one, and reduce on their dp group."""

    name: ClassVar[str] = "base"
    replicas_diverge: ClassVar[bool] = False
    """True when ranks hold different parameters between sync points: their replicas are checkpointed."""
    runs_rounds: ClassVar[bool] = False
    """True when the strategy trains whole rounds itself (``run_round``) instead of one loader step at a time."""
    shards_model: ClassVar[bool] = False
    """True when no rank holds the whole model (FSDP, pipeline): the strategy saves and loads model and
    optimizer state itself (``save_model_state``), and writes the final weights (``export_weights``)."""
    owns_forward_backward: ClassVar[bool] = False
    """True when the strategy runs forward, loss and backward itself (``forward_backward``: pipeline schedules)."""
    example_batch: Callable[[int], dict[str, torch.Tensor]] | None = None
    """Set by the loop before ``wrap``: n rows of training features (strategies that trace the model need one)."""

    def __init__(self, cfg: TrainConfig, *, device: torch.device, group: dist.ProcessGroup | None = None) -> None:
        self.cfg = cfg
        self.device = device
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.model: torch.nn.Module | None = None
        self.bytes_sent = 0
        """Bytes this rank put on the wire for the strategy's own traffic (benchmarks)."""

    # ----- setup -----
    @property
    def data_parallel(self) -> tuple[int, int]:
        """(rank, world) the training loader shards by."""
        return self.rank, self.world

    def create_model(self, factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        """Build the model on this rank (sharded strategies may build it on the meta device)."""
        return factory().to(self.device)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """Return the module the loop calls forward on; ``model`` stays the bare module."""
        self.model = model
        return model

    def build_optimizer(self, params) -> torch.optim.Optimizer:
        return build_optimizer(self.cfg, params)

    def extra_columns(self) -> list[str]:
        """Columns the strategy needs from the training table besides features and label."""
        return []

    def prepare(self, *, loader: Any, open_table: Callable[[Any], Any]) -> None:
        """Called once the training loader exists; ``open_table(LoaderConfig)`` opens the whole
        training table version on this rank (for strategies that place rows themselves)."""

    def set_total_steps(self, total_steps: int) -> None:
        """The run's optimizer-step budget (before any restore)."""

    def steps_per_epoch(self, batches_per_rank: int) -> int:
        """Optimizer steps in one pass over the loader."""
        return batches_per_rank // self.cfg.accumulation_steps

    # ----- the step -----
    def backward_sync(self, sync: bool) -> AbstractContextManager:
        """Context for one micro-batch's backward; ``sync`` is False on accumulation micro-steps."""
        return nullcontext()

    def step(self, opt: torch.optim.Optimizer, precision: Any, step: int) -> None:
        """Apply the gradients of 0-based optimizer step ``step`` (and sync when it is due)."""
        precision.step(opt)

    def reduce(self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
        """All-reduce on the strategy's group, in place; returns the tensor."""
        if self.world > 1:
            dist.all_reduce(tensor, op=op, group=self.group)
        return tensor

    def reduce_flags(self, tensor: torch.Tensor) -> torch.Tensor:
        """How the non-finite guard's per-step flags are combined (all ranks stop at the same step)."""
        return self.reduce(tensor)

    def forward_backward(self, batch: dict[str, torch.Tensor], *, label: str, loss_fn: Callable, precision: Any,
                         scale: float) -> torch.Tensor | None:
        """``owns_forward_backward`` strategies: forward, loss (times ``scale``) and backward of one batch;
        returns the scaled loss on ranks that compute one, None elsewhere."""
        raise NotImplementedError

    def run_round(self, step: int, *, forward_loss: Callable, guard: Any, precision: Any) -> tuple[float, int, int]:
        """``runs_rounds`` strategies: train round ``step``; return (loss sum over ranks, ranks, samples here)."""
        raise NotImplementedError

    def metrics(self) -> dict[str, float]:
        """Extra fields for rank 0's per-step row."""
        return {}

    # ----- the agreed model -----
    @contextmanager
    def consensus(self) -> Iterator[None]:
        """Inside, ``self.model`` holds the parameters the ranks agree on (validated, checkpointed
        as "model", published); the rank's own replica is back afterwards. Every rank enters it."""
        yield

    def broadcast_parameters(self) -> None:
        """Start every replica from rank 0's initial weights (DDP does this itself)."""
        if self.world > 1:
            for t in self.model.state_dict().values():
                dist.broadcast(t, src=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group)

    # ----- checkpoints -----
    def state_dict(self) -> dict[str, Any]:
        """This rank's strategy state (weights_only-loadable); keys become per-rank lists in the checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def save_model_state(self, uri: str, opt: torch.optim.Optimizer) -> None:
        """``shards_model`` strategies: every rank writes its part of the model and optimizer state
        into folder ``uri`` (next to the loop's checkpoint file)."""
        raise NotImplementedError

    def load_model_state(self, uri: str, opt: torch.optim.Optimizer) -> None:
        raise NotImplementedError

    def export_weights(self, uri: str) -> None:
        """``shards_model`` strategies: write the full weights as one safetensors file ``uri``, from
        the ranks straight to the lakehouse (never through the driver). Every rank calls it."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The strategy and its parameters, for lineage and for checking a resume."""
        return {"name": self.name}

    def close(self, *, ok: bool = True) -> None:
        """Release threads and groups; called on every exit path (``ok`` False after an error,
        when peers may be gone: nothing may wait on them then)."""


StrategyFactory = Callable[..., Strategy]
