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
from typing import Any

import torch
import torch.distributed as dist

from sparkdl import _fs

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


def _loss_rows(task: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if task == "binary":
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, y.float(), reduction="none")
    return torch.nn.functional.cross_entropy(logits, y.long(), reduction="none")


def validate(model: torch.nn.Module, loader: Any, label: str, task: str, device: torch.device) -> dict[str, float]:
    """Loss, accuracy (and ROC AUC for binary labels) over every validation row, once.

    ``loader`` must be unshuffled with ``remainder="pad"``: rank r then holds rows
    ``[r*R, (r+1)*R)`` of the table's stream, wrapping around (sparkdl/data/plan.py), so the
    rows at stream index >= N are the padding repeats and are masked out here. Collectives
    run on ``device`` tensors (NCCL takes CUDA tensors only)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    first, total_rows = rank * loader.rows_per_rank, loader.num_rows
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, rows
    kept: list[torch.Tensor] = []  # (score, label, keep) per row, for the AUC
    seen = 0
    model.eval()
    try:
        with torch.inference_mode():
            for batch in loader:
                batch = {k: v.to(device) for k, v in batch.items()}
                y = batch[label]
                n = len(y)
                keep = (first + seen + torch.arange(n, device=device)) < total_rows
                seen += n
                logits = model(batch).float()
                pred = (logits > 0).long() if task == "binary" else logits.argmax(-1)
                sums[0] += _loss_rows(task, logits, y)[keep].double().sum()
                sums[1] += (pred == y.long())[keep].double().sum()
                sums[2] += keep.double().sum()
                if task == "binary":
                    kept.append(torch.stack([torch.sigmoid(logits).double(), y.double(), keep.double()], 1))
    finally:
        model.train()
    dist.all_reduce(sums)
    out = {"val_loss": float(sums[0] / sums[2]), "val_accuracy": float(sums[1] / sums[2])}
    if task == "binary":
        from sklearn.metrics import roc_auc_score

        mine = torch.cat(kept) if kept else torch.zeros(0, 3, dtype=torch.float64, device=device)
        # Every rank holds the same number of rows (pad), so a plain all_gather of equal shapes works.
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine)
        rows = torch.cat(parts).cpu().numpy()
        rows = rows[rows[:, 2] > 0]
        labels = rows[:, 1].astype(int)
        out["val_auc"] = float(roc_auc_score(labels, rows[:, 0])) if 0 < labels.sum() < len(labels) else float("nan")
    return out
