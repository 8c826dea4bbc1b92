"""Atomic checkpoints under ``<run_dir>/checkpoints/step-<N>.pt``.

Written to a temp file and renamed, so a crash mid-write never leaves a truncated
checkpoint that a resume would pick up; the last few are kept.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_checkpoint", "latest_checkpoint", "KEEP"]

KEEP = 3


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any]) -> str:
    d = Path(run_dir) / "checkpoints"
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"step-{step:09d}.pt"
    tmp = d / f".step-{step:09d}.pt.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, final)
    for old in sorted(d.glob("step-*.pt"))[:-KEEP]:
        old.unlink(missing_ok=True)
    return str(final)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = sorted((Path(run_dir) / "checkpoints").glob("step-*.pt"))
    return found[-1] if found else None
