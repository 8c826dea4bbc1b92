"""What the driver hands every rank: a typed, picklable record resolved before launch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sparkdl.features import TableFeatures
    from sparkdl.tasks import Task

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
    """The task (sparkdl.tasks): binary, multiclass, multilabel or regression."""
    num_classes: int | None = None
    """Classes of a multiclass/multilabel task."""
    loss: str | None = None
    """TrainConfig.loss: None = the task's own, a regression loss name or 'module:function'."""
    weight_column: str | None = None
    """Sample-weight column, or None."""
    features: "TableFeatures | None" = None
    """What the table knows (sparkdl.features), passed to the model factory as features=."""
    input_codecs: dict[str, str] = field(default_factory=dict)
    """Declared codecs of the feature columns (recorded with the published model)."""
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    """Declared tensor shapes of the feature columns."""
    run_dir: str = ""
    """The run folder (a local path or a URI)."""
    run_dir_local: str | None = None
    """The run folder as a local path, when it is one."""
    id_columns: list[str] = field(default_factory=list)
    """The training table's role=id columns (recorded with the published model)."""
    log_row_ids: str | None = None
    """Test/debug: a column whose values each rank logs per step to the run folder."""

    @property
    def loader_columns(self) -> list[str]:
        """Columns every loader reads: the features, the label and the weight column."""
        return list(dict.fromkeys([*self.feature_columns, self.label_column]
                                  + ([self.weight_column] if self.weight_column else [])))

    def make_task(self) -> "Task":
        from sparkdl.tasks import make_task

        return make_task(self.task, num_classes=self.num_classes, loss=self.loss)
