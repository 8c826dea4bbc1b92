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


def test_default_store_needs_a_tracking_uri_for_a_non_local_lakehouse(tmp_path):
    from sparkdl.tracking import check_tracking

    with pytest.raises(ValueError, match="--tracking-uri"):
        check_tracking(TrackingConfig(enabled=True), lakehouse="s3a://bucket/lake")
    assert default_tracking_uri(tmp_path.as_uri()) == f"sqlite:///{tmp_path}/mlflow.db"
    assert check_tracking(TrackingConfig(enabled=False), lakehouse="s3a://bucket/lake") is None


def test_track_fit_logs_params_epoch_metrics_curves_and_the_published_model(tmp_path):
    from types import SimpleNamespace

    import torch

    from sparkdl.registry import publish_model
    from sparkdl.tracking import track_fit
    from sparkdl.train import TrainConfig

    mlflow = pytest.importorskip("mlflow")
    root = str(tmp_path / "lake")
    mv = publish_model(root, "tiny", model=torch.nn.Linear(2, 1),
                       model_config={"factory": "flights_mlp", "input_columns": ["a", "b"]},
                       training_config={}, lineage={}, metrics={"val_auc": 0.7})
    curves = tmp_path / "curves.png"
    curves.write_bytes(b"\x89PNG fake")
    config = TrainConfig(lakehouse=root, train_table="t", model="tabular_mlp", epochs=2, lr=0.01, model_name="tiny")
    # What fit() returns, as far as tracking reads it.
    result = SimpleNamespace(
        run_id=config.run_id, model_name="tiny", model_version=mv.version, curves_png=str(curves),
        history=[{"epoch": 1, "step": 5, "train_loss": 0.9, "val_auc": 0.6},
                 {"epoch": 2, "step": 10, "train_loss": 0.5, "val_auc": 0.7, "partial": False}],
    )
    assert track_fit(TrackingConfig(enabled=False), lakehouse=root, train_config=config, result=result) is None
    run_id = track_fit(TrackingConfig(enabled=True, experiment="fits"), lakehouse=root, train_config=config,
                       result=result)

    client = mlflow.MlflowClient(tracking_uri=default_tracking_uri(root))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == f"train-{config.run_id}"
    assert run.data.params["train.lr"] == "0.01" and run.data.params["train.train_table"] == "t"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train_loss")] == [(1, 0.9), (2, 0.5)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train_steps")] == [(1, 5), (2, 10)]
    assert "epoch" not in run.data.metrics and "partial" not in run.data.metrics
    assert {a.path for a in client.list_artifacts(run_id)} == {"curves.png", "model"}
    model_files = {a.path.split("/")[-1] for a in client.list_artifacts(run_id, "model")}
    assert {"model.safetensors", "model_config.json", "metrics.json", "_COMMITTED"} <= model_files
    assert run.data.tags["model"] == "tiny/v1" and run.data.tags["model_uri"] == mv.uri
    assert run.data.tags["run_id"] == config.run_id
