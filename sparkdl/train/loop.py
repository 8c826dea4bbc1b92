"""The per-rank training function: loader -> strategy step -> checkpoints -> validation.

Runs inside a rank started by ``run_distributed``. How ranks share the model (DDP all-reduce,
local SGD, a parameter server, ...) is the ``Strategy``'s business (sparkdl/train/strategies);
mixed precision is ``Precision``'s and the NaN/inf stop is ``NonFiniteGuard``'s. Rank 0 writes
checkpoints and the per-step metrics (through ``sparkdl._fs``) and reports progress to the
driver over the launcher's channel. Collectives run on ``device`` tensors (gloo and NCCL alike).
"""

from __future__ import annotations

import json
import random
import time
from collections import deque
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from sparkdl import _fs
from sparkdl.errors import NonRetryableError
from sparkdl.train.checkpoint import (capture_rng, checkpoint_uri, latest_checkpoint, load_checkpoint, restore_rng,
                                      save_checkpoint)
from sparkdl.train.config import TrainConfig
from sparkdl.train.context import rank_context
from sparkdl.train.handoff import RankSetup
from sparkdl.train.metrics import StepLog, validate
from sparkdl.train.nonfinite import NonFinite, NonFiniteGuard
from sparkdl.train.elastic import check_resizable, resize_settings
from sparkdl.train.optim import lr_factor_samples
from sparkdl.train.precision import Precision
from sparkdl.train.strategies import build_strategy

__all__ = ["train_rank"]

# Setup errors a relaunch would only repeat (bad config, model or checkpoint): not retried.
_DETERMINISTIC = (ValueError, TypeError, LookupError, ImportError, AttributeError, NotImplementedError)
# Checkpoint keys the loop writes itself; a strategy's per-rank keys must not collide with them.
_LOOP_KEYS = {"model", "optimizer", "scheduler", "scaler", "loaders", "rng", "step", "epoch", "history",
              "epoch_loss", "strategy", "elastic"}


def _sharded_uri(checkpoint: str) -> str:
    """Folder of a sharded strategy's model and optimizer shards, next to the checkpoint file."""
    return checkpoint[:-len(".pt")] + ".shards"


def train_rank(cfg: TrainConfig, setup: RankSetup) -> dict[str, Any]:
    """One rank's training run; rank 0 returns the final state dict, history and metrics
    (or ``{"nonfinite": ...}`` when the loss, the gradients or the parameters stopped being finite)."""
    run = _RankRun(cfg, setup)
    ok = False
    try:
        out = run.run()
        ok = True
        return out
    finally:
        run.close(ok)


class _Rate:
    """Samples/s over the last few steps (not since start-up, which includes loading)."""

    def __init__(self, window: int = 20) -> None:
        self._points: deque[tuple[float, int]] = deque(maxlen=window + 1)

    def __call__(self, samples: int) -> float:
        self._points.append((time.perf_counter(), samples))
        (t0, s0), (t1, s1) = self._points[0], self._points[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0




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
        self.train = self.valid = self.strategy = None
        try:
            self._build()
        except _DETERMINISTIC as e:  # the launcher fails at once instead of relaunching
            raise NonRetryableError(str(e)) from e

    # ----- setup -----
    def _build(self) -> None:
        from sparkdl.data import LoaderConfig, TableLoader
        from sparkdl.models import build_model

        setup, device = self.setup, self.device
        # The checkpoint comes first: the run's first world size (in it) and this one fix the lr
        # and accumulation of the resize policy, which everything below is built with.
        self.last_ckpt = latest_checkpoint(self.run_dir)
        saved = load_checkpoint(self.last_ckpt) if self.last_ckpt is not None else None
        elastic = (saved or {}).get("elastic") or {}
        self.base_ranks = int(elastic.get("base_ranks", len(saved["loaders"]) if saved else self.cfg.num_ranks))
        self.resize = resize_settings(self.cfg, base_ranks=self.base_ranks, world=self.world)
        if (self.resize.lr, self.resize.accumulation_steps) != (self.cfg.lr, self.cfg.accumulation_steps):
            self.cfg = replace(self.cfg, lr=self.resize.lr, accumulation_steps=self.resize.accumulation_steps)
        cfg = self.cfg
        if cfg.deterministic:  # run_rank restores the process-wide flag when the task ends
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        _seed(cfg.seed)
        self.strategy = build_strategy(cfg, device=device)
        model = self.strategy.create_model(
            lambda: build_model(cfg.model, features=setup.features, **setup.model_kwargs))
        if cfg.sync_batchnorm:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.strategy.example_batch = self._example_batch
        self.net = self.strategy.wrap(model)  # every replica starts from rank 0's weights
        # From here each rank draws its own dropout masks.
        _seed(cfg.seed + self.rank)
        self.opt = self.strategy.build_optimizer(self.net.parameters())
        self.precision = Precision(cfg.precision, device)
        self.guard = NonFiniteGuard(device, check_grads=not self.precision.skips_nonfinite_steps)
        self.task = setup.make_task()
        columns = setup.loader_columns
        self.ids_column = setup.log_row_ids
        if self.ids_column:
            columns.append(self.ids_column)
        train_columns = columns + [c for c in self.strategy.extra_columns() if c not in columns]
        pin = device.type == "cuda"
        dp_rank, dp_world = self.strategy.data_parallel
        self.train = TableLoader(
            setup.train_uri, version=setup.train_version, rank=dp_rank, world_size=dp_world,
            config=LoaderConfig(batch_size=cfg.batch_size, columns=train_columns, shuffle=cfg.shuffle,
                                seed=cfg.seed,
                                shuffle_buffer_rows=cfg.shuffle_buffer_rows, pin_memory=pin,
                                # Strategies that run rounds place the rows themselves (their batches
                                # are per client): this loader must not refuse a table smaller than a batch.
                                drop_last=not self.strategy.runs_rounds))
        if setup.valid_uri:
            self.valid = TableLoader(
                setup.valid_uri, version=setup.valid_version, rank=self.rank, world_size=self.world,
                config=LoaderConfig(batch_size=max(cfg.batch_size, 1024), columns=columns, shuffle=False,
                                    drop_last=False, remainder="pad", pin_memory=pin))
        self.strategy.prepare(loader=self.train, open_table=lambda config: TableLoader(
            setup.train_uri, version=setup.train_version, config=config))
        self.steps_per_epoch = self.strategy.steps_per_epoch(len(self.train))
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"each rank gets {len(self.train)} batches per epoch, fewer than accumulation_steps="
                f"{cfg.accumulation_steps}: lower accumulation_steps, batch_size or num_ranks")
        epochs_total = self.steps_per_epoch * cfg.epochs
        self.total = epochs_total if cfg.max_steps is None else min(cfg.max_steps, epochs_total)
        # The lr schedule runs on global samples (docs/elastic.md): it stays put when a resize
        # changes the global batch.
        self.global_batch = cfg.batch_size * cfg.accumulation_steps * self.strategy.data_parallel[1]
        self.global_samples = 0
        self.schedule_samples = int(elastic.get("schedule_samples", self.total * self.global_batch))
        first_batch = int(elastic.get("schedule_batch", self.global_batch))
        factor = lr_factor_samples(cfg, total_samples=self.schedule_samples, schedule_batch=first_batch)
        self.schedule_batch = first_batch
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda _step: factor(self.global_samples, self.global_batch))
        self.strategy.set_total_steps(self.total)
        self.step, self.start_epoch, self.history = 0, 0, []
        self.resizes: list[dict[str, Any]] = list(elastic.get("resizes", []))
        self.epoch_loss = [0.0, 0]  # sum and count of the logged step losses of the current epoch
        if saved is not None:
            self._restore(saved)
        self.log = StepLog(self.run_dir, self.step) if self.rank == 0 else None
        self.samples = 0
        self.rate = _Rate()

    def _example_batch(self, rows: int) -> dict[str, torch.Tensor]:
        """The first ``rows`` training rows' features, on the device (for strategies that trace the model)."""
        from sparkdl.data import LoaderConfig, TableLoader

        setup = self.setup
        with TableLoader(setup.train_uri, version=setup.train_version,
                         config=LoaderConfig(batch_size=rows, columns=list(setup.feature_columns), shuffle=False,
                                             drop_last=False, prefetch_batches=1)) as loader:
            return {k: v.to(self.device) for k, v in next(iter(loader)).items()}

    def _restore(self, state: dict[str, Any]) -> None:
        from sparkdl.data import TableLoader

        saved_world = len(state["loaders"])
        saved = (state.get("strategy") or {}).get("describe", {"name": "allreduce"})
        if saved.get("name") != self.strategy.name:
            raise ValueError(f"checkpoint {self.last_ckpt} was written with strategy={saved.get('name')!r}, this "
                             f"run has strategy={self.strategy.name!r}; resume with strategy={saved.get('name')!r}")
        resized = saved_world != self.world
        check_resizable(self.cfg, self.strategy.name, saved_ranks=saved_world, world=self.world)
        if self.strategy.shards_model:
            self.strategy.load_model_state(_sharded_uri(self.last_ckpt), self.opt)
        else:
            self.model.load_state_dict(state["model"])
            optimizers = state["optimizer"]
            # Replicas that diverge each saved their optimizer: new rank r takes saved rank r mod N's.
            self.opt.load_state_dict(optimizers[self.rank % len(optimizers)])
        self.sched.load_state_dict(state["scheduler"])
        self.precision.load_state_dict(state.get("scaler"))
        # Any rank's loader state describes the whole world's position; merging checks they agree.
        loaders = state["loaders"]
        self.train.load_state_dict(TableLoader.merge_states(loaders) if resized else loaders[self.rank])
        keys = (state.get("strategy") or {}).get("keys", ["comm_hook"])
        if not resized:
            restore_rng(state["rng"][self.rank], self.device)
            self.strategy.load_state_dict({k: state[k][self.rank] for k in keys if k in state})
        else:
            self._remap_strategy_state(state, keys)
        self.step, self.start_epoch, self.history = state["step"], state["epoch"], state["history"]
        self.epoch_loss = list(state.get("epoch_loss", [0.0, 0]))
        elastic = state.get("elastic") or {}
        self.global_samples = int(elastic.get("global_samples", self.step * self.global_batch))
        if resized:
            # A fresh stream per (seed, rank, step): a resized run is reproducible, and no two ranks share dropout.
            _seed(self.cfg.seed + 1_000_003 * (self.step + 1) + self.rank)
            left = self.train.batches_left // self.cfg.accumulation_steps \
                if self.train.epoch == self.start_epoch else self.steps_per_epoch
            total = self.step + left + self.steps_per_epoch * max(0, self.cfg.epochs - self.start_epoch - 1)
            self.total = total if self.cfg.max_steps is None else min(self.cfg.max_steps, total)
            self.strategy.set_total_steps(self.total)
            self.resizes.append(self.resize.record(attempt=self.ctx.attempt, step=self.step, from_ranks=saved_world))
        # The schedule's base lr is this world's (scale_lr) and the lr follows the global samples.
        self.sched.base_lrs = [self.cfg.lr for _ in self.sched.base_lrs]
        lrs = [b * self.sched.lr_lambdas[0](self.step) for b in self.sched.base_lrs]
        for group, lr in zip(self.opt.param_groups, lrs):
            group["lr"] = lr
        self.sched._last_lr = lrs

    def _remap_strategy_state(self, state: dict[str, Any], keys: list[str]) -> None:
        """Per-rank strategy state of N saved ranks onto this world (rules: sparkdl.train.elastic)."""
        name = self.strategy.name
        if name in ("local_sgd", "easgd", "bmuf"):
            # Global parts (anchor, outer optimizer, center, global model) are the same on every saved
            # rank; every replica restarts from the consensus the checkpoint holds.
            mine = {k: state[k][0] for k in keys if k in state}
            mine["replica"] = state["model"]
            self.strategy.load_state_dict(mine)
        # allreduce: PowerSGD residuals are reset; fedavg: nothing per rank (ssp/async are refused).

    def close(self, ok: bool = False) -> None:
        if self.strategy is not None:
            self.strategy.close(ok=ok)
        for loader in (self.train, self.valid):
            if loader is not None:
                loader.close()

    # ----- the run -----
    def run(self) -> dict[str, Any]:
        try:
            self._epochs()
        except NonFinite as bad:
            # Every rank saw the reduced flag and returns normally, so the launcher does not
            # relaunch a run that would only diverge again; fit() raises NonFiniteLossError.
            if self.log is not None:
                self.log.flush()  # the curves show the blow-up
            return {"nonfinite": {"step": bad.step, "what": bad.what, "value": bad.value,
                                  "checkpoint": self.last_ckpt}}
        state = weights = None
        if self.strategy.shards_model:  # the ranks write the full weights; nothing big goes to the driver
            weights = _fs.join(self.run_dir, "publish", f"model-step-{self.step:09d}.safetensors")
            self.strategy.export_weights(weights)
        else:
            with self.strategy.consensus():  # every rank takes part; rank 0 returns the agreed model
                state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        if self.rank != 0:
            return {}
        return {"state_dict": state, "weights_uri": weights, "history": self.history, "steps": self.step,
                "metrics": self.history[-1] if self.history else {}, "checkpoint": self.last_ckpt,
                "train_version": self.train.version, "valid_version": self.valid.version if self.valid else None,
                "strategy": self.strategy.describe(), "resizes": self.resizes, "world_size": self.world}

    def _epochs(self) -> None:
        cfg = self.cfg
        for epoch in range(self.start_epoch, cfg.epochs):
            if self.step >= self.total:
                break
            self.train.set_epoch(epoch)
            if self.strategy.runs_rounds:
                self._rounds(epoch)
                complete = self.step >= (epoch + 1) * self.steps_per_epoch
            else:
                self._epoch(epoch)
                state = self.train.state_dict()
                # The leg's batches, not len(): a resized epoch has fewer left than a whole one.
                complete = state["epoch"] > epoch or \
                    state["position"] >= (self.train.epoch_batches // cfg.accumulation_steps) * cfg.accumulation_steps
            row: dict[str, Any] = {"epoch": epoch + 1, "step": self.step}
            if self.epoch_loss[1]:
                row["train_loss"] = self.epoch_loss[0] / self.epoch_loss[1]
            if not complete:  # max_steps stopped it: a resume with more steps finishes this epoch
                row["partial"] = True
            if self.valid is not None:
                with self.strategy.consensus():
                    row.update(validate(self.model, self.valid, self.label, self.task, self.device,
                                        weight=self.setup.weight_column))
            self.history = [h for h in self.history if h["epoch"] != epoch + 1] + [row]
            self._checkpoint(epoch + 1 if complete else epoch)
            if complete:
                self.epoch_loss = [0.0, 0]
            if self.rank == 0:
                self.ctx.report({"kind": "epoch", **row})

    def _epoch(self, epoch: int) -> None:
        accum = self.cfg.accumulation_steps
        micro = 0
        # Micro-batches left over from the previous epoch must not leak into this step.
        self.opt.zero_grad(set_to_none=True)
        started = time.perf_counter()
        for batch in self.train:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            if self.ids_column:
                self._log_ids(epoch, batch[self.ids_column])
            micro += 1
            sync = micro % accum == 0  # gradients are exchanged on the step's last micro-batch only
            with self.strategy.backward_sync(sync):
                if self.strategy.owns_forward_backward:  # a pipeline schedule: loss on the last stage only
                    # weight_column is refused with a pipeline before launch (parallel/mesh.py)
                    loss = self.strategy.forward_backward(
                        batch, label=self.label, loss_fn=lambda out, y: self.task.loss(out, y, None),
                        precision=self.precision, scale=1 / accum)
                    self.guard.add_loss(loss if loss is not None else torch.zeros((), device=self.device))
                else:
                    loss = self._forward_loss(batch) / accum
                    if self._fault("nan"):
                        loss = loss * float("nan")
                    self.guard.add_loss(loss)
                    self.precision.backward(loss)
            self.samples += len(batch[self.label])
            if not sync:
                continue
            loss, lr = self._optimizer_step()
            self._straggle(started)
            self._after_step(epoch, loss, lr)
            if self.step % self.cfg.checkpoint_every == 0:
                self._checkpoint(epoch)
            if self.step >= self.total:
                break
            started = time.perf_counter()

    def _forward_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.precision.autocast():
            return self.task.loss(self.net(batch).float(), batch[self.label], batch.get(self.setup.weight_column))

    def _optimizer_step(self) -> tuple[float, float]:
        """Check, then apply, the step's gradients; return (loss averaged over the ranks, the step's
        learning rate). One small reduction carries the loss and gradient-norm finiteness of every
        rank, so all ranks stop at the same step, before it is applied."""
        self.precision.unscale(self.opt)
        params = [p for p in self.net.parameters() if p.grad is not None]
        if self._fault("inf_grad") and params:
            params[0].grad.fill_(float("inf"))
        norm = None
        if self.cfg.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        loss_sum, ranks = self.guard.check(self.step + 1, [p.grad for p in params], norm, self.strategy.reduce_flags)
        lr = self.sched.get_last_lr()[0]
        self.strategy.step(self.opt, self.precision, self.step)
        self.opt.zero_grad(set_to_none=True)
        self.global_samples += self.global_batch
        self.sched.step()
        self.step += 1
        return loss_sum / ranks, lr

    def _rounds(self, epoch: int) -> None:
        """Strategies that run whole rounds themselves (fedavg): one loop step is one round."""
        end = min(self.total, (epoch + 1) * self.steps_per_epoch)
        while self.step < end:
            started = time.perf_counter()
            lr = self.sched.get_last_lr()[0]
            loss_sum, ranks, samples = self.strategy.run_round(
                self.step, forward_loss=self._forward_loss, guard=self.guard, precision=self.precision)
            self.samples += samples
            self.global_samples += self.global_batch
            self.sched.step()
            self.step += 1
            self._straggle(started)
            self._after_step(epoch, loss_sum / max(ranks, 1), lr)
            if self.step % self.cfg.checkpoint_every == 0:
                self._checkpoint(epoch)

    def _after_step(self, epoch: int, loss: float, lr: float) -> None:
        self.epoch_loss[0] += loss
        self.epoch_loss[1] += 1
        if self.rank != 0:
            return
        row = {"epoch": epoch + 1, "step": self.step, "loss": loss, "lr": lr,
               "samples_per_s": self.rate(self.samples * self.strategy.data_parallel[1]), "time": time.time(),
               # This rank's cumulative samples and strategy traffic (bytes it sent), for benchmarks.
               "rank_samples": self.samples, "comm_bytes": self.strategy.bytes_sent, **self.strategy.metrics()}
        self.log.add(row)
        self.ctx.report({"kind": "step", "epochs": self.cfg.epochs, "total_steps": self.total, **row})

    def _checkpoint(self, epoch: int) -> None:
        """Checkpoint (every rank takes part); ``epoch`` is where a resume starts."""
        self.guard.check_parameters(self.step, self.model.parameters(), self.strategy.reduce)
        rng = capture_rng(self.device)
        extra = self.strategy.state_dict()
        clash = _LOOP_KEYS & set(extra)
        if clash:
            raise RuntimeError(f"strategy {self.strategy.name!r} state uses reserved checkpoint keys {sorted(clash)}")
        mine = {"loader": self.train.state_dict(), "rng": rng, "strategy": extra,
                # Replicas that drift apart between syncs need every rank's optimizer state.
                "optimizer": self.opt.state_dict() if self.strategy.replicas_diverge else None}
        model_state = None
        if self.strategy.shards_model:  # each rank writes its shards, before the file that points at them
            self.strategy.save_model_state(_sharded_uri(checkpoint_uri(self.run_dir, self.step)), self.opt)
        else:
            with self.strategy.consensus():
                model_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()} \
                    if self.rank == 0 else None
        gathered: list[Any] | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        if self.rank != 0:
            self.last_ckpt = checkpoint_uri(self.run_dir, self.step)
            return
        self.log.flush()  # before the checkpoint: a resume from it finds every row up to it
        optimizers = [g["optimizer"] for g in gathered] if self.strategy.replicas_diverge else \
            None if self.strategy.shards_model else [self.opt.state_dict()]
        self.last_ckpt = save_checkpoint(self.run_dir, self.step, {
            "model": model_state, "optimizer": optimizers,
            "scheduler": self.sched.state_dict(), "scaler": self.precision.state_dict(),
            "loaders": [g["loader"] for g in gathered], "rng": [g["rng"] for g in gathered],
            **{k: [g["strategy"][k] for g in gathered] for k in extra},
            "strategy": {"describe": self.strategy.describe(), "keys": sorted(extra)},
            "step": self.step, "epoch": epoch, "history": self.history, "epoch_loss": self.epoch_loss,
            "elastic": {"base_ranks": self.base_ranks, "global_samples": self.global_samples,
                        "schedule_samples": self.schedule_samples, "schedule_batch": self.schedule_batch,
                        "resizes": self.resizes}})

    def _straggle(self, started: float) -> None:
        """Test/benchmark hook: the configured rank sleeps so its steps take ``factor`` times as long."""
        st = self.cfg.straggler
        if st and st["rank"] == self.rank and st["factor"] > 1:
            time.sleep((time.perf_counter() - started) * (st["factor"] - 1))

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
        if fi["kind"] == "stall":  # a window for a test to take the executor away mid-epoch
            time.sleep(float(fi.get("seconds", 60)))
            return False
        if fi["kind"] == "raise":
            raise RuntimeError(f"injected fault at step {self.step + 1}")
        return fi["kind"] == kind

    def _log_ids(self, epoch: int, ids: torch.Tensor) -> None:
        """Test/debug option: which rows each step consumed, per attempt (local run folders only)."""
        with open(f"{self.setup.run_dir_local}/rows-rank{self.rank}.jsonl", "a") as f:
            f.write(json.dumps({"attempt": self.ctx.attempt, "epoch": epoch, "step": self.step,
                                "ids": ids.tolist()}) + "\n")
