"""The pipeline job: one-line failures for a scheduler, and a real run, re-run, tracked and failed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sparkdl.pipeline import PipelineConfig, PipelineResult, format_summary

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_stage_exits_1_with_a_one_line_reason(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--lakehouse", str(tmp_path), "--stages", "etl,deploy"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1
    reason = [ln for ln in proc.stderr.splitlines() if ln.startswith("sparkdl pipeline failed")]
    assert reason == ["sparkdl pipeline failed: unknown stages ['deploy']; choose from ['etl', 'train', 'evaluate', 'predict']"]


def test_missing_tables_fail_the_train_stage_naming_it(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--lakehouse", str(tmp_path), "--stages", "train"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1
    assert "pipeline stage 'train' failed: TableNotFoundError: no Delta table at" in proc.stderr


def test_config_rejects_bad_values_naming_the_field():
    with pytest.raises(ValueError, match="valid_fraction"):
        PipelineConfig(valid_fraction=1.5)
    with pytest.raises(ValueError, match="num_ranks"):
        PipelineConfig(num_ranks=0)


def test_summary_lists_stage_times_and_versions():
    r = PipelineResult(lakehouse="/l", seconds={"etl": 1.0, "train": 2.0},
                       etl={"rows_in": 10, "rows_out": 8, "rows_rejected": 2, "skipped": False},
                       train={"model_name": "m", "model_version": 3, "run_id": "r", "metrics": {"val_auc": 0.9},
                              "curves_png": "/l/runs/r/curves.png"})
    text = format_summary(r)
    assert "rows in 10, out 8, rejected 2" in text and "model m v3" in text
    assert "etl 1.0s, train 2.0s" in text and "/l/runs/r/curves.png" in text


def test_bad_tracking_uri_exits_1_with_one_line_before_spark(tmp_path):
    pytest.importorskip("mlflow")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--lakehouse", str(tmp_path),
         "--tracking-uri", "bogus://x", "--stages", "evaluate"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    reason = [ln for ln in proc.stderr.splitlines() if ln.startswith("sparkdl pipeline failed")]
    assert len(reason) == 1 and "bogus://x" in reason[0], proc.stderr


# ----- failure reasons ------------------------------------------------------------------------
def test_failure_reason_of_a_python_worker_error_is_its_cause(spark):
    from pyspark.sql.functions import udf

    from sparkdl.errors import WriteAbortedError
    from sparkdl.pipeline import failure_reason

    @udf("double")
    def boom(x):
        raise ValueError("the real cause: boom\nmore detail")

    with pytest.raises(Exception) as exc:
        spark.range(3).select(boom("id")).collect()
    assert failure_reason(exc.value) == "ValueError: the real cause: boom"
    # A sparkdl error wrapping it keeps its own line and names the cause.
    try:
        raise WriteAbortedError("write to /t failed before its commit") from exc.value
    except WriteAbortedError as wrapped:
        assert failure_reason(wrapped) == (
            "WriteAbortedError: write to /t failed before its commit (caused by ValueError: the real cause: boom)"
        )


def test_failure_reason_of_a_java_error_is_the_java_message(spark):
    from sparkdl.pipeline import failure_reason

    with pytest.raises(Exception) as exc:
        spark.sparkContext._jsc.sc().getConf().get("sparkdl.no.such.key")
    assert failure_reason(exc.value) == "java.util.NoSuchElementException: sparkdl.no.such.key"


def test_failure_reason_of_an_empty_message_is_the_type():
    from sparkdl.pipeline import failure_reason

    assert failure_reason(KeyError()) == "KeyError"
    assert failure_reason(RuntimeError("first\nsecond")) == "RuntimeError: first"


# ----- a real pipeline, run twice ----------------------------------------------------------------
@pytest.fixture(scope="module")
def two_runs(spark, tmp_path_factory):
    """The flights pipeline on a 5% sample, tracked, then run again with the same inputs."""
    from dataclasses import replace

    from sparkdl.lakehouse import Lakehouse, read_table
    from sparkdl.pipeline import run_pipeline
    from sparkdl.registry import get_model_version
    from sparkdl.tracking import TrackingConfig

    root = str(tmp_path_factory.mktemp("pipeline-lake"))
    config = PipelineConfig(lakehouse=root, sample_fraction=0.05, epochs=2, batch_size=256, num_ranks=2,
                            tracking=TrackingConfig(enabled=True, experiment="pipeline-test"))
    first = run_pipeline(config, spark=spark, log=lambda _: None)
    lh = Lakehouse(root)
    before = {
        "predictions": read_table(spark, lh.table("flights_predictions"), 0).orderBy("flight_id").toPandas(),
        "train_rows": read_table(spark, lh.table("flights_train"), first.etl["table_versions"]["flights_train"]).count(),
        "model_v1": (Path(get_model_version(root, "flights_delay", 1).uri) / "model.safetensors").read_bytes(),
    }
    second = run_pipeline(replace(config, tracking=TrackingConfig()), spark=spark, log=lambda _: None)
    return root, config, first, second, before


@pytest.mark.slow
@pytest.mark.integration
def test_rerun_skips_the_etl_and_adds_new_model_and_prediction_versions(two_runs):
    from sparkdl.lakehouse import Lakehouse, table_version

    root, _, first, second, _ = two_runs
    assert first.etl["skipped"] is False and second.etl["skipped"] is True
    assert second.etl["table_versions"] == first.etl["table_versions"]
    for name, version in first.etl["table_versions"].items():
        assert table_version(Lakehouse(root).table(name)) == version, f"{name} was rewritten by the re-run"
    assert (first.train["model_version"], second.train["model_version"]) == (1, 2)
    assert (first.predict["output_version"], second.predict["output_version"]) == (0, 1)
    assert second.predict["rows"] == first.predict["rows"] == first.etl["rows_out"]
    assert 0.5 < first.evaluate["auc"] <= 1.0


@pytest.mark.slow
@pytest.mark.integration
def test_earlier_versions_stay_readable_and_unchanged(spark, two_runs):
    import pandas as pd

    from sparkdl.lakehouse import Lakehouse, read_table
    from sparkdl.registry import get_model_version

    root, _, first, _, before = two_runs
    lh = Lakehouse(root)
    again = read_table(spark, lh.table("flights_predictions"), 0).orderBy("flight_id").toPandas()
    pd.testing.assert_frame_equal(again, before["predictions"])
    assert set(again["model_version"]) == {1}
    latest = read_table(spark, lh.table("flights_predictions")).select("model_version").distinct().collect()
    assert sorted(r[0] for r in latest) == [1, 2], "an append keeps the first scoring next to the second"
    v1 = get_model_version(root, "flights_delay", 1)
    assert (Path(v1.uri) / "model.safetensors").read_bytes() == before["model_v1"]
    assert v1.metrics == first.train["metrics"]
    train_v = first.etl["table_versions"]["flights_train"]
    assert read_table(spark, lh.table("flights_train"), train_v).count() == before["train_rows"]


@pytest.mark.slow
@pytest.mark.integration
def test_summary_of_a_real_run(two_runs):
    _, _, first, second, _ = two_runs
    text = format_summary(first)
    assert f"rows in {first.etl['rows_in']}, out {first.etl['rows_out']}" in text
    assert "flights_train v0" in text  # table versions
    assert "model flights_delay v1" in text and "val_auc=" in text
    assert f"AUC {first.evaluate['auc']:.4f}" in text
    assert f"-> {first.predict['output_uri']} v0" in text
    for stage in ("etl", "train", "evaluate", "predict"):
        assert f"{stage} {first.seconds[stage]:.1f}s" in text
    assert f"curves         {first.train['curves_png']}" in text and Path(first.train["curves_png"]).exists()
    assert "skipped (inputs unchanged)" in format_summary(second)


@pytest.mark.slow
@pytest.mark.integration
def test_tracked_run_holds_params_epoch_metrics_curves_and_model(two_runs):
    mlflow = pytest.importorskip("mlflow")
    from sparkdl.registry import get_model_version
    from sparkdl.tracking import default_tracking_uri

    root, config, first, _, _ = two_runs
    assert first.tracking_run
    client = mlflow.MlflowClient(tracking_uri=default_tracking_uri(root))
    run = client.get_run(first.tracking_run)
    assert run.info.status == "FINISHED"
    assert run.data.params["pipeline.sample_fraction"] == "0.05"
    # lr is not overridden here: the bundled config's train section sets it
    assert run.data.params["train.lr"] == "0.003" and run.data.params["train.epochs"] == "2"
    for key in ("train_loss", "val_auc", "val_loss"):
        history = client.get_metric_history(first.tracking_run, key)
        assert [m.step for m in history] == [1, 2], key
    assert [m.value for m in client.get_metric_history(first.tracking_run, "val_auc")] == [
        h["val_auc"] for h in first.train["history"]]
    assert run.data.metrics["eval_auc"] == pytest.approx(first.evaluate["auc"])
    assert "epoch" not in run.data.metrics
    top = {a.path for a in client.list_artifacts(first.tracking_run)}
    assert {"curves.png", "model"} <= top
    model_files = {Path(a.path).name for a in client.list_artifacts(first.tracking_run, "model")}
    assert {"model.safetensors", "model_config.json", "preprocessing.json"} <= model_files
    mv = get_model_version(root, "flights_delay", 1)
    assert run.data.tags["model"] == "flights_delay/v1" and run.data.tags["model_uri"] == mv.uri


@pytest.mark.slow
@pytest.mark.integration
def test_a_failing_predict_stage_names_the_cause_and_keeps_the_table(spark, two_runs):
    from dataclasses import replace

    from pyspark.sql import functions as F

    from sparkdl.lakehouse import Lakehouse, read_table, table_version, write_table
    from sparkdl.pipeline import PipelineStageError, run_pipeline

    root, config, _, _, _ = two_runs
    lh = Lakehouse(root)
    # Encoded rows whose carrier id lies outside the model's embedding table.
    bad = read_table(spark, lh.table("flights_valid")).limit(50).withColumn("carrier_id", F.lit(10**6))
    write_table(bad, lh.table("bad_scores"), mode="overwrite")
    version = table_version(lh.table("flights_predictions"))
    with pytest.raises(PipelineStageError) as exc:
        run_pipeline(replace(config, score_table="bad_scores", tracking=type(config.tracking)()), spark=spark,
                     stages=("predict",), log=lambda _: None)
    assert exc.value.stage == "predict"
    assert "\n" not in str(exc.value)
    assert "IndexError: index out of range in self" in str(exc.value), str(exc.value)
    assert table_version(lh.table("flights_predictions")) == version


@pytest.mark.slow
@pytest.mark.integration
def test_tracking_off_run_imports_nothing_of_mlflow(two_runs):
    root = two_runs[0]
    code = (
        "import runpy, sys\n"
        f"main = runpy.run_path({str(ROOT / 'jobs' / 'pipeline.py')!r})['main']\n"
        f"rc = main(['--lakehouse', {root!r}, '--stages', 'evaluate'])\n"
        "print('RC', rc, 'MLFLOW', 'mlflow' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert "RC 0 MLFLOW False" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "evaluate       AUC" in proc.stdout


def test_etl_fingerprint_covers_every_setting_and_the_marker_lives_in_the_lakehouse(tmp_path):
    from sparkdl.pipeline import _etl_fingerprint, _etl_marker

    lake = str(tmp_path / "lake")  # never the working directory's ./lakehouse (make demo leaves one)
    base = _etl_fingerprint(PipelineConfig(lakehouse=lake))
    assert base == _etl_fingerprint(PipelineConfig(lakehouse=lake, epochs=5, lr=0.1))  # training settings don't count
    for change in ({"sample_fraction": 0.5}, {"min_count": 3}, {"valid_fraction": 0.3}):
        assert _etl_fingerprint(PipelineConfig(lakehouse=lake, **change)) != base, change
    s3 = PipelineConfig(lakehouse="s3a://bucket/lake")
    assert _etl_marker(s3) == f"s3a://bucket/lake/pipeline/etl-{_etl_fingerprint(s3)}.json"


def test_a_stale_lakehouse_in_the_working_directory_changes_nothing(tmp_path, monkeypatch):
    """``make demo`` leaves ./lakehouse behind, then ``make test`` runs in the same folder: a test
    run (and any config naming its lakehouse) must not read it."""
    from sparkdl.pipeline import _etl_fingerprint, _etl_marker

    lake = str(tmp_path / "lake")
    configs = [PipelineConfig(lakehouse=lake), PipelineConfig(lakehouse="s3a://bucket/lake")]
    before = [(_etl_fingerprint(c), _etl_marker(c)) for c in configs]
    stale = tmp_path / "cwd" / "lakehouse" / "raw" / "nycflights13"
    stale.mkdir(parents=True)
    for name in ("flights.csv", "weather.csv", "planes.csv", "airports.csv"):
        (stale / name).write_text("year,month\n2013,1\n")
    monkeypatch.chdir(tmp_path / "cwd")
    assert [(_etl_fingerprint(c), _etl_marker(c)) for c in configs] == before
    # The default lakehouse is the working directory's: there, the stale files do count.
    assert _etl_fingerprint(PipelineConfig()) != _etl_fingerprint(PipelineConfig(lakehouse=lake))


@pytest.mark.slow
@pytest.mark.integration
def test_etl_is_not_skipped_once_a_table_moved_past_the_marked_version(spark, two_runs):
    import json

    from sparkdl import _fs
    from sparkdl.lakehouse import Lakehouse, read_table, write_table
    from sparkdl.pipeline import _etl_is_current, _etl_marker

    root, config, first, _, _ = two_runs
    lh = Lakehouse(root)
    marker = json.loads(_fs.read_text(_etl_marker(config)))
    assert marker["table_versions"] == first.etl["table_versions"] and _etl_is_current(lh, marker)
    # Something else (another ETL run, a manual fix) writes a new version of one table.
    valid = lh.table("flights_valid")
    write_table(read_table(spark, valid).limit(10), valid, mode="append")
    assert not _etl_is_current(lh, marker)
