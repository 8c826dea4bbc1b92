"""Experiment tracking: parameters, per-epoch metrics, curves and the published model.

MLflow is optional: with tracking off a ``NullTracker`` is used and nothing of MLflow is
imported. With tracking on and no URI given, runs go to a SQLite store under the lakehouse
root (``<root>/mlflow.db``, artifacts in ``<root>/mlartifacts``), so
``mlflow ui --backend-store-uri sqlite:///<root>/mlflow.db`` shows them. A lakehouse that is
not a local folder (s3a://, hdfs://...) has no place for a SQLite file: give a tracking URI.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol

from sparkdl import _fs
from sparkdl.lakehouse import normalize_uri

__all__ = [
    "TrackingConfig",
    "Tracker",
    "NullTracker",
    "MlflowTracker",
    "make_tracker",
    "default_tracking_uri",
    "check_tracking",
    "epoch_metrics",
    "log_train_result",
    "track_fit",
]


@dataclass(kw_only=True)
class TrackingConfig:
    """Whether and where runs are tracked."""

    enabled: bool = False
    """Log to MLflow. Off: MLflow is never imported."""
    uri: str | None = None
    """MLflow tracking URI; None = SQLite under the lakehouse root (local lakehouses only)."""
    experiment: str = "sparkdl"
    """MLflow experiment name."""

    def __post_init__(self) -> None:
        if not self.experiment:
            raise ValueError("experiment must be a non-empty name, e.g. 'sparkdl'")


def default_tracking_uri(lakehouse: str) -> str:
    """SQLite store beside the tables: ``sqlite:////abs/root/mlflow.db``."""
    if not _fs.is_local(str(lakehouse)):
        raise ValueError(
            f"tracking is on but the lakehouse {lakehouse} is not a local folder, and the default MLflow "
            "store is a SQLite file under it; pass a tracking URI (--tracking-uri http://mlflow-host:5000, "
            "or sqlite:////local/path/mlflow.db)"
        )
    return "sqlite:///" + str(Path(normalize_uri(lakehouse)) / "mlflow.db")


def _tracking_uri(config: TrackingConfig, lakehouse: str) -> str:
    return config.uri or default_tracking_uri(lakehouse)


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str, artifact_path: str | None = None) -> None: ...
    def log_artifacts(self, folder: str, artifact_path: str) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def end(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Tracking off: every call is a no-op."""

    run_id: str | None = None
    uri: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        pass

    def log_artifacts(self, folder: str, artifact_path: str) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = text[:6000]  # MLflow's limit on a parameter value
    return out


def _client(uri: str):
    try:
        import mlflow
    except ImportError as e:
        raise RuntimeError(
            "tracking is on but MLflow is not installed; pip install 'sparkdl[tracking]' or turn tracking off"
        ) from e
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    try:
        return mlflow.MlflowClient(tracking_uri=uri)
    except Exception as e:
        raise RuntimeError(f"MLflow cannot use the tracking URI {uri!r}: {type(e).__name__}: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)


class MlflowTracker:
    """One MLflow run, driven from the driver."""

    def __init__(self, *, uri: str, experiment: str, run_name: str | None = None) -> None:
        self._client = _client(uri)
        self.uri = uri
        try:
            exp = self._client.get_experiment_by_name(experiment)
            if exp is None:
                artifact_location = None
                if uri.startswith("sqlite:///"):
                    artifact_location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
                exp_id = self._client.create_experiment(experiment, artifact_location=artifact_location)
            else:
                exp_id = exp.experiment_id
            self.run_id = self._client.create_run(exp_id, run_name=run_name).info.run_id
        except Exception as e:
            raise RuntimeError(
                f"MLflow tracking at {uri!r} failed to start a run in experiment {experiment!r}: "
                f"{type(e).__name__}: {_first_line(e)}"
            ) from e

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = _flatten(params)
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        if items:
            self._client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        """Log one file (a local path or a lakehouse URI); a missing file is skipped."""
        if not _fs.exists(path):
            return
        local = _fs.local_path(path)
        if local is not None:
            self._client.log_artifact(self.run_id, local, artifact_path)
            return
        with tempfile.TemporaryDirectory(prefix="sparkdl-artifact-") as tmp:
            copy = Path(tmp) / path.rstrip("/").rsplit("/", 1)[-1]
            copy.write_bytes(_fs.read_bytes(path))
            self._client.log_artifact(self.run_id, str(copy), artifact_path)

    def log_artifacts(self, folder: str, artifact_path: str) -> None:
        """Log every file of ``folder`` (a local path or a lakehouse URI) under ``artifact_path``."""
        local = _fs.local_path(folder)
        if local is not None:
            self._client.log_artifacts(self.run_id, local, artifact_path)
            return
        with tempfile.TemporaryDirectory(prefix="sparkdl-artifacts-") as tmp:
            for name in _fs.listdir(folder):
                src = _fs.join(folder, name)
                if not _fs.is_dir(src):
                    (Path(tmp) / name).write_bytes(_fs.read_bytes(src))
            self._client.log_artifacts(self.run_id, tmp, artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self._client.set_tag(self.run_id, k, str(v))

    def end(self, status: str = "FINISHED") -> None:
        self._client.set_terminated(self.run_id, status=status)


def check_tracking(config: TrackingConfig, *, lakehouse: str) -> str | None:
    """Resolve and open the tracking store before any work starts: the URI, or None when off.

    Raises ``ValueError`` (no URI for a non-local lakehouse) or ``RuntimeError`` (MLflow missing,
    or a URI it cannot use) with a one-line reason."""
    if not config.enabled:
        return None
    uri = _tracking_uri(config, lakehouse)
    client = _client(uri)
    try:
        client.get_experiment_by_name(config.experiment)
    except Exception as e:
        raise RuntimeError(f"MLflow tracking at {uri!r} is not usable: {type(e).__name__}: {_first_line(e)}") from e
    return uri


def make_tracker(config: TrackingConfig, *, lakehouse: str, run_name: str | None = None) -> "Tracker":
    """A tracker for ``config``: MLflow when enabled, else a no-op that imports nothing."""
    if not config.enabled:
        return NullTracker()
    return MlflowTracker(uri=_tracking_uri(config, lakehouse), experiment=config.experiment, run_name=run_name)


def epoch_metrics(row: Mapping[str, Any]) -> tuple[dict[str, float], int]:
    """(metrics, step) of one per-epoch history row: the numbers in it, keyed by the epoch.
    ``epoch`` is the step, not a metric; ``step`` (optimizer steps so far) is kept as ``train_steps``."""
    metrics = {
        ("train_steps" if k == "step" else k): float(v)
        for k, v in row.items()
        if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    return metrics, int(row.get("epoch", 0))


def _as_dict(obj: Any) -> dict[str, Any]:
    return asdict(obj) if is_dataclass(obj) and not isinstance(obj, type) else dict(obj)


def log_train_result(
    tracker: "Tracker",
    *,
    lakehouse: str,
    train_config: Any,
    result: Any,
    history_logged: bool = False,
) -> None:
    """Log a finished training run: its config as parameters, per-epoch metrics (unless they
    were logged live), the curves PNG and the published model version's files under ``model/``,
    tagged with the model's name, version and URI."""
    tracker.log_params({"train": _as_dict(train_config)})
    if not history_logged:
        for row in getattr(result, "history", None) or []:
            metrics, step = epoch_metrics(row)
            tracker.log_metrics(metrics, step=step)
    if getattr(result, "curves_png", None):
        tracker.log_artifact(result.curves_png)
    tags = {"run_id": result.run_id}
    if getattr(result, "model_version", None) and not isinstance(tracker, NullTracker):
        from sparkdl.registry import get_model_version

        mv = get_model_version(lakehouse, result.model_name, result.model_version)
        tracker.log_artifacts(mv.uri, "model")
        tags.update({"model": f"{mv.name}/v{mv.version}", "model_name": mv.name,
                     "model_version": str(mv.version), "model_uri": mv.uri})
    tracker.set_tags(tags)


def track_fit(
    tracking: TrackingConfig,
    *,
    lakehouse: str,
    train_config: Any,
    result: Any,
    run_name: str | None = None,
) -> str | None:
    """Log a finished ``fit`` (a ``TrainResult``) as one MLflow run; its run id, or None when
    tracking is off (then nothing of MLflow is imported)."""
    if not tracking.enabled:
        return None
    tracker = make_tracker(tracking, lakehouse=lakehouse, run_name=run_name or f"train-{result.run_id}")
    status = "FAILED"
    try:
        log_train_result(tracker, lakehouse=lakehouse, train_config=train_config, result=result)
        status = "FINISHED"
    finally:
        tracker.end(status)
    return tracker.run_id
