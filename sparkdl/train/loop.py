"""The per-rank training function: loader -> DDP step -> checkpoints -> validation.

Runs inside a rank started by ``run_distributed``; rank 0 writes checkpoints and metrics.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from sparkdl.train.checkpoint import latest_checkpoint, save_checkpoint
from sparkdl.train.config import TrainConfig
from sparkdl.train.context import rank_context

__all__ = ["train_rank"]


def _optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _schedule(cfg: TrainConfig, total_steps: int):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        span = max(1, total_steps - cfg.warmup_steps)
        frac = min(1.0, (step - cfg.warmup_steps) / span)
        return 0.5 * (1 + math.cos(math.pi * frac)) if cfg.lr_schedule == "cosine" else 1.0 - frac

    return factor


def _comm_hook(ddp, cfg: TrainConfig) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if cfg.compression == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif cfg.compression == "bf16":
        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif cfg.compression == "powersgd":
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=1, start_powerSGD_iter=2)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)


def _loss_fn(task: str):
    if task == "binary":
        return lambda logits, y: torch.nn.functional.binary_cross_entropy_with_logits(logits, y.float())
    return lambda logits, y: torch.nn.functional.cross_entropy(logits, y.long())


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROC AUC by ranks (ties averaged)."""
    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _validate(model, loader, label: str, task: str, device) -> dict[str, float]:
    """Loss, accuracy (and AUC for binary labels) over all ranks' validation shards."""
    loss_fn = _loss_fn(task)
    model.eval()
    total = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, rows
    scores, labels = [], []
    with torch.inference_mode():
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            y = batch[label]
            logits = model(batch).float()
            total[0] += float(loss_fn(logits, y)) * len(y)
            pred = (logits > 0).long() if task == "binary" else logits.argmax(-1)
            total[1] += float((pred.cpu() == y.cpu().long()).sum())
            total[2] += len(y)
            if task == "binary":
                scores.append(torch.sigmoid(logits).cpu().numpy())
                labels.append(y.cpu().numpy())
    model.train()
    dist.all_reduce(total)
    out = {"val_loss": float(total[0] / total[2]), "val_accuracy": float(total[1] / total[2])}
    if task == "binary":
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (np.concatenate(scores) if scores else np.zeros(0),
                                          np.concatenate(labels) if labels else np.zeros(0)))
        out["val_auc"] = _auc(np.concatenate([g[0] for g in gathered]), np.concatenate([g[1] for g in gathered]))
    return out


def _inject(cfg: TrainConfig, rank: int, attempt: int, step: int) -> bool:
    fi = cfg.fault_injection
    if not fi or fi.get("rank", 0) != rank or fi.get("step") != step or fi.get("attempt", 0) != attempt:
        return False
    if fi.get("kind") == "exit":
        os._exit(17)
    if fi.get("kind") == "raise":
        raise RuntimeError(f"injected fault at step {step}")
    return fi.get("kind") == "nan"


def train_rank(cfg: TrainConfig, setup: dict[str, Any]) -> dict[str, Any]:
    """One rank's training run; rank 0 returns the final state dict, history and metrics."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sparkdl.data import LoaderConfig, TableLoader
    from sparkdl.models import build_model

    ctx = rank_context()
    rank, world, device = ctx.rank, ctx.world_size, ctx.device
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    run_dir = Path(setup["run_dir"])
    columns = setup["feature_columns"] + [setup["label_column"]]
    if setup.get("log_row_ids"):
        columns.append(setup["log_row_ids"])
    model = build_model(cfg.model, **setup["model_kwargs"]).to(device)
    task = getattr(model, "task", "binary")
    if cfg.sync_batchnorm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp = DDP(model)
    _comm_hook(ddp, cfg)
    opt = _optimizer(cfg, ddp.parameters())
    loss_fn = _loss_fn(task)
    lcfg = LoaderConfig(batch_size=cfg.batch_size, columns=columns, shuffle=True, seed=cfg.seed,
                        shuffle_buffer_rows=cfg.shuffle_buffer_rows)
    train = TableLoader(setup["train_uri"], version=setup["train_version"], rank=rank, world_size=world, config=lcfg)
    valid = None
    if setup.get("valid_uri"):
        valid = TableLoader(setup["valid_uri"], version=setup["valid_version"], rank=rank, world_size=world,
                            config=LoaderConfig(batch_size=max(cfg.batch_size, 1024), columns=columns, shuffle=False,
                                                drop_last=False, remainder="pad"))
    steps_per_epoch = len(train) // cfg.accumulation_steps
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg, total))
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    step, start_epoch, history = 0, 0, []
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        train.load_state_dict(state["loaders"][rank])
        torch.set_rng_state(state["rng"]["torch"][rank])
        np.random.set_state(state["rng"]["numpy"][rank])
        random.setstate(state["rng"]["python"][rank])
        step, start_epoch, history = state["step"], state["epoch"], state["history"]

    def checkpoint(epoch: int) -> str | None:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, {"loader": train.state_dict(), "torch": torch.get_rng_state(),
                                          "numpy": np.random.get_state(), "python": random.getstate()})
        if rank != 0:  # every rank knows where rank 0 put it, for the NaN error message
            return str(run_dir / "checkpoints" / f"step-{step:09d}.pt")
        return save_checkpoint(run_dir, step, {
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if scaler else None, "loaders": [g["loader"] for g in gathered],
            "rng": {k: [g[k] for g in gathered] for k in ("torch", "numpy", "python")},
            "step": step, "epoch": epoch, "history": history})

    metrics_log = open(run_dir / "metrics.jsonl", "a") if rank == 0 else None
    last_ckpt = str(latest_checkpoint(run_dir)) if ckpt else None
    t0, samples = time.perf_counter(), 0
    done = step >= total
    ids_log = setup.get("log_row_ids")
    for epoch in range(start_epoch, cfg.epochs):
        if done:
            break
        train.set_epoch(epoch)
        micro = 0
        # Micro-batches left over from the previous epoch must not leak into this step.
        opt.zero_grad(set_to_none=True)
        for batch in train:
            batch = {k: v.to(device) for k, v in batch.items()}
            if ids_log:  # debug/test option: which rows each step consumed, per attempt
                with open(run_dir / f"rows-rank{rank}.jsonl", "a") as f:
                    f.write(json.dumps({"attempt": ctx.attempt, "epoch": epoch, "step": step,
                                        "ids": batch[ids_log].tolist()}) + "\n")
            micro += 1
            sync = micro % cfg.accumulation_steps == 0
            with (ddp.no_sync() if not sync else _null()):
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss = loss_fn(ddp(batch).float(), batch[setup["label_column"]]) / cfg.accumulation_steps
                if _inject(cfg, rank, ctx.attempt, step + 1):
                    loss = loss * float("nan")
                flag = torch.tensor([0.0 if torch.isfinite(loss) else 1.0])
                dist.all_reduce(flag)
                if flag.item() > 0:
                    # Every rank sees the all-reduced flag and returns normally, so the launcher
                    # does not relaunch a run that would only diverge again; fit() raises.
                    local = float(loss.detach())
                    train.close()
                    if valid is not None:
                        valid.close()
                    if metrics_log:
                        metrics_log.close()
                    return {"nonfinite": {"step": step + 1, "checkpoint": last_ckpt,
                                          "loss": local if not math.isfinite(local) else float("nan")}}
                (scaler.scale(loss) if scaler else loss).backward()
            samples += len(batch[setup["label_column"]])
            if not sync:
                continue
            if scaler:
                scaler.unscale_(opt)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(ddp.parameters(), cfg.grad_clip)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            if metrics_log:
                rate = samples * world / max(1e-9, time.perf_counter() - t0)
                metrics_log.write(json.dumps({"epoch": epoch, "step": step, "total_steps": total,
                                              "loss": float(loss.detach()) * cfg.accumulation_steps,
                                              "lr": sched.get_last_lr()[0], "samples_per_s": rate}) + "\n")
                metrics_log.flush()
            if step % cfg.checkpoint_every == 0:
                last_ckpt = checkpoint(epoch) or last_ckpt
            if step >= total:
                done = True
                break
        row = {"epoch": epoch + 1, "step": step}
        if valid is not None:
            row.update(_validate(model, valid, setup["label_column"], task, device))
        history.append(row)
        last_ckpt = checkpoint(epoch + 1) or last_ckpt
    train.close()
    if valid is not None:
        valid.close()
    if metrics_log:
        metrics_log.close()
    if rank != 0:
        return {}
    return {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "history": history,
            "steps": step, "metrics": history[-1] if history else {}, "checkpoint": last_ckpt,
            "train_version": train.version, "valid_version": valid.version if valid else None}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
