"""What the driver hands every rank: a typed, picklable record resolved before launch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["RankSetup"]


@dataclass(kw_only=True)
class RankSetup:
    """Everything a rank needs beyond ``TrainConfig``, resolved once on the driver (tables to
    versions, columns by role, the model's arguments), so every rank and every attempt sees the same."""

    train_uri: str
    """Training table URI."""
    train_version: int
    """Resolved training table version."""
    valid_uri: str | None = None
    """Validation table URI; None = no validation."""
    valid_version: int | None = None
    """Resolved validation table version."""
    feature_columns: list[str]
    """Columns the loader reads and the model receives."""
    label_column: str
    """The label column."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Arguments of the model factory (JSON-compatible)."""
    task: str = "binary"
    """The model's task."""
    input_codecs: dict[str, str] = field(default_factory=dict)
    """Declared codecs of the feature columns (recorded with the published model)."""
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    """Declared tensor shapes of the feature columns."""
    run_dir: str = ""
    """The run folder (a local path or a URI)."""
    run_dir_local: str | None = None
    """The run folder as a local path, when it is one."""
    log_row_ids: str | None = None
    """Test/debug: a column whose values each rank logs per step to the run folder."""
