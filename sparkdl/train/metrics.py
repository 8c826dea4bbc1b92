"""Metrics of a run: per-step rows saved with the run, and per-epoch validation.

Per-step rows: rank 0 keeps the rows since its last checkpoint in memory and writes them as
one segment ``<run_dir>/metrics/steps-<last step>.jsonl`` (through ``sparkdl._fs``, so object
stores work) just before each checkpoint. A retried or resumed attempt starts at a
checkpoint and first deletes the segments past it, so every step is stored once even when
steps were trained twice; ``read_step_metrics`` concatenates the segments.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from sparkdl import _fs
from sparkdl.data.loader import PAD_MASK

if TYPE_CHECKING:
    from sparkdl.tasks import Task

__all__ = ["StepLog", "read_step_metrics", "validate"]

_SEGMENT_RE = re.compile(r"steps-(\d{9})\.jsonl")


def _segments(run_dir: str) -> list[int]:
    names = _fs.listdir(_fs.join(run_dir, "metrics"))
    return sorted(int(m.group(1)) for m in map(_SEGMENT_RE.fullmatch, names) if m)


def _segment_uri(run_dir: str, last_step: int) -> str:
    return _fs.join(run_dir, "metrics", f"steps-{last_step:09d}.jsonl")


class StepLog:
    """Rank 0's per-step rows; ``flush`` writes the pending ones as a segment."""

    def __init__(self, run_dir: str, resumed_at_step: int) -> None:
        self.run_dir = run_dir
        self.pending: list[dict[str, Any]] = []
        for last in _segments(run_dir):  # rows of steps a failed attempt trained past the checkpoint
            if last > resumed_at_step:
                _fs.delete(_segment_uri(run_dir, last))

    def add(self, row: dict[str, Any]) -> None:
        self.pending.append(row)

    def flush(self) -> None:
        if self.pending:
            text = "".join(json.dumps(r) + "\n" for r in self.pending)
            _fs.write_text(_segment_uri(self.run_dir, int(self.pending[-1]["step"])), text)
            self.pending = []


def read_step_metrics(run_dir: str) -> list[dict[str, Any]]:
    """Every stored per-step row of the run, by step (one row per step)."""
    rows: dict[int, dict[str, Any]] = {}
    for last in _segments(run_dir):
        for line in _fs.read_text(_segment_uri(run_dir, last)).splitlines():
            if line.strip():
                row = json.loads(line)
                rows[int(row["step"])] = row
    return [rows[s] for s in sorted(rows)]


def validate(model: torch.nn.Module, loader: Any, label: str, task: "Task", device: torch.device, *,
             weight: str | None = None) -> dict[str, float]:
    """The task's metrics (``sparkdl.tasks``) over every validation row, once.

    ``loader`` must be unshuffled with ``remainder="pad"``: rank r then holds rows
    ``[r*R, (r+1)*R)`` of the table's stream, wrapping around (sparkdl/data/plan.py), so the
    rows at stream index >= N are the padding repeats, which the batches' ``_valid`` mask marks
    (``sparkdl.data.loader.PAD_MASK``) and which are dropped here. Each rank sums its
    rows' contributions and one all-reduce adds them up; a metric that needs every row in one
    place (the binary AUC) gathers its (score, label, weight) rows to rank 0 only, which
    broadcasts the result. Collectives run on ``device`` tensors (NCCL takes CUDA tensors only)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    first, total_rows = rank * loader.rows_per_rank, loader.num_rows
    sums: torch.Tensor | None = None
    kept: list[torch.Tensor] = []
    seen = 0
    model.eval()
    try:
        with torch.inference_mode():
            for batch in loader:
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                n = len(batch[label])
                # The loader's padding mask (remainder="pad"); the same rule from positions otherwise.
                keep = batch[PAD_MASK] if PAD_MASK in batch else (first + seen + torch.arange(n, device=device)) < total_rows
                seen += n
                out = task.outputs(model(batch))[keep]
                y = batch[label][keep]
                w = batch[weight][keep].double() if weight else torch.ones(len(y), dtype=torch.float64, device=device)
                part = task.metric_sums(out, y, w)
                sums = part if sums is None else sums + part
                if task.gathers_rows:
                    kept.append(task.gather_rows(out, y, w))
    finally:
        model.train()
    if sums is None:  # no batch at all: every rank sees the same empty loader
        return {}
    dist.all_reduce(sums)
    result = task.metrics(sums)
    if task.gathers_rows:
        # Every rank holds the same number of padded rows, so the gathered tensors have equal
        # shapes; only rank 0 receives them (not an all-gather of every row to every rank).
        mine = torch.cat(kept)
        width = mine.shape[1]
        padded = torch.zeros(loader.rows_per_rank, width, dtype=torch.float64, device=device)
        padded[:len(mine)] = mine
        valid = torch.tensor([len(mine)], dtype=torch.float64, device=device)
        parts = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
        counts = [torch.empty_like(valid) for _ in range(world)] if rank == 0 else None
        dist.gather(padded, parts, dst=0)
        dist.gather(valid, counts, dst=0)
        extra = {}
        if rank == 0:
            rows = torch.cat([p[:int(c.item())] for p, c in zip(parts, counts)]).cpu().numpy()
            extra = task.gathered_metrics(rows)
        names = sorted(task.gathered_metrics(torch.zeros(0, width, dtype=torch.float64).numpy()))
        values = torch.tensor([extra.get(k, 0.0) for k in names], dtype=torch.float64, device=device)
        dist.broadcast(values, src=0)
        result.update({k: float(v) for k, v in zip(names, values.tolist())})
    return result
