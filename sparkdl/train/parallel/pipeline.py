"""Pipeline stages from any traceable model: split at named modules, run a micro-batch schedule.

``torch.distributed.pipelining.pipeline`` traces the model once (torch.export) on one example
micro-batch and cuts the graph where each ``pipeline_split`` module begins; stage modules keep
the model's own parameter names and share its parameter tensors. The schedule (GPipe, or
1F1B) splits a batch into micro-batches, sends activations forward and gradients back between
the stages' ranks, and computes the loss on the last stage only (averaged over micro-batches,
so gradients equal one pass over the whole batch).

On gloo, ``batch_isend_irecv`` has been reported to hang (pytorch#132644, PiPPy#989); GPipe and
1F1B with 2-4 stages run here on gloo in the tests. Use NCCL on GPUs.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["split_model", "StageRunner"]


def split_model(model: nn.Module, split: list[str], example: dict[str, torch.Tensor]):
    """Trace ``model`` on ``example`` (one micro-batch) and cut it where each ``split`` module
    begins; returns the ``Pipe``. ValueError when the model cannot be traced or split."""
    from torch.distributed.pipelining import SplitPoint, pipeline

    try:
        pipe = pipeline(model, mb_args=(example,), split_spec={name: SplitPoint.BEGINNING for name in split})
    except Exception as e:  # export's errors are many types; all mean "this model cannot be cut here"
        raise ValueError(f"pipeline_split={split!r}: the model cannot be traced and split for pipelining "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); its forward must be "
                         "traceable by torch.export (no data-dependent Python control flow)") from e
    if pipe.num_stages != len(split) + 1:
        raise ValueError(f"pipeline_split={split!r} gives {pipe.num_stages} stages, not {len(split) + 1}: a split "
                         "point inside a module that runs more than once, or not on the forward path")
    return pipe


class StageRunner:
    """One rank's stage of a pipeline and its schedule.

    ``step(inputs, target)``: the first stage passes ``inputs``, the last ``target``; returns the
    batch's loss on the last stage (``loss_fn`` averaged over the micro-batches), None elsewhere.
    Gradients accumulate in the stage's parameters as after ``loss.backward()``."""

    def __init__(self, pipe, *, stage_index: int, device: torch.device, group: dist.ProcessGroup | None,
                 microbatches: int, schedule: str, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

        self.stage_index = stage_index
        self.num_stages = pipe.num_stages
        self.stage = pipe.build_stage(stage_index, device, group=group)
        self.module: nn.Module = self.stage.submod
        cls = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
        # Each micro-batch's loss is divided by their number here, not by the schedule's
        # scale_grads: that divides the parameters' whole .grad after the step, so it would also
        # divide gradients accumulated by earlier steps (accumulation_steps > 1).
        self.schedule = cls(self.stage, n_microbatches=microbatches, scale_grads=False,
                            loss_fn=lambda out, y: loss_fn(out, y) / microbatches)

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1

    def step(self, inputs: Any, target: torch.Tensor | None) -> torch.Tensor | None:
        losses: list[torch.Tensor] = []
        if self.is_first and self.is_last:
            raise RuntimeError("a pipeline of one stage: use parallelism='data'")
        if self.is_first:
            self.schedule.step(inputs)
        elif self.is_last:
            self.schedule.step(target=target, losses=losses)
        else:
            self.schedule.step()
        return torch.stack([l.detach() for l in losses]).sum() if losses else None
