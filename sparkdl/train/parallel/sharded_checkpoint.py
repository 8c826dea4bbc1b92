"""Sharded checkpoints of a sharded model, loadable without unpickling anything.

``torch.distributed.checkpoint``'s default ``FileSystemWriter`` pickles its ``.metadata`` file,
and ``FileSystemReader`` unpickles it: a file in a shared folder that runs code on load. torch
2.13's DCP also ships ``HuggingFaceStorageWriter``/``Reader``: each rank writes its shards as a
safetensors file whose header (JSON) records each shard's offsets, and the reader rebuilds the
metadata from those headers alone. That is the format here:

    <dir>/shard-0000R-model-00001-of-00001.safetensors   one per rank (tensors only)
    <dir>/extra.json                                     non-tensor optimizer values (lr, betas, ...)

Model and optimizer state are one flat dict of ``model.<fqn>`` and ``optim.<flat key>`` (DCP's
flattened optimizer state dict), so a resume on the same mesh loads each rank's own shards
exactly. On a lakehouse URI, the files go through a local temporary folder (DCP's file
system writer is local) and ``sparkdl._fs``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sparkdl import _fs

__all__ = ["save_sharded", "load_sharded", "save_full_weights", "prune_shards"]

_EXTRA = "extra.json"


def _flat_state(model: nn.Module, opt: torch.optim.Optimizer | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, \
        get_optimizer_state_dict

    tensors = {f"model.{k}": v for k, v in get_model_state_dict(model).items()}
    extra: dict[str, Any] = {}
    if opt is not None:
        osd = get_optimizer_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
        for k, v in osd.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{k}"] = v
            else:
                extra[k] = v
    return tensors, extra


def _json_value(v: Any) -> Any:
    return {"tuple": list(v)} if isinstance(v, tuple) else v


def _from_json(v: Any) -> Any:
    return tuple(v["tuple"]) if isinstance(v, dict) and set(v) == {"tuple"} else v


def save_sharded(uri: str, model: nn.Module, opt: torch.optim.Optimizer | None, *,
                 group: dist.ProcessGroup | None = None) -> None:
    """Every rank of ``group`` writes its shards of the model and optimizer state to folder ``uri``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    tensors, extra = _flat_state(model, opt)
    local = _fs.local_path(uri)
    work = local or tempfile.mkdtemp(prefix="sparkdl-dcp-")
    try:
        os.makedirs(work, exist_ok=True)
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(work, save_distributed=True), process_group=group)
        # Pipeline stages hold different optimizer parameter groups: rank 0 writes them all.
        extras: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(extras, extra, group=group)
        if dist.get_rank(group) == 0:
            merged = {k: v for part in extras for k, v in part.items()}
            text = json.dumps({k: _json_value(v) for k, v in merged.items()}, sort_keys=True)
            if local:
                with open(os.path.join(work, _EXTRA), "w") as f:
                    f.write(text)
            else:
                _fs.write_text(_fs.join(uri, _EXTRA), text)
        if not local:  # every rank uploads its own file(s)
            for name in os.listdir(work):
                if name.endswith(".safetensors"):
                    with open(os.path.join(work, name), "rb") as f:
                        _fs.write_bytes(_fs.join(uri, name), f.read())
        dist.barrier(group=group)  # the folder is complete before anyone records it as a checkpoint
        if dist.get_rank(group) == 0:
            prune_shards(uri)
    finally:
        if not local:
            shutil.rmtree(work, ignore_errors=True)


def load_sharded(uri: str, model: nn.Module, opt: torch.optim.Optimizer | None, *,
                 group: dist.ProcessGroup | None = None) -> None:
    """Load what ``save_sharded`` wrote into ``model`` (and ``opt``), each rank its own shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, \
        set_optimizer_state_dict

    local = _fs.local_path(uri)
    work = local or tempfile.mkdtemp(prefix="sparkdl-dcp-")
    try:
        if not local:
            for name in _fs.listdir(uri):
                if name.endswith(".safetensors") or name == _EXTRA:
                    with open(os.path.join(work, name), "wb") as f:
                        f.write(_fs.read_bytes(_fs.join(uri, name)))
        # The template: the tensors to fill, sharded like the live model (the optimizer's state
        # is created first, as DCP's own get_optimizer_state_dict does).
        tensors, extra = _flat_state(model, opt)
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(work), process_group=group)
        with open(os.path.join(work, _EXTRA)) as f:
            saved_extra = {k: _from_json(v) for k, v in json.load(f).items()}
    finally:
        if not local:
            shutil.rmtree(work, ignore_errors=True)
    set_model_state_dict(model, {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    if opt is not None:
        osd = {k[len("optim."):]: v for k, v in tensors.items() if k.startswith("optim.")}
        osd.update({k: saved_extra.get(k, v) for k, v in extra.items()})
        set_optimizer_state_dict(model, opt, osd, options=StateDictOptions(flatten_optimizer_state_dict=True))


def save_full_weights(uri: str, model: nn.Module, *, group: dist.ProcessGroup | None = None) -> None:
    """Assemble the full (unsharded) weights and write them as ``uri`` (one safetensors file) from
    the group's first rank, for publishing: the weights go from the ranks to the lakehouse
    directly, never through Spark's ``collect()`` to the driver. Every rank of ``group`` calls it."""
    from safetensors.torch import save
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank(group) == 0:
        _fs.write_bytes(uri, save({k: v.detach().contiguous() for k, v in full.items()}))
    dist.barrier(group=group)


def prune_shards(uri: str) -> None:
    """Delete the ``step-N.shards`` folders next to ``uri`` (a new one) whose ``step-N.pt``
    checkpoint file is gone (sparkdl.train.checkpoint keeps the last few); call on one rank."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    names = set(_fs.listdir(parent))
    for other in names:
        if other.endswith(".shards") and other != name and other[:-len(".shards")] + ".pt" not in names:
            _fs.delete(_fs.join(parent, other))
