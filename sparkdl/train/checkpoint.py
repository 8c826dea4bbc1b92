"""Checkpoints under ``<run_dir>/checkpoints/step-<N>.pt``, through ``sparkdl._fs``.

A checkpoint is serialized to bytes in memory and written with ``_fs.write_bytes`` (a
temporary object moved into place), so a crash mid-write never leaves a truncated
checkpoint that a resume would pick up, on a local disk or an object store alike. The last
``KEEP`` are kept.

Checkpoints are loaded with ``torch.load(weights_only=True)``: they hold tensors and plain
data only (numbers, strings, lists, dicts), so a tampered ``step-*.pt`` cannot run code on the
driver or a rank when a run resumes. ``save_checkpoint`` refuses anything else up front, naming
the entry; RNG states go in through ``capture_rng`` (numpy's and Python's states as tensors).
"""

from __future__ import annotations

import io
import pickle
import random
import re
import time
from collections import OrderedDict
from typing import Any

import torch

from sparkdl import _fs
from sparkdl.errors import CheckpointError

__all__ = ["KEEP", "capture_rng", "checkpoint_uri", "cleanup_checkpoints", "latest_checkpoint", "load_checkpoint",
           "numpy_state_from_plain", "numpy_state_to_plain", "restore_rng", "save_checkpoint"]

KEEP = 3
_NAME_RE = re.compile(r"step-(\d{9})\.pt")
# What torch.load(weights_only=True) rebuilds without any allowlisting.
# Plain scalars by exact type: numpy's float64 is a float subclass that weights_only refuses.
_SCALARS = (int, float, bool, str, bytes, complex, type(None))
_OBJECTS = (torch.Tensor, torch.dtype, torch.device, torch.Size)
_CONTAINERS = (dict, OrderedDict, list, tuple)


def checkpoint_uri(run_dir: str, step: int) -> str:
    return _fs.join(run_dir, "checkpoints", f"step-{step:09d}.pt")


def _steps(run_dir: str) -> list[int]:
    names = _fs.listdir(_fs.join(run_dir, "checkpoints"))
    return sorted(int(m.group(1)) for m in map(_NAME_RE.fullmatch, names) if m)


def _check_plain(obj: Any, path: str = "state") -> None:
    """Raise naming the first entry that ``weights_only=True`` could not load back."""
    if type(obj) in _SCALARS or isinstance(obj, _OBJECTS):
        return
    if type(obj) in _CONTAINERS:
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for k, v in items:
            if isinstance(obj, dict) and not isinstance(k, (str, int, float, bool, type(None))):
                raise TypeError(f"checkpoint entry {path} has a key of type {type(k).__name__}; use str or int keys")
            _check_plain(v, f"{path}[{k!r}]")
        return
    raise TypeError(
        f"checkpoint entry {path} is a {type(obj).__module__}.{type(obj).__qualname__}, which a checkpoint "
        "loaded with weights_only=True cannot hold; store tensors, numbers, strings, lists and dicts "
        "(RNG states through sparkdl.train.checkpoint.capture_rng)")


def save_checkpoint(run_dir: str, step: int, state: dict[str, Any]) -> str:
    """Write ``state`` as the checkpoint of ``step``; drop all but the last ``KEEP``; returns its URI.

    ``TypeError`` (naming the entry) when ``state`` holds anything but tensors and plain data."""
    _check_plain(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    uri = checkpoint_uri(run_dir, step)
    _fs.write_bytes(uri, buf.getvalue())
    for old in _steps(run_dir)[:-KEEP]:
        _fs.delete(checkpoint_uri(run_dir, old))
    try:  # what writers killed mid-write left behind (best effort: never fails a checkpoint)
        cleanup_checkpoints(run_dir)
    except OSError:
        pass
    return uri


def latest_checkpoint(run_dir: str) -> str | None:
    steps = _steps(run_dir)
    return checkpoint_uri(run_dir, steps[-1]) if steps else None


class _Checkpoint(dict):
    """A loaded checkpoint: a missing entry raises ``CheckpointError`` naming it and the file."""

    uri = ""

    def __missing__(self, key: Any) -> Any:
        raise CheckpointError(
            f"checkpoint {self.uri} has no {key!r} entry (it holds {sorted(map(str, self))}): it was written by "
            "another sparkdl version or another program; start a new run_id, or delete this file to resume "
            "from an earlier checkpoint")


def load_checkpoint(uri: str) -> dict[str, Any]:
    """The state saved by ``save_checkpoint`` (tensors on the CPU), loaded with ``weights_only=True``.

    ``CheckpointError`` when the file holds anything but tensors and plain data (a pickle that would
    run code is refused, never executed), cannot be read, or later lacks an entry a reader asks for."""
    data = _fs.read_bytes(uri)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as e:
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise CheckpointError(
            f"checkpoint {uri} cannot be loaded safely: {first[:300]}. Only tensors and plain data load "
            "(weights_only=True); this file was altered or not written by sparkdl. Delete it to resume from "
            "the previous checkpoint, or start a new run_id") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {uri} holds a {type(state).__name__}, not a checkpoint dict; "
                              "delete it or start a new run_id")
    out = _Checkpoint(state)
    out.uri = uri
    return out


def numpy_state_to_plain(state: tuple) -> dict[str, Any]:
    """A numpy ``RandomState.get_state()`` tuple as a tensor and plain numbers (checkpointable)."""
    import numpy as np

    name, keys, pos, has_gauss, gauss = state
    return {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
            "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}


def numpy_state_from_plain(plain: dict[str, Any]) -> tuple:
    """The ``RandomState.set_state()`` tuple back from ``numpy_state_to_plain``."""
    import numpy as np

    return (plain["name"], plain["keys"].numpy().astype(np.uint32), int(plain["pos"]), int(plain["has_gauss"]),
            float(plain["gauss"]))


def capture_rng(device: torch.device | str | None = None) -> dict[str, Any]:
    """torch's, numpy's and Python's RNG states (and the CUDA one of a cuda ``device``) as tensors,
    ints and strings only, so a checkpoint holding them loads with ``weights_only=True``."""
    import numpy as np

    version, py_state, py_gauss = random.getstate()
    device = torch.device(device) if device is not None else torch.device("cpu")
    return {
        "torch": torch.get_rng_state(),
        "numpy": numpy_state_to_plain(np.random.get_state()),
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": None if py_gauss is None else float(py_gauss)},
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def restore_rng(state: dict[str, Any], device: torch.device | str | None = None) -> None:
    """Put back the RNG states ``capture_rng`` took."""
    import numpy as np

    torch.set_rng_state(state["torch"])
    np.random.set_state(numpy_state_from_plain(state["numpy"]))
    p = state["python"]
    random.setstate((int(p["version"]), tuple(int(x) for x in p["state"].tolist()), p["gauss"]))
    device = torch.device(device) if device is not None else torch.device("cpu")
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def cleanup_checkpoints(run_dir: str, *, older_than: float = 3600.0, dry_run: bool = False) -> list[str]:
    """Delete leftover temporary files of interrupted checkpoint writes under ``run_dir``; return them.

    A writer killed between writing a checkpoint's temporary object and moving it into place
    leaves a ``*.tmp-*`` file that nothing reads. Only those older than ``older_than`` seconds go:
    a younger one may belong to a writer still running."""
    d = _fs.join(run_dir, "checkpoints")
    now = time.time()
    gone = []
    for name in _fs.listdir(d):
        if ".tmp-" not in name or _NAME_RE.fullmatch(name):
            continue
        uri = _fs.join(d, name)
        mtime = _mtime(uri)
        if mtime is None or now - mtime < older_than:
            continue
        gone.append(uri)
    if not dry_run:
        for uri in gone:
            _fs.delete(uri)
    return gone


def _mtime(uri: str) -> float | None:
    """Last modification time (epoch seconds) of a file, through pyarrow.fs; None when unknown."""
    fs, path = _fs.resolve(uri)
    try:
        info = fs.get_file_info(path)
    except OSError:
        return None
    return info.mtime.timestamp() if info.mtime is not None else None
