"""Domain errors raised by sparkdl, exported at the package root.

Bad arguments raise ``ValueError`` and a bad environment ``RuntimeError``; the classes
here cover failures of the data or of a distributed run that a caller may want to catch.
"""

from __future__ import annotations

__all__ = [
    "SparkDLError",
    "NonRetryableError",
    "DataValidationError",
    "SchemaMismatchError",
    "TableNotFoundError",
    "TableVersionError",
    "UnsupportedTableFeatureError",
    "CommitConflictError",
    "WriteAbortedError",
    "LoaderError",
    "ImageDecodeError",
    "EmptyTableError",
    "CheckpointError",
    "ClusterCapacityError",
    "RankFailedError",
    "RankHungError",
    "NonFiniteLossError",
    "NonFiniteGradientError",
    "ModelNotFoundError",
    "UntrustedModelError",
    "MissingColumnsError",
    "SpecIntegrityError",
    "NoSpecRecordedError",
    "attempt_label",
    "failure_reason",
    "is_retryable",
]


class SparkDLError(Exception):
    """Base class of every sparkdl domain error."""


class NonRetryableError(SparkDLError):
    """A failure that a relaunch would only repeat (bad data, config, model or checkpoint).

    Raised on a rank, it makes the launcher fail the run at once instead of relaunching the stage;
    jobs report it as one line."""


class DataValidationError(NonRetryableError, ValueError):
    """Input data breaks a rule the run needs (a label out of range, NaN in a feature, an
    unsupported column type); the message names the column, shows offending values and the fix."""


class SchemaMismatchError(NonRetryableError, ValueError):
    """A DataFrame or table does not match its declared dataset schema."""

    def __init__(self, dataset: str, problems: list[str]) -> None:
        self.dataset = dataset
        self.problems = problems
        super().__init__(f"schema {dataset!r} does not match the data: " + "; ".join(problems))


class TableNotFoundError(NonRetryableError, FileNotFoundError):
    """No Delta table exists at the given URI."""


class TableVersionError(NonRetryableError, ValueError):
    """The requested version of a Delta table does not exist."""


class UnsupportedTableFeatureError(NonRetryableError):
    """A Delta table uses a feature sparkdl's readers would get wrong (deletion vectors in the
    version read, column mapping, an unknown reader feature); the message names it and the fix."""


class CommitConflictError(SparkDLError):
    """A concurrent writer committed first in a way that conflicts with this write.

    The staged files of the losing write are removed; the table keeps the winner's version.
    """


class WriteAbortedError(SparkDLError):
    """A write failed before its commit; the table is left at its previous version."""


class LoaderError(NonRetryableError):
    """The streaming loader cannot read or decode its input.

    Not retried: the table version a run reads is immutable, so a relaunch reads the same
    bytes (a corrupt file, a bad value, a column that does not decode) and fails the same way."""


class EmptyTableError(LoaderError, ValueError):
    """The table (after filters) holds no rows to load."""


class ImageDecodeError(LoaderError):
    """An encoded image could not be decoded; names the file and row."""


class CheckpointError(NonRetryableError, KeyError):
    """A checkpoint cannot be used: it holds more than tensors and plain data (it would need to run
    pickled code to load, so it is refused), it is unreadable, or it lacks an entry; names the file."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ClusterCapacityError(SparkDLError, RuntimeError):
    """The cluster cannot run the requested number of barrier tasks at once."""


class RankFailedError(SparkDLError):
    """A training rank raised; carries the rank, the exception text and its traceback."""

    def __init__(self, rank: int, error: str, traceback: str, attempt: int | None = None,
                 max_attempts: int | None = None, *, retryable: bool = True) -> None:
        self.rank = rank
        self.error = error
        self.traceback = traceback
        self.attempt = attempt
        """0-based index of the launch attempt, like ``RankContext.attempt``; messages show it
        counted from 1 ("attempt 1 of 2"), as the launcher's warnings do."""
        self.max_attempts = max_attempts
        self.retryable = retryable
        """False when the rank's error was a ``NonRetryableError`` (a relaunch would repeat it)."""
        where = f"rank {rank}" + (f" ({attempt_label(attempt, max_attempts)})" if attempt is not None else "")
        super().__init__(f"{where} failed: {error}\n--- traceback of {where} ---\n{traceback}")


class RankHungError(RankFailedError):
    """A rank stopped making progress (no step within the collective timeout) while its
    process was still alive; reported as hung, not as exited."""


def attempt_label(attempt: int, max_attempts: int | None = None) -> str:
    """The one way attempts are shown to people: counted from 1 ("attempt 1 of 2"), while
    ``attempt`` indexes are 0-based in code (``RankContext.attempt``, fault injection)."""
    return f"attempt {attempt + 1}" + (f" of {max_attempts}" if max_attempts else "")


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


class ModelNotFoundError(NonRetryableError, FileNotFoundError):
    """No published model (or model version) exists under the given name."""


class UntrustedModelError(NonRetryableError, ValueError):
    """A published model's config names a factory this process does not trust (not registered,
    not an entry point, not in an allowlisted module); nothing was imported. Names the fix."""


class MissingColumnsError(NonRetryableError, ValueError):
    """Input data lacks columns that a model or schema needs."""

    def __init__(self, what: str, missing: list[str], available: list[str]) -> None:
        self.missing = missing
        self.available = available
        super().__init__(
            f"{what} needs columns {missing} that the input lacks; available columns: {available}"
        )


class SpecIntegrityError(NonRetryableError, ValueError):
    """A table's preprocessing spec file fails its checks (its SHA-256 differs from the one the
    commit recorded, or it is not a valid spec); names the file. Training and scoring stop."""


class NoSpecRecordedError(NonRetryableError, ValueError):
    """A table version records no preprocessing spec (a table not written by the ETL)."""


def is_retryable(e: BaseException) -> bool:
    """False when ``e`` or an exception it was raised from (``raise ... from``) is a
    ``NonRetryableError``: a relaunch of the run would only repeat it."""
    seen: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in seen:
        if isinstance(cur, NonRetryableError) or (isinstance(cur, RankFailedError) and not cur.retryable):
            return False
        seen.append(cur)
        cur = cur.__cause__
    return True


# ---------------------------------------------------------------------------------------
# One-line reasons for jobs: a scheduler shows the last line of a failed job, so it must say why.
# ---------------------------------------------------------------------------------------
_TRACEBACK = "Traceback (most recent call last):"
_REASON_LIMIT = 600


def _spark_failure(e: BaseException) -> bool:
    kinds: list[type] = []
    try:
        from pyspark.errors import PythonException

        kinds.append(PythonException)
    except ImportError:
        pass
    try:  # classic Spark only: a Spark Connect client (pyspark-client) has no py4j
        from py4j.protocol import Py4JJavaError

        kinds.append(Py4JJavaError)
    except ImportError:
        pass
    return isinstance(e, tuple(kinds))


def spark_exceptions() -> tuple[type[BaseException], ...]:
    """The exception classes a Spark call raises: pyspark's, and py4j's where classic Spark runs."""
    kinds: list[type[BaseException]] = []
    try:
        from pyspark.errors import PySparkException

        kinds.append(PySparkException)
    except ImportError:
        pass
    try:
        from py4j.protocol import Py4JError

        kinds.append(Py4JError)
    except ImportError:
        pass
    return tuple(kinds)


def _spark_reason(e: BaseException) -> str:
    """The cause inside a Spark failure: the exception line of the last Python traceback in it
    (a Python worker's error), else the Java exception's first line."""
    java = getattr(e, "java_exception", None)
    text = str(e)
    if java is not None:
        try:
            text = str(java.toString())
        except Exception:  # the JVM is gone: keep the Python-side text
            pass
    if _TRACEBACK in text:
        after = text.rsplit(_TRACEBACK, 1)[1].splitlines()
        line = next((ln.strip() for ln in after if ln.strip() and not ln[0].isspace()), "")
        if line:
            return line
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return first or type(e).__name__


def failure_reason(e: BaseException) -> str:
    """One line saying why ``e`` happened, with the cause a Spark failure carries.

    pyspark's ``PythonException`` and py4j's ``Py4JJavaError`` open with a line that names
    no cause; the cause is the last line of the Python traceback or the Java exception's
    message. When such a failure is the cause of a sparkdl error, it is appended."""
    chain: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    spark = next((x for x in chain if _spark_failure(x)), None)
    if spark is e:
        return _clip(_spark_reason(e))
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    if spark is not None:
        # A wrapper often quotes the Spark failure's first line ("An exception was thrown from
        # the Python worker:"): cut it, the cause follows instead.
        quoted = next((ln.strip() for ln in str(spark).splitlines() if ln.strip()), "")
        cut = first.find(quoted) if quoted else -1
        if cut > 0:
            first = first[:cut].rstrip().removesuffix(f"{type(spark).__name__}:").rstrip(" :")
    head = _clip(f"{type(e).__name__}: {first}" if first else type(e).__name__)
    if spark is not None:
        head += f" (caused by {_clip(_spark_reason(spark))})"
    return head


def _clip(line: str) -> str:
    """At most _REASON_LIMIT characters, cut in the middle: a reason opens with what is wrong and
    ends with the fix, and both must survive."""
    if len(line) <= _REASON_LIMIT:
        return line
    head = _REASON_LIMIT * 2 // 5
    return line[:head] + " ... " + line[-(_REASON_LIMIT - head - 5):]
