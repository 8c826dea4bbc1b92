"""MLflow tracking: off imports nothing; on writes a run to the SQLite store under the lakehouse."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sparkdl.tracking import NullTracker, TrackingConfig, default_tracking_uri, make_tracker


def test_tracking_off_never_imports_mlflow(tmp_path):
    code = (
        "import sys\n"
        "from sparkdl.tracking import TrackingConfig, make_tracker\n"
        "import sparkdl.pipeline, sparkdl.predict\n"
        f"t = make_tracker(TrackingConfig(enabled=False), lakehouse={str(tmp_path)!r})\n"
        "t.log_params({'a': 1}); t.log_metrics({'loss': 0.5}, step=1); t.end()\n"
        "print('mlflow' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert not (tmp_path / "mlflow.db").exists()


def test_tracking_on_logs_params_metrics_and_artifacts_to_local_sqlite(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    tracker = make_tracker(TrackingConfig(enabled=True, experiment="t"), lakehouse=str(tmp_path), run_name="r1")
    assert not isinstance(tracker, NullTracker)
    curves = tmp_path / "curves.png"
    curves.write_bytes(b"\x89PNG fake")
    tracker.log_params({"train": {"lr": 0.1, "epochs": 2}})
    for epoch, loss in enumerate([0.9, 0.5], start=1):
        tracker.log_metrics({"loss": loss, "auc": 0.6 + epoch / 10}, step=epoch)
    tracker.log_artifact(str(curves))
    tracker.set_tags({"model": "flights_delay/v3"})
    tracker.end()

    assert (tmp_path / "mlflow.db").exists()
    client = mlflow.MlflowClient(tracking_uri=default_tracking_uri(str(tmp_path)))
    run = client.get_run(tracker.run_id)
    assert run.data.params["train.lr"] == "0.1"
    assert run.data.tags["model"] == "flights_delay/v3"
    history = client.get_metric_history(tracker.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.9), (2, 0.5)]
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["curves.png"]
    assert run.info.status == "FINISHED"


def test_tracking_config_rejects_empty_experiment():
    with pytest.raises(ValueError, match="experiment"):
        TrackingConfig(enabled=True, experiment="")
