"""Flights end to end on a sample: ETL -> train (AUC above baseline) -> Spark batch inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparkdl.errors import MissingColumnsError

pytestmark = [pytest.mark.integration, pytest.mark.slow]


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
        expected = torch.sigmoid(model(batch)).numpy()
    np.testing.assert_allclose(preds["score"].to_numpy(), expected, rtol=1e-5, atol=1e-6)


def test_missing_input_columns_are_listed(spark, flights_model):
    from sparkdl.predict import predict_dataframe

    root, _ = flights_model
    df = spark.createDataFrame([(1, 2.0)], "flight_id long, distance double")
    with pytest.raises(MissingColumnsError, match=r"needs columns \[.*\]"):
        predict_dataframe(df, lakehouse=root, model_name="flights_delay")
