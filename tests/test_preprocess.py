"""The generic preprocessing engine on synthetic data: every analyzer against numpy/pandas on
the same rows, every transform encoded alike in Spark and pandas, the spec file, config errors,
and the ETL of a generated CSV dataset (rejects accounting, joins, time split, label tasks)."""

from __future__ import annotations

import io
import json
import re
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sparkdl.errors import MissingColumnsError
from sparkdl.etl import ETLConfig, run_etl_config
from sparkdl.etl.analyzers import VocabRequest, count_jobs, fit_images, fit_numeric, fit_vocabularies
from sparkdl.lakehouse import Lakehouse, snapshot
from sparkdl.preprocess import PreprocessingSpec, fit_statistics, load_spec_for_table, save_spec, spec_sha256

pytestmark = pytest.mark.integration

N = 4000
WORDS = ["delay", "storm", "late", "ok", "fine", "gate", "crew", "fuel", "bird", "snow"]


def _png(arr: np.ndarray, mode: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def synthetic() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    u = rng.normal(3.0, 2.0, N)
    v = np.where(rng.random(N) < 0.1, np.nan, rng.exponential(5.0, N))
    cat = rng.choice(["x", "y", "z", "w", "rare", "é"], N, p=[0.4, 0.3, 0.2, 0.05, 0.0004, 0.0496]).astype(object)
    cat[rng.random(N) < 0.05] = None
    text = [" ".join(rng.choice(WORDS, rng.integers(0, 12), p=np.linspace(2, 0.2, 10) / np.linspace(2, 0.2, 10).sum()))
            + rng.choice(["", "!", ", Delay.", "  UNSEEN"]) for _ in range(N)]
    text = [t if i % 17 else None for i, t in enumerate(text)]
    return pd.DataFrame({
        "rid": np.arange(N, dtype=np.int64),
        "u": u, "v": v, "k": rng.integers(0, 40, N).astype(np.int64), "c": cat, "text": text,
        "cls": rng.choice(["ant", "bee", "cat"], N),
        "tags": ["|".join(sorted(set(rng.choice(["a", "b", "c", "d"], rng.integers(0, 3))))) for _ in range(N)],
    })


@pytest.fixture(scope="session")
def synthetic_df(spark, synthetic):
    return spark.createDataFrame(synthetic).selectExpr("*", "nanvl(v, null) as v2").drop("v").withColumnRenamed("v2", "v")


# ---------------------------------------------------------------------------------------
# Analyzers == numpy / pandas on the same rows
# ---------------------------------------------------------------------------------------
def test_numeric_pass_matches_numpy_and_is_one_job(spark, synthetic, synthetic_df):
    jobs: dict[str, int] = {}
    with count_jobs(spark, jobs, "numeric"):
        stats = fit_numeric(synthetic_df, ["u", "v", "k"], quantiles={
            "u_q": ("u", [0.1, 0.25, 0.5, 0.75, 0.9], 10_000), "v_q": ("v", [0.5], 100)})
    assert jobs == {"numeric": 1}  # all statistics and quantiles in one Spark job
    assert stats.rows == N
    for c in ("u", "v", "k"):
        x = synthetic[c].dropna().astype(float).to_numpy()
        st = stats.columns[c]
        assert st["count"] == len(x)
        assert st["mean"] == pytest.approx(x.mean(), rel=1e-12)
        assert st["std"] == pytest.approx(x.std(ddof=0), rel=1e-12)
        assert (st["min"], st["max"]) == (x.min(), x.max())
    # percentile_approx with accuracy A: the returned value's rank is within n/A of p*n.
    for name, col, probs, acc in (("u_q", "u", [0.1, 0.25, 0.5, 0.75, 0.9], 10_000), ("v_q", "v", [0.5], 100)):
        x = np.sort(synthetic[col].dropna().to_numpy())
        for p, q in zip(probs, stats.quantiles[name]):
            rank = np.searchsorted(x, q, side="right")
            assert abs(rank - p * len(x)) <= len(x) / acc + 1, (name, p)


def test_fit_statistics_names_an_empty_column(spark):
    df = spark.createDataFrame([(1.0, None), (2.0, None)], "a double, b double")
    with pytest.raises(ValueError, match="column 'b' has no non-null values"):
        fit_statistics(df, ["a", "b"])


def _vocab(values, min_count=1, top_k=None):
    counts = pd.Series([v for v in values if v is not None]).value_counts()
    kept = sorted((v for v in counts.index if counts[v] >= min_count), key=lambda v: (-counts[v], v))
    return kept[:top_k] if top_k else kept


def test_vocabulary_pass_matches_pandas_and_is_one_job(spark, synthetic, synthetic_df):
    from sparkdl.etl.transforms import tokenize

    jobs: dict[str, int] = {}
    requests = [
        VocabRequest(name="c", input="c", min_count=100),
        VocabRequest(name="c_top2", input="c", top_k=2),
        VocabRequest(name="k", input="k", min_count=90),
        VocabRequest(name="words", input="text", kind="tokens", min_count=5),
        VocabRequest(name="tags", input="tags", kind="items", separator="|"),
    ]
    with count_jobs(spark, jobs, "vocabulary"):
        vocab = fit_vocabularies(synthetic_df, requests)
    assert jobs == {"vocabulary": 1}
    assert vocab["c"] == _vocab(synthetic.c, 100) and "rare" not in vocab["c"]
    assert vocab["c_top2"] == _vocab(synthetic.c)[:2] == ["x", "y"]
    assert vocab["k"] == _vocab(synthetic.k.astype(str), 90)
    words = [w for t in synthetic.text for w in tokenize(t)]
    assert vocab["words"] == _vocab(words, 5) and "unseen" in vocab["words"] and "delay." not in vocab["words"]
    assert vocab["tags"] == _vocab([t for s in synthetic.tags for t in s.split("|") if t])


def test_vocabulary_ties_are_broken_by_value(spark):
    df = spark.createDataFrame([(v,) for v in ["b", "a", "c", "b", "a", "c", "d"]], "x string")
    assert fit_vocabularies(df, [VocabRequest(name="x", input="x", top_k=2)]) == {"x": ["a", "b"]}


def test_image_statistics_match_numpy(spark):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (30, 6, 5, 3), dtype=np.uint8)
    df = spark.createDataFrame([(_png(im, "RGB"), i % 3 != 0) for i, im in enumerate(imgs)], "img binary, _is_train boolean")
    t = {"type": "image", "input": "img", "output": "img", "codec": "png", "shape": [6, 5, 3], "resize": None,
         "normalize": True}
    got = fit_images(df, {"img": t})["img"]
    train = imgs[[i for i in range(30) if i % 3 != 0]].reshape(-1, 3) / 255.0
    np.testing.assert_allclose(got["mean"], train.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(got["std"], train.std(axis=0), rtol=1e-9)


# ---------------------------------------------------------------------------------------
# Every transform: Spark encoding == pandas encoding
# ---------------------------------------------------------------------------------------
def _spec(vocab_c, words) -> PreprocessingSpec:
    return PreprocessingSpec(
        dataset="toy",
        transforms=[
            {"type": "standardize", "input": "u", "output": "u_z", "mean": 3.0, "std": 2.0},
            {"type": "standardize", "input": "k", "output": "k_z", "mean": 1.0, "std": 0.0},
            {"type": "minmax", "input": "v", "output": "v_mm", "min": 0.0, "max": 20.0},
            {"type": "numeric", "input": "v", "output": "v_f", "fill": -1.0},
            {"type": "bucketize", "input": "u", "output": "u_bucket", "boundaries": [1.0, 3.0, 5.0]},
            {"type": "vocabulary", "input": "c", "output": "c_id", "vocab": vocab_c},
            {"type": "vocabulary", "input": "k", "output": "k_id", "vocab": ["3", "7"]},
            {"type": "hash", "input": "c", "output": "c_hash", "num_buckets": 7},
            {"type": "tokens", "input": "text", "output": "text_tokens", "vocab": words, "length": 6},
        ],
        label={"column": "label", "source": "cls", "task": "multiclass", "classes": ["ant", "bee"]},
        id_column="rid",
    )


def _assert_same(got: pd.DataFrame, want: pd.DataFrame, columns: list[str]) -> None:
    for c in columns:
        g, w = list(got[c]), list(want[c])
        assert len(g) == len(w), c
        for i, (a, b) in enumerate(zip(g, w)):
            if isinstance(a, (list, np.ndarray)) or isinstance(b, (list, np.ndarray)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{c} row {i}")
            elif pd.isna(b):
                assert a is None or pd.isna(a), (c, i, a)
            else:
                assert a == b and type(a) is not type(None), (c, i, a, b)


def test_spark_and_pandas_encode_every_transform_alike(spark, synthetic, synthetic_df):
    spec = _spec(["x", "y", "é"], ["delay", "storm", "unseen"])
    got = spec.encode(synthetic_df).orderBy("rid").toPandas()
    want = spec.encode_pandas(synthetic.assign(v=synthetic.v)).sort_values("rid").reset_index(drop=True)
    _assert_same(got, want, spec.features + ["label"])
    # Spot checks of the documented rules.
    row = want.iloc[0]
    assert row.u_z == np.float32((synthetic.u[0] - 3.0) / 2.0)
    assert set(want.k_z) <= {np.float32(k - 1.0) for k in range(40)}  # std 0 divides by 1
    assert (want.v_f[synthetic.v.isna()] == -1.0).all() and (want.v_mm[synthetic.v.isna()] == 0.0).all()
    assert want.c_id[synthetic.c.isna()].eq(0).all() and want.c_id[synthetic.c == "rare"].eq(0).all()
    assert want.c_hash[synthetic.c == "x"].eq(zlib.crc32(b"x") % 7 + 1).all()
    assert list(want.text_tokens[synthetic.text.isna().idxmax()]) == [0] * 6
    assert want.u_bucket[synthetic.u == synthetic.u.min()].iloc[0] == 1
    assert want.label.isna().sum() == (synthetic.cls == "cat").sum()  # unknown class: null label


def test_encoding_edge_values_alike(spark):
    spec = _spec(["1", "7"], ["a"])
    pdf = pd.DataFrame({
        "rid": [1, 2, 3, 4, 5], "u": [3.0, 1.0, float("nan"), 5.0, float("inf")], "v": [None, 20.0, -5.0, 1.0, 2.0],
        "k": [7, 3, 1, 7, 0], "c": ["1", "7", None, "", "ÿ"],
        "text": ["A a a a a a a a", "", "b,,a", None, "  a\tb\nA"], "cls": ["ant", "bee", None, "ant", "x"],
    })
    got = spec.encode(spark.createDataFrame(pdf)).toPandas()
    want = spec.encode_pandas(pdf)
    _assert_same(got, want, spec.features + ["label"])
    assert list(want.u_bucket) == [3, 2, 0, 4, 4]  # boundaries <= value, +1; NaN -> 0
    assert list(want.text_tokens[0]) == [2] * 6 and list(want.text_tokens[2]) == [1, 2, 0, 0, 0, 0]


@pytest.mark.parametrize("label, values", [
    ({"task": "binary", "threshold": 15.0, "op": ">="}, [15.0, 14.0, None, 100.0]),
    ({"task": "binary", "positive": ["yes", 1]}, ["yes", "no", None, "1"]),
    ({"task": "binary"}, [1.0, 0.0, 2.0, None]),
    ({"task": "regression"}, [1.5, -2.0, None, float("nan")]),
    ({"task": "multiclass", "num_classes": 3}, [0.0, 2.0, 3.0, 1.5]),
    ({"task": "multilabel", "classes": ["a", "b", "c"], "separator": "|"}, ["a|c", "", None, " b |z"]),
], ids=["threshold", "positive", "zero-one", "regression", "class-ids", "multilabel"])
def test_labels_encode_alike(spark, label, values):
    spec = PreprocessingSpec(dataset="t", transforms=[{"type": "numeric", "input": "x", "output": "x_f", "fill": 0.0}],
                             label={"column": "label", "source": "y", **label})
    pdf = pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0], "y": values})
    schema = "x double, y " + ("double" if all(isinstance(v, float) or v is None for v in values) else "string")
    got = spec.encode(spark.createDataFrame(pdf, schema)).toPandas()
    _assert_same(got, spec.encode_pandas(pdf), ["label"])


def test_image_transform_encodes_alike(spark):
    rng = np.random.default_rng(2)
    grey = [_png(rng.integers(0, 256, (8, 6), dtype=np.uint8), "L") for _ in range(4)]
    pdf = pd.DataFrame({"img": grey + [None]})
    for t in (
        {"type": "image", "input": "img", "output": "small", "codec": "png", "shape": [8, 6], "resize": [4, 3],
         "normalize": False},
        {"type": "image", "input": "img", "output": "z", "codec": "png", "shape": [8, 6, 3], "resize": [4, 4],
         "normalize": True, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.1, 0.0]},
    ):
        spec = PreprocessingSpec(dataset="img", transforms=[t])
        got = spec.encode(spark.createDataFrame(pdf, "img binary")).toPandas()
        want = spec.encode_pandas(pdf)
        _assert_same(got, want, [t["output"]])
        col = spec.columns()[0]
        if t["normalize"]:
            assert (col.kind, col.type, col.shape) == ("vector", "array<float32>", (4, 4, 3)) and len(want.z[0]) == 48
        else:
            from PIL import Image

            assert (col.kind, col.codec, col.shape) == ("image", "png", (4, 3))
            assert Image.open(io.BytesIO(want.small[0])).size == (3, 4)


# ---------------------------------------------------------------------------------------
# The spec file
# ---------------------------------------------------------------------------------------
def test_spec_round_trip_views_and_format_1(tmp_path):
    spec = _spec(["x"], ["a"])
    assert PreprocessingSpec.from_json(spec.to_json()) == spec
    assert spec.numeric_features == ["u_z", "k_z", "v_mm", "v_f"]
    assert spec.categorical_features == ["u_bucket", "c_id", "k_id", "c_hash"]
    assert spec.cardinalities == {"u_bucket": 5, "c_id": 2, "k_id": 3, "c_hash": 8, "text_tokens": 3}
    assert spec.raw_columns == ["u", "k", "v", "c", "text"]
    assert [c.role for c in spec.columns()] == ["id"] + ["feature"] * 9 + ["label"]
    with pytest.raises(ValueError, match=r"unknown keys \['extra'\]"):
        PreprocessingSpec.from_json(json.dumps({**json.loads(spec.to_json()), "extra": 1}))
    with pytest.raises(ValueError, match=r"transforms\[0\] \('x_z'\) lacks keys \['std'\]"):
        PreprocessingSpec(dataset="t", transforms=[{"type": "standardize", "input": "x", "output": "x_z", "mean": 0.0}])
    old = {"dataset": "flights", "label": {"column": "label", "source": "d", "threshold": 15.0},
           "numeric": {"x": {"mean": 1.0, "std": 2.0, "output": "x_z"}},
           "categorical": {"c": {"vocab": ["a"], "min_count": 1, "output": "c_id"}}, "source": {}}
    legacy = PreprocessingSpec.from_json(json.dumps(old))  # specs published before format 2 still load
    assert legacy.features == ["x_z", "c_id"] and legacy.label["task"] == "binary" and legacy.id_column == "flight_id"
    with pytest.raises(MissingColumnsError, match=r"needs columns \['c'\]"):
        legacy.encode_pandas(pd.DataFrame({"x": [1.0]}))


def test_spec_files_are_content_addressed_and_never_replaced(tmp_path):
    spec = _spec(["x"], ["a"])
    path, sha = save_spec(spec, str(tmp_path))
    assert path == f"{Lakehouse(str(tmp_path)).spec_dir('toy')}/{sha[:16]}.json"
    assert spec_sha256(Path(path).read_text()) == sha
    before = Path(path).stat().st_mtime_ns
    assert save_spec(spec, str(tmp_path)) == (path, sha) and Path(path).stat().st_mtime_ns == before
    Path(path).write_text(Path(path).read_text() + " ")
    with pytest.raises(RuntimeError, match="edited by hand"):
        save_spec(spec, str(tmp_path))


# ---------------------------------------------------------------------------------------
# Config errors, named before Spark starts
# ---------------------------------------------------------------------------------------
BASE = {
    "dataset": "toy", "sources": {"rows": {"format": "csv", "path": "rows.csv"}}, "id": {"column": "rid"},
    "split": {"ratios": {"train": 0.8, "valid": 0.2}}, "label": {"source": "y", "task": "binary"},
    "features": [{"input": "x", "type": "standardize"}],
}


@pytest.mark.parametrize("change, message", [
    ({"features": [{"input": "x", "type": "zscore"}]}, r"config.features\[0\]: type 'zscore' is not one of"),
    ({"split": {"ratios": {"train": 0.8, "valid": 0.3}}}, r"config.split: ratios must be fractions .* sum to 1"),
    ({"label": {"source": "y", "task": "ranking"}}, r"config.label: task 'ranking' is not one of"),
    ({"labels": {}}, r"config: unknown keys \['labels'\]"),
    ({"features": [{"input": "x", "type": "bucketize"}]}, r"bucketize needs num_buckets >= 2"),
    ({"features": [{"input": "x", "type": "tokens"}]}, r"tokens needs length >= 1"),
    ({"features": [{"input": "x", "type": "standardize", "output": "label"}]}, r"output columns \['label'\]"),
    ({"sources": {"rows": {"format": "xlsx", "path": "a"}}}, r"config.sources.rows: format 'xlsx'"),
    ({"columns": {"x": "money"}}, r"columns\['x'\]: type 'money' is not one of"),
], ids=["transform", "ratios", "task", "unknown-key", "buckets", "tokens", "dupe-output", "format", "parse-type"])
def test_config_errors_name_the_key_and_fix(change, message):
    with pytest.raises(ValueError, match=message):
        ETLConfig.from_dict({**BASE, **change})


# ---------------------------------------------------------------------------------------
# A generated CSV dataset end to end through the engine
# ---------------------------------------------------------------------------------------
CONFIG = """
dataset: trips
sources:
  trips:
    format: csv
    path: trips.csv
    options: {header: true}
  zones: {format: json, path: zones.json}
id: {column: trip_id, hash_of: [vendor, pickup, zone]}
columns: {pickup: timestamp, distance: double, passengers: int, tip: double, w: double}
rules:
  required: [vendor, pickup]
  ranges: {passengers: {min: 1, max: 6}}
  allowed: {vendor: [A, B, C]}
  checks: [{reason: too_far, sql: "distance < 100"}]
joins:
  - {source: zones, keys: {zone: zone}, how: inner, columns: {borough: string, zone_area: double}}
derive_after_joins: {density: "passengers / zone_area"}
split: {time_column: pickup, valid_from: "2024-03-01", test_from: "2024-04-01"}
label: {source: tip, task: regression}
weight: w
features:
  - {input: distance, type: bucketize, num_buckets: 5}
  - {input: density, type: standardize}
  - {input: borough, type: vocabulary, top_k: 2}
  - {input: vendor, type: hash, num_buckets: 4}
  - {input: note, type: tokens, length: 3}
"""


@pytest.fixture(scope="session")
def trips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trips")
    rng = np.random.default_rng(3)
    n = 600
    rows = pd.DataFrame({
        "vendor": rng.choice(["A", "B", "C"], n), "pickup": pd.date_range("2024-01-01", periods=n, freq="5h").astype(str),
        "zone": rng.choice(["z1", "z2", "z3", "z4"], n), "distance": rng.exponential(3, n).round(2),
        "passengers": rng.integers(1, 5, n), "tip": rng.normal(2, 1, n).round(2), "w": rng.random(n).round(3),
        "note": rng.choice(["late pickup", "fast", "fast ride", ""], n),
    }).astype(str)
    bad = {0: ("vendor", "Z", "not_allowed:vendor"), 1: ("passengers", "9", "out_of_range:passengers"),
           2: ("distance", "far", "unparseable:distance"), 3: ("tip", "", "missing_label"),
           4: ("distance", "150", "too_far"), 5: ("zone", "z9", "no_match:zones"), 6: ("w", "-1", "invalid_weight"),
           7: ("pickup", "", "missing:pickup")}
    for i, (col, value, _) in bad.items():
        rows.loc[i, col] = value
    rows.to_csv(folder / "trips.csv", index=False)
    (folder / "zones.json").write_text("\n".join(json.dumps(z) for z in [
        {"zone": "z1", "borough": "north", "zone_area": 2.0}, {"zone": "z2", "borough": "south", "zone_area": 4.0},
        {"zone": "z3", "borough": "south", "zone_area": 1.0}, {"zone": "z4", "borough": "east", "zone_area": 8.0},
        {"zone": "z4", "borough": "east", "zone_area": 8.0}]))  # a repeated key must not duplicate trips
    (folder / "trips.yaml").write_text(CONFIG)
    return folder, rows, {i: reason for i, (_, _, reason) in bad.items()}


def test_generated_dataset_end_to_end(spark, trips, tmp_path):
    folder, rows, bad = trips
    config = ETLConfig.from_yaml(folder / "trips.yaml")
    res = run_etl_config(config, spark=spark, lakehouse=str(tmp_path))
    assert res.rows_in == len(rows) == res.rows_out + res.rows_rejected
    assert res.reject_reasons == {reason: 1 for reason in bad.values()}
    assert set(res.rows_per_split) == {"train", "valid", "test"} and sum(res.rows_per_split.values()) == res.rows_out
    assert res.analyzer_jobs == {"numeric": 1, "vocabulary": 1}
    lh = Lakehouse(str(tmp_path))
    rejects = _table(lh, "trips_rejects")
    for i, reason in bad.items():
        hit = rejects[rejects.reason == reason]
        assert len(hit) == 1, reason
        original = rows.iloc[i]
        assert [hit.iloc[0][c] or "" for c in rows.columns] == list(original), reason  # raw strings kept
    # The same rows, joined and derived in pandas: split by time, fitted on train only.
    raw = rows.drop(index=list(bad)).merge(pd.DataFrame({
        "zone": ["z1", "z2", "z3", "z4"], "borough": ["north", "south", "south", "east"],
        "zone_area": [2.0, 4.0, 1.0, 8.0]}), on="zone")
    raw["density"] = raw.passengers.astype(float) / raw.zone_area
    raw["split"] = np.where(raw.pickup < "2024-03-01", "train", np.where(raw.pickup < "2024-04-01", "valid", "test"))
    assert res.rows_per_split == raw.split.value_counts().to_dict()
    spec = load_spec_for_table(lh.table("trips_train"))
    fit = raw[raw.split == "train"]
    assert spec.source["fit_rows"] == len(fit)
    assert spec.transform("borough_id")["vocab"] == _vocab(fit.borough)[:2]
    assert spec.transform("density_z")["mean"] == pytest.approx(fit.density.mean(), rel=1e-12)
    assert spec.transform("density_z")["std"] == pytest.approx(fit.density.std(ddof=0), rel=1e-12)
    schema = {c.name: c for c in snapshot(lh.table("trips_train")).dataset_schema.columns}
    assert (schema["trip_id"].role, schema["w"].role, schema["label"].kind) == ("id", "weight", "regression")
    assert (schema["note_tokens"].kind, schema["note_tokens"].shape) == ("tokens", (3,))
    assert schema["borough_id"].cardinality == 3 and schema["vendor_hash"].cardinality == 5
    # The spec re-encodes the raw rows in pandas exactly as the tables hold them (row order aside).
    enc = spec.encode_pandas(raw)
    got = pd.concat([_table(lh, f"trips_{s}") for s in ("train", "valid", "test")])
    for c in ("density_z", "borough_id", "vendor_hash", "distance_bucket", "label", "w"):
        np.testing.assert_array_equal(np.sort(enc[c].to_numpy()), np.sort(got[c].to_numpy()), err_msg=c)
    assert sorted(map(tuple, enc.note_tokens)) == sorted(map(tuple, got.note_tokens))


def _table(lh: Lakehouse, name: str) -> pd.DataFrame:
    from deltalake import DeltaTable

    return DeltaTable(lh.table(name)).to_pandas()


def test_missing_source_columns_are_named_before_work(spark, tmp_path):
    (tmp_path / "rows.csv").write_text("rid,x\n1,2\n")
    config = ETLConfig.from_dict({**BASE, "config_dir": str(tmp_path)})
    with pytest.raises(ValueError, match=r"label.source 'y' must be a column of the main source"):
        run_etl_config(config, spark=spark, lakehouse=str(tmp_path / "lh"))
    config = ETLConfig.from_dict({**BASE, "config_dir": str(tmp_path), "rules": {"required": ["x", "nope"]},
                                  "label": {"source": "x", "task": "regression"}})
    with pytest.raises(MissingColumnsError, match=r"main source 'rows'.*needs columns \['nope'\]"):
        run_etl_config(config, spark=spark, lakehouse=str(tmp_path / "lh"))


def test_readme_bring_your_own_data_config_runs_end_to_end(spark, tmp_path):
    """The README's example config, verbatim, on generated files: rows in = out + rejected,
    every declared column kind, a spec that re-encodes the raw rows."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Bring your own data"):]
    text = section[section.index("```yaml\n") + 8:section.index("```", section.index("```yaml\n") + 8)]
    (tmp_path / "churn.yaml").write_text(text)
    (tmp_path / "data").mkdir()
    rng = np.random.default_rng(4)
    n = 800
    plans = pd.DataFrame({"plan": ["basic", "plus", "pro", "team"], "tier": ["low", "mid", "high", "high"],
                          "list_price": [10.0, 20.0, 40.0, 80.0]})
    plans.to_csv(tmp_path / "data" / "plans.csv", index=False)
    plan = rng.choice(plans.plan, n)
    fee = plans.set_index("plan").list_price[plan].to_numpy() * rng.uniform(0.7, 1.0, n)
    calls = rng.poisson(2, n)
    customers = pd.DataFrame({
        "customer_id": np.arange(1, n + 1), "signup_date": pd.date_range("2022-01-01", periods=n, freq="D").date,
        "plan": plan, "monthly_fee": fee.round(2), "support_calls": calls, "tenure_months": rng.integers(1, 60, n),
        "country": rng.choice(["DE", "FR", "US", "BR", "IN"], n),
        "churned": np.where(rng.random(n) < 0.2 + 0.1 * (calls > 3), "yes", "no"),
    })
    customers.loc[0, "churned"] = "maybe"
    customers.loc[1, "monthly_fee"] = -5
    customers.loc[2, "plan"] = None
    customers.to_csv(tmp_path / "data" / "customers.csv", index=False)

    config = ETLConfig.from_yaml(tmp_path / "churn.yaml")
    res = run_etl_config(config, spark=spark, lakehouse=str(tmp_path / "lh"))
    assert res.rows_in == n == res.rows_out + res.rows_rejected
    assert res.reject_reasons == {"not_allowed:churned": 1, "out_of_range:monthly_fee": 1, "missing:plan": 1}
    assert config.train["model"] == "tabular_mlp"
    lh = Lakehouse(str(tmp_path / "lh"))
    schema = snapshot(lh.table("churn_train")).dataset_schema
    kinds = {c.name: (c.role, c.kind, c.cardinality) for c in schema.columns}
    assert kinds["customer_id"][0] == "id" and kinds["label"] == ("label", "binary", None)
    assert kinds["tier_id"] == ("feature", "categorical", 4) and kinds["country_hash"] == ("feature", "categorical", 65)
    assert all(kinds[c][1] == "numeric" for c in ("monthly_fee_z", "discount_z", "support_calls_mm"))
    spec = load_spec_for_table(lh.table("churn_train"))
    train = _table(lh, "churn_train")
    good = customers.drop(index=[0, 1, 2]).merge(plans, on="plan")
    good["discount"] = good.list_price - good.monthly_fee
    enc = spec.encode_pandas(good).set_index("customer_id").loc[train.customer_id]
    for c in ("monthly_fee_z", "tenure_months_bucket", "plan_id", "tier_id", "country_hash", "label"):
        np.testing.assert_array_equal(enc[c].to_numpy(), train[c].to_numpy(), err_msg=c)
    np.testing.assert_allclose(enc.discount_z.to_numpy(), train.discount_z.to_numpy(), rtol=1e-6)


# ----- errors that point at the fix (issue 20) -----------------------------------------------------------
def _toy(tmp_path, csv: str, **changes) -> ETLConfig:
    (tmp_path / "rows.csv").write_text(csv)
    return ETLConfig.from_dict({**BASE, "config_dir": str(tmp_path), **changes})


def test_standardize_of_a_string_column_names_the_column_and_the_fix(spark, tmp_path):
    config = _toy(tmp_path, "rid,x,y\n1,red,1\n2,blue,0\n3,red,1\n", columns={"x": "string"})
    with pytest.raises(ValueError) as info:
        run_etl_config(config, spark=spark, lakehouse=str(tmp_path / "lh"))
    assert str(info.value) == (
        "features: standardize of column 'x' needs numbers, but 'x' is string; declare it numeric under columns "
        "(x: double) or encode it with a vocabulary or hash transform")


def test_a_string_regression_label_says_regression_needs_a_number(spark, tmp_path):
    config = _toy(tmp_path, "rid,x,y\n1,1.0,cheap\n2,2.0,dear\n3,3.0,cheap\n",
                  label={"source": "y", "task": "regression"}, columns={"x": "double"})
    with pytest.raises(ValueError) as info:
        run_etl_config(config, spark=spark, lakehouse=str(tmp_path / "lh"))
    assert str(info.value) == (
        "label.source 'y': none of the 3 rows holds a valid regression label (all rejected as invalid_label); "
        "regression needs a numeric label: declare it under columns (y: double), or derive a number from it")


def test_a_missing_source_file_names_the_yaml_key_before_spark_starts(tmp_path):
    import subprocess
    import sys

    (tmp_path / "toy.yaml").write_text(json.dumps({**BASE, "sources": {"rows": {"format": "csv", "path": "nope.csv"}}}))
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "jobs" / "etl.py"), "--lakehouse", str(tmp_path / "lh"),
                           "--config", str(tmp_path / "toy.yaml")], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(root)}, cwd=str(tmp_path))
    assert proc.returncode == 1
    assert "spark master" not in proc.stdout  # no session was started
    assert proc.stderr.strip().splitlines() == [
        f"sparkdl etl failed: FileNotFoundError: sources.rows.path: {tmp_path / 'nope.csv'} does not exist (given as 'nope.csv'); "
        "fix the path in the config or put the data there"]


def test_a_missing_feature_column_lists_only_the_users_columns(spark, tmp_path):
    config = _toy(tmp_path, "rid,x,y\n1,1.0,1\n2,2.0,0\n", features=[{"input": "nope", "type": "standardize"}])
    with pytest.raises(MissingColumnsError) as info:
        run_etl_config(config, spark=spark, lakehouse=str(tmp_path / "lh"))
    assert str(info.value).endswith("needs columns ['nope'] that the input lacks; available columns: ['x', 'y', 'rid']")


@pytest.mark.parametrize("tamper", ["edit", "invalid"])
def test_fit_stops_on_a_spec_that_fails_its_checks_naming_the_file(spark, tmp_path, tamper):
    from sparkdl.errors import SpecIntegrityError
    from sparkdl.train import TrainConfig, fit

    rows = "rid,x,y\n" + "".join(f"{i},{i % 7}.5,{i % 2}\n" for i in range(40))
    config = _toy(tmp_path, rows, columns={"x": "double", "y": "int"})
    lake = str(tmp_path / "lh")
    res = run_etl_config(config, spark=spark, lakehouse=lake)
    path = Path(res.spec_path.removeprefix("file://"))
    text = path.read_text()
    if tamper == "edit":  # same keys, another mean: the SHA-256 recorded in the commit no longer matches
        path.write_text(text.replace('"mean": ', '"mean": 1'))
        match = r"the spec file .*json of table .*toy_train v\d+ was changed after the commit"
    else:  # content that fails validation, with the recorded SHA-256 made to match by hand
        bad = text.replace('"dataset": "toy"', '"dataset": ""')
        path.write_text(bad)
        _rewrite_recorded_sha(lake, "toy_train", spec_sha256(bad))
        match = r"the spec file .*json of table .*toy_train v\d+ is not a valid spec \(dataset must be"
    with pytest.raises(SpecIntegrityError, match=match):
        fit(TrainConfig(lakehouse=lake, train_table="toy_train", model="tabular_mlp", label_column="label",
                        local_mode=True, epochs=1))
    assert not (Path(lake) / "models").exists()  # nothing published


def _rewrite_recorded_sha(lake: str, table: str, sha: str) -> None:
    log = Path(lake) / "tables" / table / "_delta_log"
    for f in log.glob("*.json"):
        f.write_text(re.sub(r'("sparkdl.spec_sha256":\s*")[0-9a-f]+', rf"\g<1>{sha}", f.read_text()))
