"""TrainConfig: everything a training run needs, as plain data (CLI and Python alike)."""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainConfig"]

OPTIMIZERS = ("sgd", "adagrad", "adam", "adamw")
COMPRESSION = ("none", "fp16", "bf16", "powersgd")
DDP_BUCKET_VIEW_DEFAULT = True
PRECISION = ("fp32", "bf16", "fp16")
SCHEDULES = ("constant", "cosine", "linear")
FAULT_KINDS = ("exit", "raise", "nan", "inf_grad", "stall")
RESIZE_POLICIES = ("scale_lr", "keep_global_batch")
STRATEGIES = ("allreduce", "local_sgd", "easgd", "bmuf", "ssp", "async", "fedavg")
# Names that become one folder under runs/ or models/: no separators, no leading dot.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(kw_only=True)
class TrainConfig:
    """A training run."""

    lakehouse: str = "lakehouse"
    """Lakehouse root (a folder or a URI: file://, s3a://, gs://, hdfs://): tables are read from it, runs and models written under it."""
    train_table: str
    """Training table: a name under <lakehouse>/tables or a Delta URI."""
    valid_table: str | None = None
    """Validation table (name or URI); None skips validation."""
    train_version: int | None = None
    """Version of the training table; None = latest (the resolved one is recorded in lineage)."""
    valid_version: int | None = None
    """Version of the validation table; None = latest."""
    model: str
    """Registered model name (tabular_mlp, image_cnn, token_encoder, see sparkdl.models) or 'module:factory'; the factory receives features= (sparkdl.features.TableFeatures)."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Factory arguments besides features= (JSON-compatible)."""
    label_column: str | None = None
    """Label column; None = the table's role=label column."""
    feature_columns: list[str] | None = None
    """Columns fed to the model; None = the table's role=feature columns."""
    # ----- objective (sparkdl.tasks) -----
    task: str | None = None
    """binary, multiclass, multilabel or regression; None = the label column's kind, else inferred from its values."""
    num_classes: int | None = None
    """Classes of a multiclass/multilabel label; None = the label column's cardinality, else inferred from its values."""
    loss: str | None = None
    """None = the task's loss; regression: mse, huber or mae; or 'module:function' (outputs, labels) -> per-row losses."""
    weight_column: str | None = None
    """Sample-weight column (finite, >= 0) for the loss and the validation metrics; None = the table's role=weight column, if any."""
    batch_size: int = 256
    """Per-rank batch size (global batch = batch_size x num_ranks x accumulation_steps)."""
    epochs: int = 1
    """Passes over the training table."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (for smoke runs); None = all epochs."""
    shuffle: bool = True
    """Reshuffle the training rows every epoch; off = table order, each rank a contiguous range (exact comparisons)."""
    optimizer: str = "adamw"
    """sgd, adagrad, adam or adamw."""
    lr: float = 1e-3
    """Peak learning rate."""
    momentum: float = 0.9
    """SGD momentum, in [0, 1); 0 is plain SGD."""
    weight_decay: float = 0.0
    """Weight decay (>= 0)."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    lr_schedule: str = "constant"
    """After warm-up: constant, cosine or linear decay to 0 at the last step."""
    grad_clip: float | None = None
    """Clip the global gradient norm to this value (> 0); None = no clipping."""
    accumulation_steps: int = 1
    """Micro-batches per optimizer step; gradients are not all-reduced on the micro-steps (no_sync)."""
    compression: str = "none"
    """Gradient compression on the all-reduce: none, fp16, bf16 or powersgd (DDP communication hooks)."""
    ddp_bucket_cap_mb: float | None = None
    """allreduce: DDP's bucket size in MiB (a bucket is all-reduced once its gradients are ready, during the rest of backward); None = DDP's 25 MiB, the first 1 MiB."""
    ddp_bucket_view: bool = DDP_BUCKET_VIEW_DEFAULT
    """allreduce: gradients are views into DDP's buckets (gradient_as_bucket_view): no copy back into .grad after each all-reduce."""
    sync_batchnorm: bool = False
    """Convert BatchNorm layers to SyncBatchNorm."""
    precision: str = "fp32"
    """fp32, bf16 (autocast) or fp16 (autocast + gradient scaler; GPU only)."""
    num_ranks: int = 2
    """Training ranks."""
    local_mode: bool = False
    """Ranks as processes on this machine instead of Spark barrier tasks."""
    use_gpu: bool = False
    """NCCL on the executors' GPUs (local mode: cuda:<local rank>)."""
    checkpoint_every: int = 200
    """Checkpoint every K optimizer steps (and at each epoch end)."""
    max_attempts: int = 2
    """Stage attempts: after a rank or executor dies, training resumes from the last checkpoint."""
    start_timeout_s: float = 60.0
    """Seconds to wait for executors to offer num_ranks task slots on a cluster (a local master fails at once)."""
    collective_timeout_s: float = 600.0
    """Seconds a rank may go without making progress (a collective its peers wait in) before the run fails, naming it as hung; raise it for steps, checkpoints or validations slower than this."""
    seed: int = 0
    """Seed of the model init, the loader's shuffles and dropout (dropout uses seed + rank)."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms: a resumed run ends with bit-identical parameters."""
    shuffle_buffer_rows: int = 65_536
    """Loader shuffle window in rows."""
    run_id: str | None = None
    """Run folder name under <lakehouse>/runs (letters, digits, '.', '_', '-'); None = a new id."""
    resume: bool = False
    """Continue run_id from its last checkpoint."""
    model_name: str | None = None
    """Publish the model under this name (letters, digits, '.', '_', '-'); None = do not publish."""
    fault_injection: dict[str, Any] | None = None
    """Test hook: {"rank": r, "step": s, "attempt": a, "kind": "exit"|"raise"|"nan"|"inf_grad"}."""
    # ----- elastic training (docs/elastic.md) -----
    min_ranks: int | None = None
    """Fewest ranks a relaunch may run on when the cluster lost task slots; None = num_ranks (no shrinking)."""
    max_ranks: int | None = None
    """Most ranks a relaunch may grow to when more task slots appear; None = num_ranks (no growing)."""
    resize_policy: str | None = None
    """On another world size M than the run's first one N: scale_lr (keep the per-rank batch, lr x M/N) or
    keep_global_batch (accumulation_steps x N/M, which must be an integer). Needed whenever the size can change."""
    # ----- how ranks share the model (docs/strategies.md) -----
    strategy: str = "allreduce"
    """How ranks share the model: allreduce, local_sgd, easgd, bmuf, ssp, async or fedavg (docs/strategies.md)."""
    sync_every: int = 8
    """local_sgd and bmuf: local steps between two parameter averages (H); easgd: the communication period (tau)."""
    local_sgd_warmup_steps: int = 0
    """local_sgd: all-reduce steps before ranks start stepping alone (post-local SGD)."""
    outer_lr: float | None = None
    """local_sgd: learning rate of an outer Nesterov SGD on the averaged delta (DiLoCo, e.g. 0.7); None = plain averaging."""
    outer_momentum: float = 0.9
    """local_sgd: momentum of the outer Nesterov optimizer, in [0, 1)."""
    easgd_alpha: float = 0.1
    """easgd: moving rate alpha in (0, 1/num_ranks]: how hard replicas and the center pull on each other."""
    bmuf_block_momentum: float = 0.5
    """bmuf: block momentum eta in [0, 1)."""
    bmuf_block_lr: float = 1.0
    """bmuf: block learning rate zeta (> 0)."""
    bmuf_nesterov: bool = True
    """bmuf: restart each block from the global model plus eta x block momentum (Nesterov-style)."""
    staleness: int = 2
    """ssp: the fastest worker runs at most this many clocks (steps) ahead of the slowest; 0 = bulk-synchronous."""
    ps_timeout_s: float = 300.0
    """ssp and async: seconds a worker waits for a server shard before the stage fails (and resumes)."""
    fedavg_client_column: str | None = None
    """fedavg: column whose value names a row's client (non-IID by design); required with strategy='fedavg'."""
    fedavg_clients_per_round: int | None = None
    """fedavg: clients sampled per round (seeded); None = every client every round."""
    fedavg_local_epochs: int = 1
    """fedavg: passes each sampled client makes over its rows per round (E)."""
    fedavg_local_lr: float | None = None
    """fedavg: clients' SGD learning rate; None = lr."""
    dp_clip: float | None = None
    """fedavg: clip each client's update to this L2 norm and add Gaussian noise (client-level DP); None = off."""
    dp_noise_multiplier: float = 1.0
    """fedavg with dp_clip: noise standard deviation as a multiple of dp_clip (> 0)."""
    dp_delta: float = 1e-5
    """fedavg with dp_clip: the delta of the reported (epsilon, delta), in (0, 1)."""
    straggler: dict[str, Any] | None = None
    """Test/benchmark hook: {"rank": r, "factor": f} makes rank r's steps take f times as long (it sleeps)."""
    # ----- models bigger than one rank (docs/parallelism.md) -----
    parallelism: str = "data"
    """data (each rank a whole model, kept in sync by the strategy), fsdp (sharded: FSDP2) or pipeline (stages)."""
    data_parallel_size: int | None = None
    """fsdp: replicas of the sharded model (HSDP mesh data_parallel_size x num_ranks/data_parallel_size); None = 1.
    pipeline: must be num_ranks / stages (None works it out)."""
    fsdp_wrap: list[str] | None = None
    """fsdp: module class names sharded as one unit each (e.g. ["TransformerEncoderLayer"]); None = by size (fsdp_min_params)."""
    fsdp_min_params: int = 1_000_000
    """fsdp without fsdp_wrap: the smallest submodules holding at least this many parameters become units."""
    fsdp_offload: bool = False
    """fsdp: keep sharded parameters, gradients and optimizer state in CPU memory (the optimizer steps on the CPU)."""
    fsdp_meta_init: bool = False
    """fsdp: build the model on the meta device and initialise each rank's shard (reset_parameters), so the
    full model never exists on one rank; weights then differ from a plain init with the same seed."""
    pipeline_split: list[str] | None = None
    """pipeline: module names where stages 2, 3, ... begin, in forward order (e.g. ["encoder.layers.2"])."""
    pipeline_schedule: str = "gpipe"
    """pipeline: gpipe (all forwards, then all backwards) or 1f1b (less activation memory)."""
    microbatches: int = 4
    """pipeline: micro-batches per batch (they must divide batch_size)."""

    def __post_init__(self) -> None:
        def bad(name: str, fix: str) -> ValueError:
            return ValueError(f"{name}={getattr(self, name)!r} is invalid: {fix}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("lakehouse", "train_table", "model"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise bad(name, "must be a non-empty string")
        for name, options in (("optimizer", OPTIMIZERS), ("compression", COMPRESSION), ("precision", PRECISION),
                              ("lr_schedule", SCHEDULES)):
            if getattr(self, name) not in options:
                raise bad(name, f"use one of {list(options)}")
        if self.precision == "fp16" and not self.use_gpu:
            raise bad("precision", "fp16 autocast needs a GPU (use_gpu=True); use bf16 on CPU")
        if self.compression == "bf16" and not self.use_gpu:
            raise bad("compression", "bf16 gradient compression needs NCCL (use_gpu=True); use fp16 or powersgd on CPU")
        if self.sync_batchnorm and not self.use_gpu:
            raise bad("sync_batchnorm", "SyncBatchNorm runs on GPU modules only; set use_gpu=True or turn it off")
        for name in ("batch_size", "epochs", "num_ranks", "accumulation_steps", "checkpoint_every", "max_attempts",
                     "shuffle_buffer_rows"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "must be an integer of at least 1")
        for name in ("warmup_steps", "seed"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "must be an integer of at least 0")
        for name in ("train_version", "valid_version"):
            if getattr(self, name) is not None and (not is_int(getattr(self, name)) or getattr(self, name) < 0):
                raise bad(name, "must be a table version (an integer >= 0) or None for the latest")
        if self.max_steps is not None and (not is_int(self.max_steps) or self.max_steps < 1):
            raise bad("max_steps", "must be at least 1 (None trains all epochs)")
        if not is_num(self.lr) or self.lr <= 0:
            raise bad("lr", "must be a positive finite number, e.g. 1e-3")
        if not is_num(self.momentum) or not 0 <= self.momentum < 1:
            raise bad("momentum", "must be in [0, 1), e.g. 0.9 (0 = plain SGD)")
        if not is_num(self.weight_decay) or self.weight_decay < 0:
            raise bad("weight_decay", "must be a finite number >= 0")
        if self.grad_clip is not None and (not is_num(self.grad_clip) or self.grad_clip <= 0):
            raise bad("grad_clip", "must be a positive max norm, e.g. 1.0; None turns clipping off")
        if not is_num(self.start_timeout_s) or self.start_timeout_s < 0:
            raise bad("start_timeout_s", "must be a number of seconds >= 0")
        if not is_num(self.collective_timeout_s) or self.collective_timeout_s <= 0:
            raise bad("collective_timeout_s", "must be a number of seconds > 0, e.g. 600")
        if not isinstance(self.model_kwargs, dict):
            raise bad("model_kwargs", "must be a dict of factory arguments")
        if self.feature_columns is not None and (
                isinstance(self.feature_columns, str) or not self.feature_columns
                or not all(isinstance(c, str) for c in self.feature_columns)):
            raise bad("feature_columns", "must be a non-empty list of column names, or None for the role=feature columns")
        for name in ("run_id", "model_name"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not NAME_RE.fullmatch(value)):
                raise bad(name, "use letters, digits, '.', '_' and '-' only, starting with a letter or digit "
                                "(it names one folder in the lakehouse)")
        self._check_objective()
        if self.resume and not self.run_id:
            raise bad("resume", "resume needs run_id (the run to continue)")
        self._check_fault_injection()
        self._check_elastic()
        self._check_strategy(bad, is_int, is_num)
        from sparkdl.train.parallel.mesh import check_parallelism

        check_parallelism(self)
        if self.run_id is None:
            self.run_id = "run-" + uuid.uuid4().hex[:10]

    def _check_strategy(self, bad, is_int, is_num) -> None:
        if self.strategy not in STRATEGIES:
            raise bad("strategy", f"use one of {list(STRATEGIES)}")
        for name in ("sync_every", "fedavg_local_epochs"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "must be an integer of at least 1")
        for name in ("local_sgd_warmup_steps", "staleness"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "must be an integer of at least 0")
        for name in ("outer_lr", "fedavg_local_lr", "dp_clip"):
            if getattr(self, name) is not None and (not is_num(getattr(self, name)) or getattr(self, name) <= 0):
                raise bad(name, "must be a positive finite number, or None to turn it off")
        for name in ("outer_momentum", "bmuf_block_momentum"):
            if not is_num(getattr(self, name)) or not 0 <= getattr(self, name) < 1:
                raise bad(name, "must be in [0, 1), e.g. 0.9")
        if not is_num(self.easgd_alpha) or not 0 < self.easgd_alpha <= 1 / self.num_ranks:
            raise bad("easgd_alpha", f"must be in (0, 1/num_ranks] = (0, {1 / self.num_ranks:g}] for a stable center, "
                                     "e.g. 0.9/num_ranks")
        if not is_num(self.bmuf_block_lr) or self.bmuf_block_lr <= 0:
            raise bad("bmuf_block_lr", "must be a positive number, e.g. 1.0")
        if not is_num(self.ps_timeout_s) or self.ps_timeout_s <= 0:
            raise bad("ps_timeout_s", "must be a positive number of seconds, e.g. 300")
        if not is_num(self.dp_noise_multiplier) or self.dp_noise_multiplier <= 0:
            raise bad("dp_noise_multiplier", "must be a positive number, e.g. 1.0")
        if not is_num(self.dp_delta) or not 0 < self.dp_delta < 1:
            raise bad("dp_delta", "must be in (0, 1), e.g. 1e-5 (below 1 / number of clients)")
        if self.fedavg_clients_per_round is not None and (
                not is_int(self.fedavg_clients_per_round) or self.fedavg_clients_per_round < 1):
            raise bad("fedavg_clients_per_round", "must be an integer of at least 1, or None for every client")
        if self.strategy == "fedavg":
            if not isinstance(self.fedavg_client_column, str) or not self.fedavg_client_column:
                raise bad("fedavg_client_column", "strategy='fedavg' needs the column that names each row's client")
            if self.accumulation_steps != 1:
                raise bad("accumulation_steps", "fedavg clients step on whole batches; use accumulation_steps=1")
        elif self.dp_clip is not None:
            raise bad("dp_clip", "client-level DP is part of strategy='fedavg'; set strategy='fedavg' or dp_clip=None")
        if self.strategy != "allreduce" and self.sync_batchnorm:
            raise bad("sync_batchnorm", "SyncBatchNorm synchronizes every forward pass, which only "
                                        "strategy='allreduce' does in lockstep; turn it off")
        if self.strategy != "allreduce" and self.compression != "none":
            raise bad("compression", f"gradient compression hooks belong to strategy='allreduce', not "
                                     f"{self.strategy!r}; use compression='none'")
        cap = self.ddp_bucket_cap_mb
        if cap is not None and (not is_num(cap) or cap <= 0):
            raise bad("ddp_bucket_cap_mb", "must be a positive number of MiB, e.g. 25, or None for DDP's default")
        if not isinstance(self.ddp_bucket_view, bool):
            raise bad("ddp_bucket_view", "must be True or False")
        if self.strategy != "allreduce" and (cap is not None or self.ddp_bucket_view != DDP_BUCKET_VIEW_DEFAULT):
            name = "ddp_bucket_cap_mb" if cap is not None else "ddp_bucket_view"
            raise bad(name, f"DDP's buckets belong to strategy='allreduce', not {self.strategy!r}; leave it unset")
        if self.strategy in ("ssp", "async", "fedavg") and self.precision == "fp16":
            raise bad("precision", f"strategy={self.strategy!r} has no gradient scaler; use bf16 or fp32")
        st = self.straggler
        if st is not None and (not isinstance(st, dict) or set(st) - {"rank", "factor"}
                               or not is_int(st.get("rank")) or not 0 <= st["rank"] < self.num_ranks
                               or not is_num(st.get("factor")) or st["factor"] < 1):
            raise ValueError(f"straggler={st!r} is invalid: use {{'rank': r in 0..{self.num_ranks - 1}, "
                             "'factor': f >= 1}")

    def _check_objective(self) -> None:
        from sparkdl.tasks import REGRESSION_LOSSES, TASKS

        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"task={self.task!r} is invalid: use one of {list(TASKS)} (None = from the label column)")
        if self.num_classes is not None and (isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int)
                                             or self.num_classes < 2):
            raise ValueError(f"num_classes={self.num_classes!r} is invalid: must be an integer >= 2, or None")
        if self.loss is not None:
            custom = isinstance(self.loss, str) and ":" in self.loss
            if not custom and (self.loss not in REGRESSION_LOSSES or self.task not in (None, "regression")):
                raise ValueError(f"loss={self.loss!r} is invalid: use one of {list(REGRESSION_LOSSES)} with "
                                 "task='regression', 'module:function' for a custom loss, or None for the task's own")
        for name in ("weight_column", "label_column"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name}={value!r} is invalid: give a column name, or None")

    def _check_fault_injection(self) -> None:
        fi = self.fault_injection
        if fi is None:
            return
        fix = ('use {"rank": r, "step": s (>= 1), "attempt": a, "kind": one of '
               f"{list(FAULT_KINDS)}}}")
        if not isinstance(fi, dict) or set(fi) - {"rank", "step", "attempt", "kind", "seconds"}:
            raise ValueError(f"fault_injection={fi!r} is invalid: {fix}")
        if fi.get("kind") not in FAULT_KINDS or not isinstance(fi.get("step"), int) or fi["step"] < 1:
            raise ValueError(f"fault_injection={fi!r} is invalid: {fix}")
        if not 0 <= fi.get("rank", 0) < self.num_ranks:
            raise ValueError(f"fault_injection={fi!r} is invalid: rank must be in 0..{self.num_ranks - 1}")

    def _check_elastic(self) -> None:
        for name in ("min_ranks", "max_ranks"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name}={v!r} is invalid: must be an integer of at least 1, or None (= num_ranks)")
        lo, hi = self.min_ranks or self.num_ranks, self.max_ranks or self.num_ranks
        if not lo <= self.num_ranks <= hi:
            raise ValueError(f"min_ranks={lo}, num_ranks={self.num_ranks}, max_ranks={hi} are invalid: need "
                             "min_ranks <= num_ranks <= max_ranks (num_ranks is the starting size)")
        if self.resize_policy is not None and self.resize_policy not in RESIZE_POLICIES:
            raise ValueError(f"resize_policy={self.resize_policy!r} is invalid: use one of {list(RESIZE_POLICIES)}")
        if (lo, hi) != (self.num_ranks, self.num_ranks):
            if self.resize_policy is None:
                raise ValueError("min_ranks/max_ranks let the world size change, so the lr and "
                                 "global batch policy must be explicit: set resize_policy='scale_lr' or "
                                 "'keep_global_batch' (docs/elastic.md)")
            if self.parallelism != "data":
                raise ValueError(f"parallelism={self.parallelism!r} cannot change its world size: its sharded "
                                 "checkpoint belongs to one device mesh; leave min_ranks/max_ranks unset")
