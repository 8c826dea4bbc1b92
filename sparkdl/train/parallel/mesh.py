"""How the ranks of a run are laid out: a 2-D mesh of data-parallel replicas x model parts.

``parallelism``:

- ``data``: every rank holds the whole model; the run's strategy keeps the replicas in sync.
- ``fsdp``: parameters, gradients and optimizer state sharded over ``world / dp`` ranks (FSDP2);
  ``data_parallel_size=dp`` > 1 replicates those shards dp times (HSDP: mesh ``(dp, shard)``).
- ``pipeline``: the model cut into ``len(pipeline_split) + 1`` stages; the remaining factor of the
  world is data parallel (mesh ``(dp, pp)``).

The checks here run in ``TrainConfig.__post_init__``, before anything is launched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["PARALLELISMS", "PIPELINE_SCHEDULES", "MeshLayout", "build_mesh", "check_model_parallelism", "check_parallelism",
           "check_split_points", "mesh_layout"]

PARALLELISMS = ("data", "fsdp", "pipeline")
PIPELINE_SCHEDULES = ("gpipe", "1f1b")
# Strategies whose replicas step in lockstep on all-reduced gradients: the only ones a sharded or
# pipelined model can follow (local SGD & co. need each rank to hold a whole model of its own).
_SHARDABLE_STRATEGIES = ("allreduce",)


@dataclass(frozen=True)
class MeshLayout:
    """The run's mesh: ``dp`` replicas x ``inner`` model parts (shards or stages)."""

    parallelism: str
    dp: int
    """Data-parallel degree: the loader shards the table into this many parts."""
    inner: int
    """FSDP shard group size, or the number of pipeline stages (1 for ``data``)."""

    @property
    def dim_names(self) -> tuple[str, str]:
        return ("dp", "pp") if self.parallelism == "pipeline" else ("dp", "shard")

    def coords(self, rank: int) -> tuple[int, int]:
        """(data-parallel index, index within the model parts) of a global rank; the inner
        dimension is the fast one, so one replica's parts sit on neighbouring ranks."""
        return divmod(rank, self.inner)


def mesh_layout(*, parallelism: str, world_size: int, data_parallel_size: int | None = None,
                pipeline_split: list[str] | None = None) -> MeshLayout:
    if parallelism == "pipeline":
        stages = len(pipeline_split or []) + 1
        return MeshLayout(parallelism, world_size // stages, stages)
    if parallelism == "fsdp":
        dp = data_parallel_size or 1
        return MeshLayout(parallelism, dp, world_size // dp)
    return MeshLayout(parallelism, world_size, 1)


def check_parallelism(cfg: Any) -> None:
    """Raise ValueError naming the field and the fix when ``cfg``'s parallelism cannot run."""
    def bad(name: str, fix: str) -> ValueError:
        return ValueError(f"{name}={getattr(cfg, name)!r} is invalid: {fix}")

    p, world = cfg.parallelism, cfg.num_ranks
    if p not in PARALLELISMS:
        raise bad("parallelism", f"use one of {list(PARALLELISMS)}")
    if cfg.pipeline_schedule not in PIPELINE_SCHEDULES:
        raise bad("pipeline_schedule", f"use one of {list(PIPELINE_SCHEDULES)}")
    if not isinstance(cfg.microbatches, int) or isinstance(cfg.microbatches, bool) or cfg.microbatches < 1:
        raise bad("microbatches", "must be an integer of at least 1")
    split = cfg.pipeline_split
    if split is not None and (isinstance(split, str) or not all(isinstance(s, str) and s for s in split)
                              or len(set(split)) != len(split)):
        raise bad("pipeline_split", 'must be a list of distinct module names, e.g. ["encoder.layers.2"]')
    dp = cfg.data_parallel_size
    if dp is not None and (not isinstance(dp, int) or isinstance(dp, bool) or dp < 1):
        raise bad("data_parallel_size", "must be an integer of at least 1, or None")
    if cfg.fsdp_wrap is not None and (isinstance(cfg.fsdp_wrap, str)
                                      or not all(isinstance(c, str) and c for c in cfg.fsdp_wrap)):
        raise bad("fsdp_wrap", 'must be a list of module class names, e.g. ["TransformerEncoderLayer"], or None')
    if not isinstance(cfg.fsdp_min_params, int) or cfg.fsdp_min_params < 1:
        raise bad("fsdp_min_params", "must be an integer of at least 1, e.g. 1000000")
    for name, default, applies in (("pipeline_split", None, "pipeline"), ("data_parallel_size", None, None),
                                   ("fsdp_wrap", None, "fsdp"), ("fsdp_offload", False, "fsdp"),
                                   ("fsdp_meta_init", False, "fsdp")):
        if getattr(cfg, name) != default and (p == "data" or applies not in (None, p)):
            where = f"parallelism={applies!r}" if applies else "parallelism='fsdp' or 'pipeline'"
            raise bad(name, f"only applies to {where}; set parallelism or drop it")
    if p == "data":
        return
    if cfg.strategy not in _SHARDABLE_STRATEGIES:
        raise bad("strategy", f"parallelism={p!r} shards the model over ranks, so no rank holds a replica of its "
                              f"own to step alone; use strategy='allreduce' or parallelism='data'")
    if cfg.compression != "none":
        raise bad("compression", f"gradient compression hooks are DDP's; parallelism={p!r} reduces gradients "
                                 "itself: use compression='none'")
    if cfg.ddp_bucket_cap_mb is not None:
        raise bad("ddp_bucket_cap_mb", f"DDP's buckets do not exist with parallelism={p!r}, which reduces "
                                       "gradients itself; leave it None")
    if cfg.sync_batchnorm:
        raise bad("sync_batchnorm", f"not supported with parallelism={p!r}; turn it off")
    if p == "fsdp":
        if cfg.fsdp_offload and not cfg.use_gpu:
            raise bad("fsdp_offload", "offload moves GPU-resident shards to host memory; on CPU ranks they are there "
                                      "already: set use_gpu=True or drop fsdp_offload")
        dp = dp or 1
        if world % dp:
            raise bad("data_parallel_size", f"num_ranks={world} is not a multiple of it: the mesh is "
                                            f"data_parallel_size x shards; use a divisor of {world}")
        return
    if not split:
        raise bad("pipeline_split", 'parallelism="pipeline" needs the module names where stages start, '
                                    'e.g. ["encoder.layers.2"] for 2 stages')
    stages = len(split) + 1
    if world % stages:
        raise bad("num_ranks", f"{stages} pipeline stages (pipeline_split has {len(split)} split points) do not "
                               f"divide {world} ranks: use a multiple of {stages} ranks, or change pipeline_split")
    if dp is not None and dp * stages != world:
        raise bad("data_parallel_size", f"with {stages} stages on {world} ranks it must be {world // stages} "
                                        "(or None)")
    if cfg.precision == "fp16":
        raise bad("precision", "the pipeline schedule runs backward itself, without the fp16 gradient scaler; "
                               "use bf16 or fp32")
    if cfg.grad_clip is not None:
        raise bad("grad_clip", "clipping needs the norm over all stages, which the pipeline does not compute yet; "
                               "use grad_clip=None with parallelism='pipeline'")
    if cfg.weight_column is not None:
        raise bad("weight_column", "the pipeline's last stage receives only the label, not per-row weights; "
                                   "use weight_column=None with parallelism='pipeline', or parallelism='fsdp'")
    if cfg.batch_size % cfg.microbatches:
        raise bad("microbatches", f"must divide batch_size={cfg.batch_size} (each micro-batch is batch_size / "
                                  "microbatches rows)")


def check_split_points(model: torch.nn.Module, split: list[str]) -> None:
    """Driver-side, before launch: every split point names a submodule, in forward order."""
    names = [n for n, _ in model.named_modules() if n]
    missing = [s for s in split if s not in names]
    if missing:
        blocks = [n for n in names if n.count(".") <= 2][:40]
        raise ValueError(f"pipeline_split={split!r} is invalid: {missing} name no submodule of the model; "
                         f"module names include {blocks}")
    order = [names.index(s) for s in split]
    if order != sorted(order):
        raise ValueError(f"pipeline_split={split!r} is invalid: list split points in the order the model runs them")


def build_mesh(layout: MeshLayout, device: torch.device):
    """The 2-D device mesh of ``layout``; the device type is always explicit, because a gloo
    group on a host with GPUs would otherwise get a CUDA mesh and crash (pytorch#132471)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (layout.dp, layout.inner), mesh_dim_names=layout.dim_names)


def check_model_parallelism(cfg: Any, model: torch.nn.Module, example: dict[str, torch.Tensor]) -> None:
    """Driver-side, on the model built for the dry run: split points exist and the model can be
    cut there (traced on ``example``), FSDP wrap classes exist, meta init can initialise it."""
    if cfg.parallelism == "pipeline":
        from sparkdl.train.parallel.pipeline import split_model

        check_split_points(model, cfg.pipeline_split)
        split_model(model, cfg.pipeline_split, example)
    elif cfg.parallelism == "fsdp":
        from sparkdl.train.parallel.fsdp import wrap_targets

        wrap_targets(model, classes=cfg.fsdp_wrap, min_params=cfg.fsdp_min_params)
        if cfg.fsdp_meta_init:
            for name, module in model.named_modules():
                if next(module.parameters(recurse=False), None) is not None and not (
                        hasattr(module, "reset_parameters") or hasattr(module, "_reset_parameters")):
                    raise ValueError(f"fsdp_meta_init=True needs every module with parameters to define "
                                     f"reset_parameters(); {type(module).__name__} at {name or '<root>'!r} does not: "
                                     "add one, or set fsdp_meta_init=False")
