"""Domain errors raised by sparkdl, exported at the package root.

Bad arguments raise ``ValueError`` and a bad environment ``RuntimeError``; the classes
here cover failures of the data or of a distributed run that a caller may want to catch.
"""

from __future__ import annotations

__all__ = [
    "SparkDLError",
    "SchemaMismatchError",
    "TableNotFoundError",
    "TableVersionError",
    "CommitConflictError",
    "WriteAbortedError",
    "LoaderError",
    "ImageDecodeError",
    "EmptyTableError",
    "ClusterCapacityError",
    "RankFailedError",
    "NonFiniteLossError",
    "NonFiniteGradientError",
    "ModelNotFoundError",
    "MissingColumnsError",
]


class SparkDLError(Exception):
    """Base class of every sparkdl domain error."""


class SchemaMismatchError(SparkDLError, ValueError):
    """A DataFrame or table does not match its declared dataset schema."""

    def __init__(self, dataset: str, problems: list[str]) -> None:
        self.dataset = dataset
        self.problems = problems
        super().__init__(f"schema {dataset!r} does not match the data: " + "; ".join(problems))


class TableNotFoundError(SparkDLError, FileNotFoundError):
    """No Delta table exists at the given URI."""


class TableVersionError(SparkDLError, ValueError):
    """The requested version of a Delta table does not exist."""


class CommitConflictError(SparkDLError):
    """A concurrent writer committed first in a way that conflicts with this write.

    The staged files of the losing write are removed; the table keeps the winner's version.
    """


class WriteAbortedError(SparkDLError):
    """A write failed before its commit; the table is left at its previous version."""


class LoaderError(SparkDLError):
    """The streaming loader cannot read or decode its input."""


class EmptyTableError(LoaderError, ValueError):
    """The table (after filters) holds no rows to load."""


class ImageDecodeError(LoaderError):
    """An encoded image could not be decoded; names the file and row."""


class ClusterCapacityError(SparkDLError, RuntimeError):
    """The cluster cannot run the requested number of barrier tasks at once."""


class RankFailedError(SparkDLError):
    """A training rank raised; carries the rank, the exception text and its traceback."""

    def __init__(self, rank: int, error: str, traceback: str, attempt: int | None = None) -> None:
        self.rank = rank
        self.error = error
        self.traceback = traceback
        self.attempt = attempt
        where = f"rank {rank}" + (f" (attempt {attempt})" if attempt is not None else "")
        super().__init__(f"{where} failed: {error}\n--- traceback of {where} ---\n{traceback}")


class NonFiniteLossError(SparkDLError, FloatingPointError):
    """The training loss became NaN or infinite."""

    def __init__(self, step: int, loss: float, checkpoint: str | None) -> None:
        self.step = step
        self.loss = loss
        self.checkpoint = checkpoint
        kept = f"; the last good checkpoint is kept at {checkpoint}" if checkpoint else ""
        super().__init__(
            f"loss became {loss} at step {step}; lower the learning rate, enable gradient "
            f"clipping (--grad-clip) or check the input for NaN features{kept}"
        )


class NonFiniteGradientError(NonFiniteLossError):
    """The loss was finite but the gradients (or the updated parameters) were not."""

    def __init__(self, step: int, what: str, value: float, checkpoint: str | None) -> None:
        self.step = step
        self.what = what
        self.loss = value
        self.checkpoint = checkpoint
        kept = f"; the last good checkpoint is kept at {checkpoint}" if checkpoint else ""
        SparkDLError.__init__(
            self,
            f"{what} became {value} at step {step} while the loss was finite. "
            f"Lower the learning rate, enable gradient clipping (--grad-clip) or check the model for "
            f"overflowing layers{kept}",
        )


class ModelNotFoundError(SparkDLError, FileNotFoundError):
    """No published model (or model version) exists under the given name."""


class MissingColumnsError(SparkDLError, ValueError):
    """Input data lacks columns that a model or schema needs."""

    def __init__(self, what: str, missing: list[str], available: list[str]) -> None:
        self.missing = missing
        self.available = available
        super().__init__(
            f"{what} needs columns {missing} that the input lacks; available columns: {available}"
        )
