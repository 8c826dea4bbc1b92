"""FSDP2 (``fully_shard``) for any model: a wrap policy, mixed precision, CPU offload, meta init.

Each wrapped block is one unit of communication: its parameters are all-gathered just before
its forward (and backward) and freed after, and its gradients reduce-scattered. A block is
picked by class name (``wrap=["TransformerEncoderLayer"]``) or, by default, by size: the
smallest submodules holding at least ``min_params`` parameters, bottom-up. The root is always
wrapped last (it owns whatever no block took, e.g. embeddings and the head).
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn

__all__ = ["shard_model", "wrap_targets", "materialize_meta", "param_bytes"]


def wrap_targets(model: nn.Module, *, classes: Iterable[str] | None = None, min_params: int = 1_000_000) -> list[str]:
    """Names of the submodules to shard as their own unit, children before parents."""
    if classes is not None:
        wanted = set(classes)
        found = {type(m).__name__ for _, m in model.named_modules()}
        missing = wanted - found
        if missing:
            raise ValueError(f"fsdp_wrap={sorted(wanted)!r} is invalid: the model has no module of class "
                             f"{sorted(missing)}; its classes are {sorted(found)}")
        return [n for n, m in model.named_modules() if n and type(m).__name__ in wanted]
    picked: list[str] = []

    def visit(name: str, module: nn.Module) -> int:
        """Parameters under ``module`` that no picked descendant holds."""
        free = sum(p.numel() for p in module.parameters(recurse=False))
        for child_name, child in module.named_children():
            free += visit(f"{name}.{child_name}" if name else child_name, child)
        # Containers without a forward (ModuleList, ModuleDict) cannot be units: their parents take them.
        if name and free >= min_params and type(module).forward is not nn.Module.forward:
            picked.append(name)
            return 0
        return free

    visit("", model)
    return picked


def shard_model(model: nn.Module, mesh, *, classes: Iterable[str] | None = None, min_params: int = 1_000_000,
                param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = None,
                offload: bool = False) -> nn.Module:
    """Apply ``fully_shard`` per block, then to the root; returns ``model`` (now an FSDPModule).

    ``mesh``: 1-D (shard) for FSDP or 2-D (replicate, shard) for HSDP. ``param_dtype`` /
    ``reduce_dtype``: the compute and gradient-reduction dtypes (None keeps fp32); the sharded
    master weights and the optimizer state stay fp32. ``offload``: keep the sharded parameters,
    gradients and optimizer state on the CPU (the optimizer steps there)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    off = CPUOffloadPolicy() if offload else OffloadPolicy()
    modules = dict(model.named_modules())
    for name in wrap_targets(model, classes=classes, min_params=min_params):
        # Keep the last block's parameters gathered after forward: backward needs them first.
        fully_shard(modules[name], mesh=mesh, mp_policy=mp, offload_policy=off)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=off)
    return model


def materialize_meta(model: nn.Module, device: torch.device, *, seed: int) -> None:
    """Give a model built on the meta device and then sharded real, initialised parameters.

    Every module's own parameters are initialised at full size on the CPU (its
    ``reset_parameters``, seeded alike on every rank, so the ranks agree), and each rank keeps
    only its shard: the peak is one module's parameters, never the whole model. A module with
    parameters but no ``reset_parameters`` cannot be initialised this way; say so."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    gen_state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        model.to_empty(device=device)
        with torch.no_grad():
            # Children before parents: a parent's reset may adjust its children (MultiheadAttention
            # zeroes out_proj.bias), as it does after their own initialisation in __init__.
            for name, module in reversed(list(model.named_modules())):
                own = {k: v for k, v in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
                       if v is not None}
                if not own:
                    continue
                reset = getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)
                if reset is None:
                    raise ValueError(
                        f"fsdp_meta_init=True needs every module with parameters to define reset_parameters(); "
                        f"{type(module).__name__} at {name or '<root>'!r} does not: add one, or set fsdp_meta_init=False")
                # A twin holding full-size CPU copies of this module's own tensors only; its
                # children are the real (sharded, already initialised) ones.
                twin = copy.copy(module)
                twin._parameters = {k: None if v is None else nn.Parameter(torch.empty(v.shape, dtype=v.dtype),
                                                                           v.requires_grad)
                                    for k, v in module._parameters.items()}
                twin._buffers = {k: None if v is None else torch.empty(v.shape, dtype=v.dtype)
                                 for k, v in module._buffers.items()}
                getattr(twin, reset.__name__)()
                for k, target in own.items():
                    full = getattr(twin, k).detach()
                    if isinstance(target, DTensor):
                        local = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
                        target.to_local().copy_(local.to_local())
                    else:
                        target.copy_(full)
    finally:
        torch.set_rng_state(gen_state)


def param_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank holds (the local shard under FSDP)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for p in model.parameters():
        t = p.to_local() if isinstance(p, DTensor) else p
        total += t.numel() * t.element_size()
    return total
