"""Experiment tracking: parameters, per-epoch metrics, curves and the published model.

MLflow is optional: with tracking off a ``NullTracker`` is used and nothing of MLflow is
imported. With tracking on and no URI given, runs go to a SQLite store under the lakehouse
root (``<root>/mlflow.db``, artifacts in ``<root>/mlartifacts``), so
``mlflow ui --backend-store-uri sqlite:///<root>/mlflow.db`` shows them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol

from sparkdl.lakehouse import normalize_uri

__all__ = ["TrackingConfig", "Tracker", "NullTracker", "MlflowTracker", "make_tracker", "default_tracking_uri"]


@dataclass(kw_only=True)
class TrackingConfig:
    """Whether and where runs are tracked."""

    enabled: bool = False
    """Log to MLflow. Off: MLflow is never imported."""
    uri: str | None = None
    """MLflow tracking URI; None = SQLite under the lakehouse root."""
    experiment: str = "sparkdl"
    """MLflow experiment name."""

    def __post_init__(self) -> None:
        if not self.experiment:
            raise ValueError("experiment must be a non-empty name, e.g. 'sparkdl'")


def default_tracking_uri(lakehouse: str) -> str:
    """SQLite store beside the tables: ``sqlite:////abs/root/mlflow.db``."""
    return "sqlite:///" + str(Path(normalize_uri(lakehouse)) / "mlflow.db")


class Tracker(Protocol):
    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str) -> None: ...
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

    def log_artifact(self, path: str) -> None:
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


class MlflowTracker:
    """One MLflow run, driven from the driver."""

    def __init__(self, *, uri: str, experiment: str, run_name: str | None = None) -> None:
        try:
            import mlflow
        except ImportError as e:
            raise RuntimeError(
                "tracking is on but MLflow is not installed; pip install 'sparkdl[tracking]' or turn tracking off"
            ) from e
        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        self._mlflow = mlflow
        self._client = mlflow.MlflowClient(tracking_uri=uri)
        self.uri = uri
        exp = self._client.get_experiment_by_name(experiment)
        if exp is None:
            artifact_location = None
            if uri.startswith("sqlite:///"):
                artifact_location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
            exp_id = self._client.create_experiment(experiment, artifact_location=artifact_location)
        else:
            exp_id = exp.experiment_id
        self.run_id = self._client.create_run(exp_id, run_name=run_name).info.run_id

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

    def log_artifact(self, path: str) -> None:
        if Path(path).exists():
            self._client.log_artifact(self.run_id, path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self._client.set_tag(self.run_id, k, str(v))

    def end(self, status: str = "FINISHED") -> None:
        self._client.set_terminated(self.run_id, status=status)


def make_tracker(config: TrackingConfig, *, lakehouse: str, run_name: str | None = None) -> "Tracker":
    """A tracker for ``config``: MLflow when enabled, else a no-op that imports nothing."""
    if not config.enabled:
        return NullTracker()
    return MlflowTracker(uri=config.uri or default_tracking_uri(lakehouse), experiment=config.experiment, run_name=run_name)
