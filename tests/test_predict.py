"""Batch inference through Spark: flights end to end on a sample (ETL -> train -> score), a
tensor-column multiclass model, PNG-encoded digits, and the predict job."""

from __future__ import annotations

import json
import os
import runpy
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from sparkdl.errors import MissingColumnsError

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def flights_model(spark, tmp_path_factory):
    from sparkdl.etl import FlightsETLConfig, run_flights_etl
    from sparkdl.train import TrainConfig, fit

    root = str(tmp_path_factory.mktemp("flights-lake"))
    run_flights_etl(spark=spark, lakehouse=root, config=FlightsETLConfig(sample_fraction=0.15))
    result = fit(TrainConfig(lakehouse=root, train_table="flights_train", valid_table="flights_valid",
                             model="flights_mlp", epochs=2, batch_size=256, lr=3e-3, num_ranks=2,
                             model_name="flights_delay"), spark=spark)
    return root, result


def test_flights_mlp_beats_the_majority_baseline(flights_model):
    _, result = flights_model
    print(f"flights MLP validation AUC {result.metrics['val_auc']:.4f}, accuracy {result.metrics['val_accuracy']:.4f}")
    assert result.metrics["val_auc"] > 0.7


def test_spark_predictions_equal_in_process_outputs_on_raw_rows(spark, flights_model):
    from sparkdl.lakehouse import Lakehouse, read_table
    from sparkdl.predict import PredictConfig, predict_table
    from sparkdl.preprocess import PreprocessingSpec
    from sparkdl.registry import load_model

    root, result = flights_model
    res = predict_table(PredictConfig(lakehouse=root, model_name="flights_delay", input_table="flights_clean",
                                      output_table="preds", keep_columns=["flight_id"]), spark=spark)
    assert res.model_version == result.model_version and res.rows > 0
    preds = read_table(spark, res.output_uri).orderBy("flight_id").limit(300).toPandas()
    assert set(preds["model_version"]) == {result.model_version}
    raw = read_table(spark, Lakehouse(root).table("flights_clean")).where(
        f"flight_id IN ({','.join(str(i) for i in preds['flight_id'])})").toPandas()
    model, mv = load_model(root, "flights_delay")
    enc = PreprocessingSpec.from_json(__import__("json").dumps(mv.preprocessing)).encode_pandas(raw)
    enc = enc.set_index("flight_id").loc[preds["flight_id"]]
    batch = {c: torch.as_tensor(np.asarray(enc[c])) for c in model.input_columns}
    with torch.inference_mode():
        expected = torch.sigmoid(model(batch)).reshape(-1).numpy()
    np.testing.assert_allclose(preds["score"].to_numpy(), expected, rtol=1e-5, atol=1e-6)


def test_missing_input_columns_are_listed_by_name(spark, flights_model):
    from sparkdl.lakehouse import Lakehouse, read_table
    from sparkdl.predict import predict_dataframe

    root, _ = flights_model
    lh = Lakehouse(root)
    # Raw rows: the saved spec's raw columns are what is missing.
    raw = read_table(spark, lh.table("flights_clean")).drop("carrier", "dest")
    with pytest.raises(MissingColumnsError) as exc:
        predict_dataframe(raw, lakehouse=root, model_name="flights_delay")
    assert exc.value.missing == ["carrier", "dest"]
    assert "needs columns ['carrier', 'dest']" in str(exc.value)
    # Encoded rows: the model's own input columns are.
    encoded = read_table(spark, lh.table("flights_valid")).drop("carrier_id")
    with pytest.raises(MissingColumnsError) as exc:
        predict_dataframe(encoded, lakehouse=root, model_name="flights_delay")
    assert exc.value.missing == ["carrier_id"]


def test_predictions_record_the_input_version_and_the_commit_names_model_and_input(spark, flights_model):
    from deltalake import DeltaTable

    from sparkdl.lakehouse import Lakehouse, read_table, table_version
    from sparkdl.predict import PredictConfig, predict_table

    root, result = flights_model
    clean = Lakehouse(root).table("flights_clean")
    res = predict_table(PredictConfig(lakehouse=root, model_name="flights_delay", input_table="flights_clean",
                                      input_version=0, output_table="preds_meta", keep_columns=["flight_id"]),
                        spark=spark)
    assert res.input_version == 0 and table_version(clean) >= 0
    rows = read_table(spark, res.output_uri, res.output_version).select("input_version", "model_name").distinct()
    assert [tuple(r) for r in rows.collect()] == [(0, "flights_delay")]
    commit = DeltaTable(res.output_uri).history(1)[0]
    assert commit["sparkdl.model"] == f"flights_delay/v{result.model_version}"
    assert commit["sparkdl.input"] == f"{clean}@0"


def test_predict_job_writes_a_version_and_fails_with_one_line(spark, flights_model, capsys):
    main = runpy.run_path(str(ROOT / "jobs" / "predict.py"))["main"]
    root, result = flights_model
    rc = main(["--lakehouse", root, "--model", "flights_delay", "--input", "flights_valid",
               "--output", "preds_job", "--keep", "flight_id,label", "--batch-size", "512"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert f"of flights_delay v{result.model_version} on " in out.out and "preds_job v0" in out.out
    rc = main(["--lakehouse", root, "--model", "no_such_model", "--input", "flights_valid", "--output", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("sparkdl predict failed: ModelNotFoundError: no published model")


# ----- a tensor-column multiclass model, instrumented ----------------------------------------------
PROBE = textwrap.dedent('''
    """A test model: a [2, 3] float tensor column plus a scalar column, 3 classes; it records each
    construction (a load) and each forward call (a batch) per process in log_dir."""
    import os

    import torch
    from torch import nn


    class Probe(nn.Module):
        task = "multiclass"

        def __init__(self, log_dir):
            super().__init__()
            self.log_dir = log_dir
            self.lin = nn.Linear(7, 3)
            with open(os.path.join(log_dir, "loads"), "a") as f:
                f.write(f"{os.getpid()}\\n")

        def forward(self, batch):
            x = batch["x"]
            with open(os.path.join(self.log_dir, "batches"), "a") as f:
                f.write(f"{os.getpid()} {x.device} {list(x.shape)}\\n")
            return self.lin(torch.cat([x.reshape(len(x), -1).float(), batch["w"].float().reshape(-1, 1)], 1))


    def factory(log_dir):
        return Probe(log_dir)
''')


@pytest.fixture(scope="module")
def probe_model(spark, tmp_path_factory):
    import sys

    from sparkdl.lakehouse import Lakehouse, write_table
    from sparkdl.registry import publish_model
    from sparkdl.schema import ColumnSpec, DatasetSchema

    base = tmp_path_factory.mktemp("probe")
    module = base / "sparkdl_probe_model.py"
    module.write_text(PROBE)
    spark.sparkContext.addPyFile(str(module))  # executors' Python workers import the factory from it
    sys.path.insert(0, str(base))
    import sparkdl_probe_model

    logs = base / "logs"
    logs.mkdir()
    root = str(base / "lake")
    torch.manual_seed(0)
    publish_model(root, "probe", model=sparkdl_probe_model.Probe(str(logs)),
                  model_config={"factory": "sparkdl_probe_model:factory", "kwargs": {"log_dir": str(logs)},
                                "input_columns": ["x", "w"], "task": "multiclass", "num_classes": 3},
                  training_config={}, lineage={}, metrics={})
    (logs / "loads").unlink()  # the publisher's own construction is not a load by Spark
    rng = np.random.default_rng(0)
    rows = [(i, rng.normal(size=6).astype(np.float32).tolist(), float(rng.normal())) for i in range(200)]
    df = spark.createDataFrame(rows, "id long, x array<float>, w float").repartition(4)
    schema = DatasetSchema(name="probe", columns=(
        ColumnSpec(name="id", type="int64", role="id"),
        ColumnSpec(name="x", type="array<float32>", shape=(2, 3)),
        ColumnSpec(name="w", type="float32"),
    ))
    write_table(df, Lakehouse(root).table("probe_in"), mode="overwrite", schema=schema)
    # A module:attr factory read from a model file loads only from an allowlisted module.
    os.environ["SPARKDL_TRUSTED_MODULES"] = "sparkdl_probe_model"
    yield root, logs, rows
    os.environ.pop("SPARKDL_TRUSTED_MODULES", None)
    sys.path.remove(str(base))


def test_tensor_column_model_scored_in_batches_loaded_once_per_worker(spark, probe_model):
    from sparkdl.lakehouse import read_table
    from sparkdl.predict import PredictConfig, predict_table
    from sparkdl.registry import load_model

    root, logs, rows = probe_model
    res = predict_table(PredictConfig(lakehouse=root, model_name="probe", input_table="probe_in",
                                      output_table="probe_out", batch_size=16, keep_columns=["id"]), spark=spark)
    assert res.rows == 200
    loads = Counter((logs / "loads").read_text().split())
    batches = [line.split(" ", 2) for line in (logs / "batches").read_text().splitlines()]
    assert loads and set(loads.values()) == {1}, f"the model must be built once per Python worker: {loads}"
    assert str(os.getpid()) not in loads, "the driver needs the recorded input columns, not the model"
    assert {pid for pid, _, _ in batches} <= set(loads)
    # On a GPU machine the executor's (first visible) GPU, else the CPU.
    assert {device for _, device, _ in batches} == {"cuda:0" if torch.cuda.is_available() else "cpu"}
    shapes = [json.loads(shape) for _, _, shape in batches]
    assert all(s[1:] == [2, 3] and 1 <= s[0] <= 16 for s in shapes), shapes  # the recorded shape, batched
    assert sum(s[0] for s in shapes) == 200 and len(shapes) >= 200 // 16

    model, _ = load_model(root, "probe")
    x = torch.tensor([r[1] for r in rows]).reshape(200, 2, 3)
    w = torch.tensor([r[2] for r in rows])
    with torch.inference_mode():
        prob = torch.softmax(model({"x": x, "w": w}), dim=-1)
    got = read_table(spark, res.output_uri).orderBy("id").toPandas()
    np.testing.assert_array_equal(got["prediction"].to_numpy(), prob.argmax(-1).numpy())
    np.testing.assert_allclose(got["score"].to_numpy(), prob.max(-1).values.numpy(), rtol=1e-5, atol=1e-6)


def test_null_inputs_are_refused_naming_the_column(spark, probe_model):
    from sparkdl.pipeline import failure_reason
    from sparkdl.predict import predict_dataframe

    root, _, _ = probe_model
    df = spark.createDataFrame([(1, [0.0] * 6, 1.0), (2, [0.0] * 6, None)], "id long, x array<float>, w float")
    with pytest.raises(Exception) as exc:
        predict_dataframe(df, lakehouse=root, model_name="probe").collect()
    assert failure_reason(exc.value).startswith("ValueError: input column 'w' has 1 null/NaN values in a batch")


@pytest.mark.gpu
def test_worker_device_outside_a_task_is_the_first_visible_gpu():
    from sparkdl.predict import _worker_device

    assert _worker_device() == torch.device("cuda:0")


# ----- PNG images ---------------------------------------------------------------------------------
def test_png_image_model_scores_decoded_images(spark, tmp_path):
    import io

    from PIL import Image

    from sparkdl.etl import run_digits_etl
    from sparkdl.lakehouse import Lakehouse, read_table, snapshot
    from sparkdl.models import build_model
    from sparkdl.predict import PredictConfig, predict_table
    from sparkdl.registry import publish_model

    root = str(tmp_path / "lake")
    run_digits_etl(spark=spark, lakehouse=root)
    train = Lakehouse(root).table("digits_train")
    torch.manual_seed(0)
    model = build_model("digits_cnn", channels=4).eval()
    # Published as fit() does: input columns and lineage only; the png codec comes from the tables.
    publish_model(root, "digits", model=model,
                  model_config={"factory": "digits_cnn", "kwargs": {"channels": 4}, "input_columns": ["image"],
                                "task": "multiclass", "num_classes": 10},
                  training_config={}, lineage={"train_table": {"uri": train, "version": snapshot(train).version}},
                  metrics={})
    res = predict_table(PredictConfig(lakehouse=root, model_name="digits", input_table="digits_valid",
                                      output_table="digits_preds", batch_size=64), spark=spark)
    got = read_table(spark, res.output_uri).orderBy("id").toPandas()
    src = read_table(spark, Lakehouse(root).table("digits_valid")).orderBy("id").toPandas()
    images = torch.from_numpy(np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in src["image"]]))
    with torch.inference_mode():
        prob = torch.softmax(model({"image": images}), dim=-1)
    assert list(got["id"]) == list(src["id"]) and res.rows == len(src)
    np.testing.assert_array_equal(got["prediction"].to_numpy(), prob.argmax(-1).numpy())
    np.testing.assert_allclose(got["score"].to_numpy(), prob.max(-1).values.numpy(), rtol=1e-5, atol=1e-6)
