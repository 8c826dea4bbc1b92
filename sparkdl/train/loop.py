"""The per-rank training function: loader -> DDP step -> checkpoints -> validation.

Runs inside a rank started by ``run_distributed``. Rank 0 writes checkpoints and the per-step
metrics (through ``sparkdl._fs``) and reports progress to the driver over the launcher's
channel. Every collective runs on ``device`` tensors, so the same code serves gloo and NCCL.
"""

from __future__ import annotations

import json
import random
import time
from collections import deque
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from sparkdl.train.checkpoint import checkpoint_uri, latest_checkpoint, load_checkpoint, save_checkpoint
from sparkdl.train.config import TrainConfig
from sparkdl.train.context import rank_context
from sparkdl.train.handoff import RankSetup
from sparkdl.train.metrics import StepLog, validate
from sparkdl.train.optim import build_optimizer, hook_state_dict, load_hook_state, lr_factor, register_comm_hook

__all__ = ["train_rank"]

# Setup errors a relaunch would only repeat (bad config, model or checkpoint): not retried.
_DETERMINISTIC = (ValueError, TypeError, LookupError, ImportError, AttributeError, NotImplementedError)


def train_rank(cfg: TrainConfig, setup: RankSetup) -> dict[str, Any]:
    """One rank's training run; rank 0 returns the final state dict, history and metrics
    (or ``{"nonfinite": ...}`` when the loss, the gradients or the parameters stopped being finite)."""
    run = _RankRun(cfg, setup)
    try:
        return run.run()
    finally:
        run.close()


class _NonFinite(Exception):
    def __init__(self, step: int, what: str, value: float) -> None:
        super().__init__(f"{what} became {value} at step {step}")
        self.step, self.what, self.value = step, what, value


class _Rate:
    """Samples/s over the last few steps (not since start-up, which includes loading)."""

    def __init__(self, window: int = 20) -> None:
        self._points: deque[tuple[float, int]] = deque(maxlen=window + 1)

    def __call__(self, samples: int) -> float:
        self._points.append((time.perf_counter(), samples))
        (t0, s0), (t1, s1) = self._points[0], self._points[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0


def _finite_stat(value: torch.Tensor) -> torch.Tensor:
    """[is nan, is inf, value or 0] of a scalar, to all-reduce: every rank learns what any rank saw."""
    v = value.double().reshape(())
    return torch.stack([torch.isnan(v).double(), torch.isinf(v).double(), torch.nan_to_num(v, 0.0, 0.0, 0.0)])


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


class _RankRun:
    def __init__(self, cfg: TrainConfig, setup: RankSetup) -> None:
        self.cfg, self.setup = cfg, setup
        self.ctx = rank_context()
        self.rank, self.world, self.device = self.ctx.rank, self.ctx.world_size, self.ctx.device
        self.run_dir: str = setup.run_dir
        self.label: str = setup.label_column
        self.train = self.valid = None
        try:
            self._build()
        except _DETERMINISTIC as e:
            e._sparkdl_no_retry = True  # read by the launcher: fail at once instead of relaunching
            raise

    # ----- setup -----
    def _build(self) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        from sparkdl.data import LoaderConfig, TableLoader
        from sparkdl.models import build_model

        cfg, setup, device = self.cfg, self.setup, self.device
        if cfg.deterministic:  # run_rank restores the process-wide flag when the task ends
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        _seed(cfg.seed)
        model = build_model(cfg.model, features=setup.features, **setup.model_kwargs).to(device)
        if cfg.sync_batchnorm:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        # DDP has broadcast rank 0's initial weights; from here each rank draws its own dropout masks.
        _seed(cfg.seed + self.rank)
        self.hook_state = register_comm_hook(self.ddp, cfg)
        self.opt = build_optimizer(cfg, self.ddp.parameters())
        self.task = setup.make_task()
        columns = setup.loader_columns
        self.ids_column = setup.log_row_ids
        if self.ids_column:
            columns.append(self.ids_column)
        pin = device.type == "cuda"
        self.train = TableLoader(
            setup.train_uri, version=setup.train_version, rank=self.rank, world_size=self.world,
            config=LoaderConfig(batch_size=cfg.batch_size, columns=columns, shuffle=cfg.shuffle, seed=cfg.seed,
                                shuffle_buffer_rows=cfg.shuffle_buffer_rows, pin_memory=pin))
        if setup.valid_uri:
            self.valid = TableLoader(
                setup.valid_uri, version=setup.valid_version, rank=self.rank, world_size=self.world,
                config=LoaderConfig(batch_size=max(cfg.batch_size, 1024), columns=columns, shuffle=False,
                                    drop_last=False, remainder="pad", pin_memory=pin))
        self.steps_per_epoch = len(self.train) // cfg.accumulation_steps
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"each rank gets {len(self.train)} batches per epoch, fewer than accumulation_steps="
                f"{cfg.accumulation_steps}: lower accumulation_steps, batch_size or num_ranks")
        epochs_total = self.steps_per_epoch * cfg.epochs
        self.total = epochs_total if cfg.max_steps is None else min(cfg.max_steps, epochs_total)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_factor(cfg, self.total))
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        self.step, self.start_epoch, self.history = 0, 0, []
        self.epoch_loss = [0.0, 0]  # sum and count of the logged step losses of the current epoch
        self.last_ckpt = latest_checkpoint(self.run_dir)
        if self.last_ckpt is not None:
            self._restore(load_checkpoint(self.last_ckpt))
        self.log = StepLog(self.run_dir, self.step) if self.rank == 0 else None
        self.samples = 0
        self.rate = _Rate()

    def _restore(self, state: dict[str, Any]) -> None:
        if len(state["loaders"]) != self.world:
            raise ValueError(f"checkpoint {self.last_ckpt} was written by {len(state['loaders'])} ranks, this run "
                             f"has {self.world}; resume with num_ranks={len(state['loaders'])}")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.train.load_state_dict(state["loaders"][self.rank])
        rng = state["rng"][self.rank]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng.get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        load_hook_state(self.hook_state, (state.get("comm_hook") or [None] * self.world)[self.rank], self.device)
        self.step, self.start_epoch, self.history = state["step"], state["epoch"], state["history"]
        self.epoch_loss = list(state.get("epoch_loss", [0.0, 0]))

    def close(self) -> None:
        for loader in (self.train, self.valid):
            if loader is not None:
                loader.close()

    # ----- the run -----
    def run(self) -> dict[str, Any]:
        try:
            self._epochs()
        except _NonFinite as bad:
            # Every rank saw the all-reduced flag and returns normally, so the launcher does not
            # relaunch a run that would only diverge again; fit() raises NonFiniteLossError.
            if self.log is not None:
                self.log.flush()  # the curves show the blow-up
            return {"nonfinite": {"step": bad.step, "what": bad.what, "value": bad.value,
                                  "checkpoint": self.last_ckpt}}
        if self.rank != 0:
            return {}
        return {"state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "history": self.history, "steps": self.step, "metrics": self.history[-1] if self.history else {},
                "checkpoint": self.last_ckpt, "train_version": self.train.version,
                "valid_version": self.valid.version if self.valid else None}

    def _epochs(self) -> None:
        cfg = self.cfg
        for epoch in range(self.start_epoch, cfg.epochs):
            if self.step >= self.total:
                break
            self.train.set_epoch(epoch)
            self._epoch(epoch)
            state = self.train.state_dict()
            complete = state["epoch"] > epoch or state["position"] >= self.steps_per_epoch * cfg.accumulation_steps
            row: dict[str, Any] = {"epoch": epoch + 1, "step": self.step}
            if self.epoch_loss[1]:
                row["train_loss"] = self.epoch_loss[0] / self.epoch_loss[1]
            if not complete:  # max_steps stopped it: a resume with more steps finishes this epoch
                row["partial"] = True
            if self.valid is not None:
                row.update(validate(self.model, self.valid, self.label, self.task, self.device,
                                    weight=self.setup.weight_column))
            self.history = [h for h in self.history if h["epoch"] != epoch + 1] + [row]
            self._checkpoint(epoch + 1 if complete else epoch)
            if complete:
                self.epoch_loss = [0.0, 0]
            if self.rank == 0:
                self.ctx.report({"kind": "epoch", **row})

    def _epoch(self, epoch: int) -> None:
        cfg, device = self.cfg, self.device
        accum = cfg.accumulation_steps
        micro = 0
        # [nan seen, inf seen, loss sum] over the step's micro-batches; checked once per optimizer
        # step, in the one small all-reduce that follows the gradients' own.
        loss_stat = torch.zeros(3, dtype=torch.float64, device=device)
        # Micro-batches left over from the previous epoch must not leak into this step.
        self.opt.zero_grad(set_to_none=True)
        for batch in self.train:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            if self.ids_column:
                self._log_ids(epoch, batch[self.ids_column])
            micro += 1
            sync = micro % accum == 0
            with nullcontext() if sync else self.ddp.no_sync():
                with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    loss = self.task.loss(self.ddp(batch), batch[self.label], batch.get(self.setup.weight_column)) / accum
                if self._fault("nan"):
                    loss = loss * float("nan")
                loss_stat += _finite_stat(loss.detach())
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            self.samples += len(batch[self.label])
            if not sync:
                continue
            loss, lr = self._optimizer_step(loss_stat)
            self._after_step(epoch, loss, lr)
            loss_stat.zero_()
            if self.step % cfg.checkpoint_every == 0:
                self._checkpoint(epoch)
            if self.step >= self.total:
                break

    def _optimizer_step(self, loss_stat: torch.Tensor) -> tuple[float, float]:
        """Check, then apply, the step whose micro-batch losses ``loss_stat`` sums; return
        (loss averaged over ranks, learning rate of the step).

        One small all-reduce carries the loss and gradient-norm finiteness of every rank, so all
        ranks stop at the same step, before it is applied, and none waits on a collective per
        micro-batch."""
        cfg, opt = self.cfg, self.opt
        if self.scaler:
            self.scaler.unscale_(opt)
        params = [p for p in self.ddp.parameters() if p.grad is not None]
        if self._fault("inf_grad") and params:
            params[0].grad.fill_(float("inf"))
        norm = None
        if cfg.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        # With a scaler, inf/NaN gradients are expected now and then: it skips those steps and
        # lowers its scale, so only the loss is checked. Without one, a finite loss can still give
        # inf/NaN gradients; stepping on them would write non-finite weights into the next
        # checkpoint, the one the error calls "good".
        check_grads = self.scaler is None
        if check_grads and norm is None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        grad_stat = _finite_stat(norm.detach().to(self.device)) if check_grads else torch.zeros_like(loss_stat)
        stat = torch.cat([loss_stat, grad_stat])
        dist.all_reduce(stat)
        flags = stat.tolist()
        if flags[0] + flags[1] > 0:
            raise _NonFinite(self.step + 1, "loss", float("nan") if flags[0] > 0 else float("inf"))
        if flags[3] + flags[4] > 0:
            raise _NonFinite(self.step + 1, "gradient norm", float("nan") if flags[3] > 0 else float("inf"))
        if self.scaler:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        lr = self.sched.get_last_lr()[0]
        opt.zero_grad(set_to_none=True)
        self.sched.step()
        self.step += 1
        return flags[2] / self.world, lr

    def _after_step(self, epoch: int, loss: float, lr: float) -> None:
        self.epoch_loss[0] += loss
        self.epoch_loss[1] += 1
        if self.rank != 0:
            return
        row = {"epoch": epoch + 1, "step": self.step, "loss": loss, "lr": lr,
               "samples_per_s": self.rate(self.samples * self.world), "time": time.time()}
        self.log.add(row)
        self.ctx.report({"kind": "step", "epochs": self.cfg.epochs, "total_steps": self.total, **row})

    def _checkpoint(self, epoch: int) -> None:
        """Checkpoint (every rank takes part); ``epoch`` is where a resume starts."""
        finite = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()
        bad = (~finite).double().reshape(1)
        dist.all_reduce(bad)
        if bad.item() > 0:
            raise _NonFinite(self.step, "a parameter", float("nan"))
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
               "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        mine = {"loader": self.train.state_dict(), "rng": rng, "comm_hook": hook_state_dict(self.hook_state)}
        gathered: list[Any] | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        if self.rank != 0:
            self.last_ckpt = checkpoint_uri(self.run_dir, self.step)
            return
        self.log.flush()  # before the checkpoint: a resume from it finds every row up to it
        self.last_ckpt = save_checkpoint(self.run_dir, self.step, {
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
            "loaders": [g["loader"] for g in gathered], "rng": [g["rng"] for g in gathered],
            "comm_hook": [g["comm_hook"] for g in gathered], "step": self.step, "epoch": epoch,
            "history": self.history, "epoch_loss": self.epoch_loss})

    # ----- test hooks -----
    def _fault(self, kind: str) -> bool:
        """Fault injection (tests): fires on the configured rank, attempt and 1-based step."""
        fi = self.cfg.fault_injection
        if not fi or fi.get("rank", 0) != self.rank or fi["step"] != self.step + 1 \
                or fi.get("attempt", 0) != self.ctx.attempt:
            return False
        if fi["kind"] == "exit":
            import os

            os._exit(17)
        if fi["kind"] == "raise":
            raise RuntimeError(f"injected fault at step {self.step + 1}")
        return fi["kind"] == kind

    def _log_ids(self, epoch: int, ids: torch.Tensor) -> None:
        """Test/debug option: which rows each step consumed, per attempt (local run folders only)."""
        with open(f"{self.setup.run_dir_local}/rows-rank{self.rank}.jsonl", "a") as f:
            f.write(json.dumps({"attempt": self.ctx.attempt, "epoch": epoch, "step": self.step,
                                "ids": ids.tolist()}) + "\n")
