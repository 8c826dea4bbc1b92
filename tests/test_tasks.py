"""Every objective on generated tables: regression, multiclass, multilabel and a token model train
past a stated bar; custom loss; labels and features checked on the driver before launch; each
task's predictions through Spark equal the in-process outputs; metrics equal scikit-learn's."""

from __future__ import annotations

import io
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sparkdl.errors import DataValidationError, NonRetryableError
from sparkdl.schema import ColumnSpec, DatasetSchema
from sparkdl.tasks import exact_auc, make_task
from sparkdl.train import TrainConfig, fit

pytestmark = pytest.mark.integration


# ----- metrics: exact, against scikit-learn ---------------------------------------------------------
def _weighted(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).uniform(0.1, 2.0, n))


def test_task_metrics_equal_scikit_learn_with_weights():
    from sklearn import metrics as M

    torch.manual_seed(0)
    w = _weighted(300)
    t = make_task("multiclass", num_classes=7)
    out, y = torch.randn(300, 7), torch.randint(0, 7, (300,))
    m = t.metrics(t.metric_sums(out, y, w))
    pred, prob = out.argmax(-1), torch.softmax(out, -1).numpy()
    assert m["val_accuracy"] == pytest.approx(M.accuracy_score(y, pred, sample_weight=w))
    assert m["val_top5_accuracy"] == pytest.approx(M.top_k_accuracy_score(y, prob, k=5, sample_weight=w))
    assert m["val_macro_f1"] == pytest.approx(M.f1_score(y, pred, average="macro", sample_weight=w))
    assert m["val_loss"] == pytest.approx(M.log_loss(y, prob, sample_weight=w), rel=1e-6)

    t = make_task("regression")
    out = torch.randn(300)
    y = out + 0.5 * torch.randn(300)
    m = t.metrics(t.metric_sums(out, y, w))
    assert m["val_r2"] == pytest.approx(M.r2_score(y, out, sample_weight=w))
    assert m["val_mae"] == pytest.approx(M.mean_absolute_error(y, out, sample_weight=w))
    assert m["val_rmse"] == pytest.approx(M.mean_squared_error(y, out, sample_weight=w) ** 0.5)

    t = make_task("multilabel", num_classes=5)
    out, y = torch.randn(300, 5), torch.randint(0, 2, (300, 5))
    m = t.metrics(t.metric_sums(out, y, torch.ones(300, dtype=torch.float64)))
    assert m["val_macro_f1"] == pytest.approx(M.f1_score(y, (out > 0).int(), average="macro"))
    assert m["val_subset_accuracy"] == pytest.approx(M.accuracy_score(y, (out > 0).int()))

    # AUC with many tied scores, weighted and not: exact, ties counted half.
    score = torch.randn(500).round(decimals=1).double()
    yb = (torch.rand(500) < torch.sigmoid(score)).double()
    wb = _weighted(500, 1)
    assert exact_auc(score.numpy(), yb.numpy()) == pytest.approx(M.roc_auc_score(yb, score), abs=1e-12)
    assert exact_auc(score.numpy(), yb.numpy(), wb.numpy()) == pytest.approx(
        M.roc_auc_score(yb, score, sample_weight=wb), abs=1e-12)


def test_weighted_loss_is_the_mean_of_weighted_rows_so_shards_add_up():
    t = make_task("binary")
    out, y, w = torch.randn(8), torch.randint(0, 2, (8,)), torch.rand(8)
    whole = t.loss(out, y, w)
    halves = (t.loss(out[:4], y[:4], w[:4]) + t.loss(out[4:], y[4:], w[4:])) / 2
    torch.testing.assert_close(whole, halves)


def test_task_and_loss_arguments_are_checked():
    with pytest.raises(ValueError, match="num_classes"):
        make_task("multiclass")
    with pytest.raises(ValueError, match="loss='huber' does not apply to task='binary'"):
        make_task("binary", loss="huber")
    with pytest.raises(ValueError, match="task='bogus' is invalid"):
        TrainConfig(train_table="t", model="tabular_mlp", task="bogus")
    with pytest.raises(ValueError, match="loss='mae' is invalid"):
        TrainConfig(train_table="t", model="tabular_mlp", task="binary", loss="mae")
    with pytest.raises(ValueError, match="cannot import"):
        make_task("regression", loss="no_such_module_xyz:fn")
    with pytest.raises(TypeError):
        TrainConfig(train_table="t")  # model has no default: no dataset is assumed


# ----- generated tables ----------------------------------------------------------------------------
def _write(spark, root: str, name: str, pdf: pd.DataFrame, columns: list[ColumnSpec], ddl: str) -> str:
    from sparkdl.lakehouse import Lakehouse, write_table

    def plain(v):  # Python values: pandas -> Spark would turn NaN into null
        return v.tolist() if isinstance(v, np.ndarray) else v.item() if isinstance(v, np.generic) else v

    rows = [tuple(plain(v) for v in row) for row in pdf.itertuples(index=False)]
    uri = Lakehouse(root).table(name)
    write_table(spark.createDataFrame(rows, ddl).coalesce(1), uri, mode="overwrite",
                schema=DatasetSchema(name=name, columns=tuple(columns)))
    return uri


def _split(spark, root: str, name: str, pdf: pd.DataFrame, columns: list[ColumnSpec], ddl: str,
           n_valid: int) -> None:
    _write(spark, root, f"{name}_train", pdf.iloc[n_valid:], columns, ddl)
    _write(spark, root, f"{name}_valid", pdf.iloc[:n_valid], columns, ddl)


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("tasks-lake"))
    rng = np.random.default_rng(0)
    n = 1600
    ids = np.arange(n, dtype=np.int64)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    cat = rng.integers(0, 5, n).astype(np.int32)
    effect = np.array([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=np.float32)

    # regression: a linear target plus a categorical effect and noise; weights in [0.5, 2)
    y = 2 * x[:, 0] - x[:, 1] + 0.5 * x[:, 2] * x[:, 3] + effect[cat] + 0.1 * rng.normal(size=n)
    reg = pd.DataFrame({"id": ids, "x1": x[:, 0], "x2": x[:, 1], "x3": x[:, 2], "x4": x[:, 3], "cat": cat,
                        "w": rng.uniform(0.5, 2, n), "y": y.astype(np.float64)})
    reg_cols = [ColumnSpec(name="id", type="int64", role="id"),
                *[ColumnSpec(name=f"x{i}", type="float32") for i in range(1, 5)],
                ColumnSpec(name="cat", type="int32", kind="categorical", cardinality=5),
                ColumnSpec(name="w", type="float64", role="meta"),
                ColumnSpec(name="y", type="float64", role="label", kind="regression")]
    _split(spark, root, "reg", reg, reg_cols,
           "id long, x1 float, x2 float, x3 float, x4 float, cat int, w double, y double", 400)

    # multiclass: 4 Gaussian blobs in a 4-d vector column; no kind on the label (inferred from values)
    centers = rng.normal(scale=2.5, size=(4, 4)).astype(np.float32)
    cls = rng.integers(0, 4, n)
    vec = centers[cls] + rng.normal(size=(n, 4)).astype(np.float32)
    mc = pd.DataFrame({"id": ids, "v": list(vec), "label": cls.astype(np.int32)})
    _split(spark, root, "mc", mc, [ColumnSpec(name="id", type="int64", role="id"),
                                   ColumnSpec(name="v", type="array<float32>", shape=(4,)),
                                   ColumnSpec(name="label", type="int32", role="label")],
           "id long, v array<float>, label int", 400)

    # multilabel: three 0/1 targets of the vector
    tags = np.stack([vec[:, 0] > 0, vec[:, 1] + vec[:, 2] > 0, vec[:, 3] > 1], 1).astype(np.int32)
    ml = pd.DataFrame({"id": ids, "v": list(vec), "tags": list(tags)})
    _split(spark, root, "ml", ml, [ColumnSpec(name="id", type="int64", role="id"),
                                   ColumnSpec(name="v", type="array<float32>", shape=(4,)),
                                   ColumnSpec(name="tags", type="array<int32>", role="label", kind="multilabel",
                                              cardinality=3)],
           "id long, v array<float>, tags array<int>", 400)

    # tokens: a generated corpus, label = more "positive" (2..11) than "negative" (12..21) words
    length, vocab = 12, 40
    toks = rng.integers(2, vocab, (n, length)).astype(np.int32)
    cut = rng.integers(4, length + 1, n)
    toks[np.arange(length)[None, :] >= cut[:, None]] = 0  # padding
    pos = ((toks >= 2) & (toks < 12)).sum(1)
    neg = ((toks >= 12) & (toks < 22)).sum(1)
    keep = pos != neg
    txt = pd.DataFrame({"id": ids[keep], "text": list(toks[keep]), "label": (pos > neg)[keep].astype(np.int32)})
    _split(spark, root, "txt", txt, [ColumnSpec(name="id", type="int64", role="id"),
                                     ColumnSpec(name="text", type="array<int32>", shape=(length,), kind="tokens",
                                                cardinality=vocab),
                                     ColumnSpec(name="label", type="int32", role="label", kind="binary")],
           "id long, text array<int>, label int", 300)
    return root


def _cfg(root: str, name: str, **kw) -> TrainConfig:
    base = dict(lakehouse=root, train_table=f"{name}_train", valid_table=f"{name}_valid", model="tabular_mlp",
                epochs=4, batch_size=32, lr=3e-3, num_ranks=2, local_mode=True, shuffle=True)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(lake):
    """One published model per task (local mode: 2 processes, a real gloo group)."""
    return {
        "regression": fit(_cfg(lake, "reg", model_kwargs={"dropout": 0.0}, model_name="reg", epochs=6),
                          progress=False),
        "multiclass": fit(_cfg(lake, "mc", model_name="mc"), progress=False),
        "multilabel": fit(_cfg(lake, "ml", model_name="ml"), progress=False),
        "tokens": fit(_cfg(lake, "txt", model="token_encoder", model_kwargs={"dim": 32, "layers": 1}, epochs=6,
                           model_name="txt"), progress=False),
    }


def test_each_task_trains_past_its_bar(trained):
    reg, mc, ml, txt = (trained[k].metrics for k in ("regression", "multiclass", "multilabel", "tokens"))
    print(f"regression {reg}\nmulticlass {mc}\nmultilabel {ml}\ntokens {txt}")
    # Bars well above what ignoring the features gives (r2 0, accuracy 0.25 / ~0.6 per label / ~0.5).
    assert reg["val_r2"] > 0.95 and reg["val_rmse"] < 0.5 and set(reg) >= {"val_mae", "val_loss"}
    assert mc["val_accuracy"] > 0.95 and mc["val_macro_f1"] > 0.95 and "val_top5_accuracy" not in mc
    assert ml["val_accuracy"] > 0.9 and ml["val_macro_f1"] > 0.85 and "val_subset_accuracy" in ml
    assert txt["val_accuracy"] > 0.9 and txt["val_auc"] > 0.95 and "val_log_loss" in txt


def test_the_task_comes_from_the_label_and_travels_with_the_model(lake, trained):
    from sparkdl.registry import get_model_version

    cfgs = {k: get_model_version(lake, k).model_config for k in ("reg", "mc", "ml", "txt")}
    assert [(c["task"], c["num_classes"]) for c in cfgs.values()] == [
        ("regression", None), ("multiclass", 4), ("multilabel", 3), ("binary", None)]
    assert cfgs["reg"]["id_columns"] == ["id"]
    kinds = {f["name"]: f["kind"] for f in cfgs["reg"]["features"]["features"]}
    assert kinds == {"x1": "numeric", "x2": "numeric", "x3": "numeric", "x4": "numeric", "cat": "categorical"}
    assert cfgs["txt"]["features"]["features"][0]["shape"] == [12]


def _in_process(root: str, name: str, table: str, ids: list[int]) -> dict[str, np.ndarray]:
    """The published model's outputs on rows read by the training loader, post-processed by its task."""
    from sparkdl.data import LoaderConfig, TableLoader
    from sparkdl.lakehouse import Lakehouse
    from sparkdl.predict import task_of
    from sparkdl.registry import load_model

    model, mv = load_model(root, name)
    with TableLoader(Lakehouse(root).table(table),
                     config=LoaderConfig(batch_size=100_000, shuffle=False, drop_last=False,
                                         columns=["id", *mv.model_config["input_columns"]])) as loader:
        batch = next(iter(loader))
    order = {int(i): k for k, i in enumerate(batch["id"])}
    index = torch.tensor([order[i] for i in ids])
    batch = {k: v.index_select(0, index) for k, v in batch.items()}
    with torch.inference_mode():
        out = task_of(mv.model_config).predictions(model(batch))
    return {k: np.asarray(v.to_pylist()) for k, v in out.items()}


@pytest.mark.parametrize("name, table, columns", [
    ("reg", "reg_valid", ["id", "prediction", "model_name", "model_version"]),
    ("mc", "mc_valid", ["id", "prediction", "score", "probabilities", "model_name", "model_version"]),
    ("ml", "ml_valid", ["id", "prediction", "probabilities", "model_name", "model_version"]),
    ("txt", "txt_valid", ["id", "prediction", "score", "model_name", "model_version"]),
])
def test_predictions_of_every_task_equal_in_process_outputs(spark, lake, trained, name, table, columns):
    from sparkdl.lakehouse import read_table
    from sparkdl.predict import PredictConfig, predict_table

    res = predict_table(PredictConfig(lakehouse=lake, model_name=name, input_table=table,
                                      output_table=f"{name}_preds", batch_size=64, mode="overwrite"), spark=spark)
    got = read_table(spark, res.output_uri).orderBy("id").toPandas()
    assert list(got.columns) == columns + ["input_version"]  # the id column (role id) kept by default
    want = _in_process(lake, name, table, got["id"].tolist())
    for col, values in want.items():
        np.testing.assert_allclose(np.stack(got[col].to_numpy()).astype(np.float64), values.astype(np.float64),
                                   rtol=1e-5, atol=1e-6, err_msg=col)
    if name == "mc":
        np.testing.assert_allclose(np.stack(got["probabilities"]).sum(1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", ["reg", "mc", "ml", "txt"])
def test_spark_evaluation_equals_the_validation_metrics_of_training(spark, lake, trained, name):
    """Scored by Spark and aggregated there, the metrics equal the ranks' all-reduced ones."""
    from sparkdl.lakehouse import Lakehouse, read_table
    from sparkdl.predict import evaluate_dataframe

    valid = read_table(spark, Lakehouse(lake).table(f"{name}_valid"))
    got = evaluate_dataframe(valid, lakehouse=lake, model_name=name)
    result = {"reg": trained["regression"], "mc": trained["multiclass"], "ml": trained["multilabel"],
              "txt": trained["tokens"]}[name]
    want = {k[4:]: v for k, v in result.metrics.items() if k.startswith("val_") and k != "val_loss"}
    assert got["rows"] == valid.count()
    assert set(want) <= set(got)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-4, abs=1e-5), k


# ----- custom loss, shipped to the executors; sample weights -------------------------------------
LOSS = textwrap.dedent('''
    def tripled_mse(outputs, labels):
        """Per-row losses: 3 x the squared error."""
        return 3 * (outputs - labels.to(outputs.dtype)) ** 2
''')


def test_custom_loss_from_a_local_module_reaches_the_executors(spark, lake, tmp_path):
    module_dir = tmp_path / "mods"
    module_dir.mkdir()
    (module_dir / "sparkdl_test_losses.py").write_text(LOSS)
    sys.path.insert(0, str(module_dir))
    try:
        # Barrier mode: the module is a local file, shipped with addPyFile without being asked.
        result = fit(_cfg(lake, "reg", task="regression", loss="sparkdl_test_losses:tripled_mse", epochs=1,
                          local_mode=False, weight_column="w", model_name="regw"), spark=spark, progress=False)
    finally:
        sys.path.remove(str(module_dir))
    m = result.metrics
    # The validation loss is the custom one (weighted by w); the weighted mse comes from the task's sums.
    assert m["val_loss"] == pytest.approx(3 * m["val_rmse"] ** 2, rel=1e-5)
    # Weighted metrics: the published model's in-process errors, weighted by w, give the same RMSE.
    from sparkdl.lakehouse import Lakehouse, read_table

    valid = read_table(spark, Lakehouse(lake).table("reg_valid")).select("id", "w", "y").toPandas()
    pred = _in_process(lake, "regw", "reg_valid", valid["id"].tolist())["prediction"]
    err2 = (pred - valid["y"].to_numpy()) ** 2
    weighted, plain = np.sqrt(np.average(err2, weights=valid["w"])), np.sqrt(err2.mean())
    assert m["val_rmse"] == pytest.approx(weighted, rel=1e-4) and abs(weighted - plain) > 1e-3


def test_unimportable_model_module_fails_before_launch_naming_the_fix(spark, lake):
    ghost = types.ModuleType("sparkdl_ghost_models")  # like a class defined in a notebook: no file to ship
    from sparkdl.models import TabularMLP

    ghost.factory = lambda features, **kw: TabularMLP(features, **kw)
    sys.modules["sparkdl_ghost_models"] = ghost
    try:
        with pytest.raises(RuntimeError, match=r"cannot import the model/loss module \(sparkdl_ghost_models.*"
                                               r"--py-files.*addPyFile"):
            fit(_cfg(lake, "reg", model="sparkdl_ghost_models:factory", local_mode=False, run_id="ghost"),
                spark=spark, progress=False)
    finally:
        del sys.modules["sparkdl_ghost_models"]
    assert not (Path(lake) / "runs" / "ghost").exists()


# ----- labels and features, checked before launch --------------------------------------------------
@pytest.fixture(scope="module")
def bad_lake(spark, tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("bad-lake"))
    n = 64
    rng = np.random.default_rng(1)
    base = {"id": np.arange(n, dtype=np.int64), "x": rng.normal(size=n).astype(np.float32)}
    id_x = [ColumnSpec(name="id", type="int64", role="id"), ColumnSpec(name="x", type="float32")]

    def table(name, extra: dict, cols: list[ColumnSpec], ddl: str) -> None:
        _write(spark, root, name, pd.DataFrame({**base, **extra}), id_x + cols, "id long, x float, " + ddl)

    lab = np.arange(n) % 2
    table("binary_bad", {"label": np.where(np.arange(n) == 5, 2, lab).astype(np.int32)},
          [ColumnSpec(name="label", type="int32", role="label", kind="binary")], "label int")
    table("class_bad", {"label": (np.arange(n) % 5).astype(np.int32)},
          [ColumnSpec(name="label", type="int32", role="label", kind="multiclass", cardinality=3)], "label int")
    tags = [[0, 1, 0]] * (n - 2) + [[0, 1], [0, 2, 1]]
    table("tags_bad", {"label": tags},
          [ColumnSpec(name="label", type="array<int32>", role="label", kind="multilabel", cardinality=3)],
          "label array<int>")
    table("target_nan", {"label": np.where(np.arange(n) == 3, np.nan, np.where(np.arange(n) == 4, np.inf, 1.5))},
          [ColumnSpec(name="label", type="float64", role="label")], "label double")
    table("label_null", {"label": pd.Series([None] + [1] * (n - 1), dtype=object)},
          [ColumnSpec(name="label", type="int32", role="label", kind="binary")], "label int")
    table("continuous", {"label": rng.normal(size=n)},
          [ColumnSpec(name="label", type="float64", role="label")], "label double")
    ok = [ColumnSpec(name="label", type="int32", role="label", kind="binary")]
    table("string_feature", {"label": lab.astype(np.int32), "city": ["a"] * n},
          ok + [ColumnSpec(name="city", type="string")], "label int, city string")
    x_nan = base["x"].copy()
    x_nan[[1, 7, 9]] = np.nan
    x_nan[11] = np.inf
    _write(spark, root, "feature_nan", pd.DataFrame({**base, "x": x_nan, "label": lab.astype(np.int32)}),
           id_x + ok, "id long, x float, label int")
    table("id_range", {"label": lab.astype(np.int32), "c": (np.arange(n) % 6).astype(np.int32)},
          ok + [ColumnSpec(name="c", type="int32", kind="categorical", cardinality=4)], "label int, c int")
    return root


@pytest.mark.parametrize("table, kw, message", [
    ("binary_bad", {}, r"label column 'label' .*binary labels must be 0 or 1, but it holds e.g. 2"),
    ("class_bad", {}, r"class ids 0..2 \(num_classes=3\), but it holds e.g. 3, 4 .*pass num_classes="),
    ("tags_bad", {}, r"arrays of 3 values, each 0 or 1, but it holds e.g. \[0, 1\], \[0, 2, 1\]"),
    ("target_nan", {}, r"regression targets must be finite numbers, but it holds e.g. nan, inf"),
    ("label_null", {}, r"label column 'label' .* has 1 null values"),
    # a binary model on a continuous label: refused instead of training garbage
    ("continuous", {"task": "binary"}, r"binary labels must be 0 or 1, but it holds e.g. -?\d"),
    ("string_feature", {}, r"feature column 'city' .* holds string.*encode it in the ETL.*feature_columns="),
    ("feature_nan", {}, r"'x' has 3 NaN, 1 inf and 0 null values in 64 rows"),
    ("id_range", {}, r"'c' holds ids 0..5 but its cardinality is 4"),
])
def test_bad_labels_and_features_fail_before_launch_naming_the_column(bad_lake, table, kw, message):
    cfg = TrainConfig(lakehouse=bad_lake, train_table=table, model="tabular_mlp", local_mode=True,
                      run_id=f"bad-{table}", **kw)
    with pytest.raises(DataValidationError, match=message) as info:
        fit(cfg, progress=False)
    assert isinstance(info.value, NonRetryableError)  # a relaunch would repeat it: never retried
    assert not (Path(bad_lake) / "runs" / f"bad-{table}").exists()


def test_an_unlabelled_continuous_label_is_inferred_as_regression(bad_lake):
    result = fit(TrainConfig(lakehouse=bad_lake, train_table="continuous", model="tabular_mlp", local_mode=True,
                             num_ranks=1, max_steps=2, batch_size=16), progress=False)
    assert result.steps == 2


# ----- images: channels first, palette colours, scored as trained ---------------------------------
def test_channels_first_palette_images_are_scored_exactly_as_trained(spark, tmp_path):
    from PIL import Image

    from sparkdl.data import LoaderConfig, TableLoader
    from sparkdl.lakehouse import Lakehouse, read_table
    from sparkdl.predict import PredictConfig, predict_table
    from sparkdl.registry import load_model

    root = str(tmp_path / "lake")
    rng = np.random.default_rng(2)
    palette = rng.integers(0, 256, 3 * 256).astype(np.uint8).tolist()
    rows = []
    for i in range(96):
        img = Image.fromarray(rng.integers(0, 8, (6, 10)).astype(np.uint8), mode="P")
        img.putpalette(palette)  # palette PNG: decodes to RGB through the palette
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        rows.append((i, buf.getvalue(), int(i % 3)))
    cols = [ColumnSpec(name="id", type="int64", role="id"),
            ColumnSpec(name="img", type="binary", codec="png", shape=(3, 6, 10)),  # channels first
            ColumnSpec(name="label", type="int32", role="label", kind="multiclass", cardinality=3)]
    _write(spark, root, "pal", pd.DataFrame(rows, columns=["id", "img", "label"]), cols,
           "id long, img binary, label int")
    fit(TrainConfig(lakehouse=root, train_table="pal", model="image_cnn", model_kwargs={"channels": 4},
                    local_mode=True, num_ranks=1, max_steps=3, batch_size=16, model_name="pal"), progress=False)
    res = predict_table(PredictConfig(lakehouse=root, model_name="pal", input_table="pal", output_table="pal_preds"),
                        spark=spark)
    got = read_table(spark, res.output_uri).orderBy("id").toPandas()
    model, _ = load_model(root, "pal")
    with TableLoader(Lakehouse(root).table("pal"), config=LoaderConfig(batch_size=96, shuffle=False)) as loader:
        batch = next(iter(loader))  # the training decode: [3, 6, 10] RGB through the palette
    assert batch["img"].shape == (96, 3, 6, 10)
    with torch.inference_mode():
        prob = torch.softmax(model(batch), -1)
    order = np.argsort(batch["id"].numpy())
    np.testing.assert_allclose(np.stack(got["probabilities"]), prob.numpy()[order], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["prediction"], prob.argmax(-1).numpy()[order])


def test_train_job_takes_the_objective_flags_and_reports_bad_labels_in_one_line(lake, bad_lake, capsys):
    import runpy

    main = runpy.run_path(str(Path(__file__).resolve().parents[1] / "jobs" / "train.py"))["main"]
    common = ["--model", "tabular_mlp", "--local-mode", "--num-ranks", "1", "--max-steps", "2", "--batch-size", "64"]
    assert main(["--lakehouse", lake, "--train-table", "reg_train", "--valid-table", "reg_valid",
                 "--task", "regression", "--loss", "huber", "--weight-column", "w", *common]) == 0
    out = capsys.readouterr().out
    assert '"val_rmse"' in out and '"val_r2"' in out
    assert main(["--lakehouse", bad_lake, "--train-table", "class_bad", *common]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("sparkdl train failed: label column 'label' of ") and "e.g. 3, 4" in err[0]
