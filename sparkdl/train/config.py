"""TrainConfig: everything a training run needs, as plain data (CLI and Python alike)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainConfig"]

OPTIMIZERS = ("sgd", "adagrad", "adam", "adamw")
COMPRESSION = ("none", "fp16", "bf16", "powersgd")
PRECISION = ("fp32", "bf16", "fp16")
SCHEDULES = ("constant", "cosine", "linear")


@dataclass(kw_only=True)
class TrainConfig:
    """A training run."""

    lakehouse: str = "lakehouse"
    """Lakehouse root: tables are read from, runs and models written under it."""
    train_table: str
    """Training table: a name under <lakehouse>/tables or a Delta URI."""
    valid_table: str | None = None
    """Validation table (name or URI); None skips validation."""
    train_version: int | None = None
    """Version of the training table; None = latest (the resolved one is recorded in lineage)."""
    valid_version: int | None = None
    """Version of the validation table; None = latest."""
    model: str = "flights_mlp"
    """Registered model name or 'module:factory'."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Factory arguments; for flights_mlp, features and cardinalities come from the table's spec."""
    label_column: str | None = None
    """Label column; None = the table's role=label column."""
    feature_columns: list[str] | None = None
    """Columns fed to the model; None = the table's role=feature columns."""
    batch_size: int = 256
    """Per-rank batch size (global batch = batch_size x num_ranks x accumulation_steps)."""
    epochs: int = 1
    """Passes over the training table."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (for smoke runs)."""
    optimizer: str = "adamw"
    """sgd, adagrad, adam or adamw."""
    lr: float = 1e-3
    """Peak learning rate."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 0.0
    """Weight decay."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    lr_schedule: str = "constant"
    """After warm-up: constant, cosine or linear decay to 0 at the last step."""
    grad_clip: float | None = None
    """Clip the global gradient norm to this value."""
    accumulation_steps: int = 1
    """Micro-batches per optimizer step; gradients are not all-reduced on the micro-steps (no_sync)."""
    compression: str = "none"
    """Gradient compression on the all-reduce: none, fp16, bf16 or powersgd (DDP communication hooks)."""
    sync_batchnorm: bool = False
    """Convert BatchNorm layers to SyncBatchNorm."""
    precision: str = "fp32"
    """fp32, bf16 (autocast) or fp16 (autocast + gradient scaler; GPU only)."""
    num_ranks: int = 2
    """Training ranks."""
    local_mode: bool = False
    """Ranks as processes on this machine instead of Spark barrier tasks."""
    use_gpu: bool = False
    """NCCL on the executors' GPUs."""
    checkpoint_every: int = 200
    """Checkpoint every K optimizer steps (and at each epoch end)."""
    max_attempts: int = 2
    """Stage attempts: after a rank or executor dies, training resumes from the last checkpoint."""
    seed: int = 0
    """Seed of the model init, the loader's shuffles and dropout."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms: resumed runs end with bit-identical parameters."""
    shuffle_buffer_rows: int = 65_536
    """Loader shuffle window in rows."""
    run_id: str | None = None
    """Run folder name under <lakehouse>/runs; None = a new id."""
    resume: bool = False
    """Continue run_id from its last checkpoint."""
    model_name: str | None = None
    """Publish the model under this name; None = do not publish."""
    fault_injection: dict[str, Any] | None = None
    """Test hook: {"rank": r, "step": s, "attempt": a, "kind": "exit"|"raise"|"nan"}."""

    def __post_init__(self) -> None:
        def bad(name: str, fix: str) -> ValueError:
            return ValueError(f"{name}={getattr(self, name)!r} is invalid: {fix}")

        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"use one of {list(OPTIMIZERS)}")
        if self.compression not in COMPRESSION:
            raise bad("compression", f"use one of {list(COMPRESSION)}")
        if self.precision not in PRECISION:
            raise bad("precision", f"use one of {list(PRECISION)}")
        if self.lr_schedule not in SCHEDULES:
            raise bad("lr_schedule", f"use one of {list(SCHEDULES)}")
        if self.precision == "fp16" and not self.use_gpu:
            raise bad("precision", "fp16 autocast needs a GPU (use_gpu=True); use bf16 on CPU")
        if self.compression == "bf16" and not self.use_gpu:
            raise bad("compression", "bf16 gradient compression needs NCCL (use_gpu=True); use fp16 or powersgd on CPU")
        if self.sync_batchnorm and not self.use_gpu:
            raise bad("sync_batchnorm", "SyncBatchNorm runs on GPU modules only; set use_gpu=True or turn it off")
        for name in ("batch_size", "epochs", "num_ranks", "accumulation_steps", "checkpoint_every", "max_attempts"):
            if getattr(self, name) < 1:
                raise bad(name, "must be at least 1")
        if self.lr <= 0:
            raise bad("lr", "must be positive, e.g. 1e-3")
        if self.resume and not self.run_id:
            raise bad("resume", "resume needs run_id (the run to continue)")
        if self.run_id is None:
            self.run_id = "run-" + uuid.uuid4().hex[:10]
