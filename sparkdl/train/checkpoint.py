"""Checkpoints under ``<run_dir>/checkpoints/step-<N>.pt``, through ``sparkdl._fs``.

A checkpoint is serialized to bytes in memory and written with ``_fs.write_bytes`` (a
temporary object moved into place), so a crash mid-write never leaves a truncated
checkpoint that a resume would pick up, on a local disk or an object store alike. The last
``KEEP`` are kept. Checkpoints hold numpy and Python RNG states, so they are loaded with
``weights_only=False``: they are the run's own files, never a published model.
"""

from __future__ import annotations

import io
import re
from typing import Any

import torch

from sparkdl import _fs

__all__ = ["KEEP", "checkpoint_uri", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

KEEP = 3
_NAME_RE = re.compile(r"step-(\d{9})\.pt")


def checkpoint_uri(run_dir: str, step: int) -> str:
    return _fs.join(run_dir, "checkpoints", f"step-{step:09d}.pt")


def _steps(run_dir: str) -> list[int]:
    names = _fs.listdir(_fs.join(run_dir, "checkpoints"))
    return sorted(int(m.group(1)) for m in map(_NAME_RE.fullmatch, names) if m)


def save_checkpoint(run_dir: str, step: int, state: dict[str, Any]) -> str:
    """Write ``state`` as the checkpoint of ``step``; drop all but the last ``KEEP``; returns its URI."""
    buf = io.BytesIO()
    torch.save(state, buf)
    uri = checkpoint_uri(run_dir, step)
    _fs.write_bytes(uri, buf.getvalue())
    for old in _steps(run_dir)[:-KEEP]:
        _fs.delete(checkpoint_uri(run_dir, old))
    return uri


def latest_checkpoint(run_dir: str) -> str | None:
    steps = _steps(run_dir)
    return checkpoint_uri(run_dir, steps[-1]) if steps else None


def load_checkpoint(uri: str) -> dict[str, Any]:
    """The state saved by ``save_checkpoint`` (tensors on the CPU)."""
    return torch.load(io.BytesIO(_fs.read_bytes(uri)), map_location="cpu", weights_only=False)
