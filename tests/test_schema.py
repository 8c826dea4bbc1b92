"""Dataset schemas: the bundled files, metadata round trips, and mismatch messages that name
the column, the expected and the found type."""

from __future__ import annotations

import pyarrow as pa
import pytest

from sparkdl.errors import SchemaMismatchError
from sparkdl.schema import ColumnSpec, DatasetSchema


@pytest.mark.parametrize("name", ["flights_train", "flights_clean", "flights_rejects", "digits"])
def test_bundled_schemas_load(name):
    schema = DatasetSchema.load(name)
    assert schema.name == name
    assert len(schema.with_role("id")) == 1


def test_flights_train_schema_is_what_a_model_can_consume():
    schema = DatasetSchema.load("flights_train")
    (label,) = schema.with_role("label")
    assert (label.name, label.type) == ("label", "int32")
    features = schema.with_role("feature")
    assert {c.type for c in features} == {"float32", "int32"}
    assert all(c.name.endswith("_z") for c in features if c.type == "float32")
    assert all(c.name.endswith("_id") for c in features if c.type == "int32")
    assert schema.column("flight_id").type == "int64"


def test_arrow_metadata_round_trip():
    schema = DatasetSchema.load("digits")
    recovered = DatasetSchema.from_arrow(schema.to_arrow(), name="digits")
    assert recovered.columns == schema.columns
    image = recovered.column("image")
    assert (image.codec, image.shape, image.role) == ("png", (8, 8), "feature")


def test_unknown_schema_names_the_known_ones():
    with pytest.raises(ValueError, match=r"no schema named 'nope'.*known schemas: \[.*'digits'.*\]"):
        DatasetSchema.load("nope")


def test_column_spec_validation_names_column_and_fix():
    with pytest.raises(ValueError, match=r"column 'x': role 'target' is not one of"):
        ColumnSpec(name="x", type="int32", role="target")
    with pytest.raises(ValueError, match=r"column 'img': codec 'png' needs type binary, not string"):
        ColumnSpec(name="img", type="string", codec="png")
    with pytest.raises(ValueError, match=r"declares columns \['a'\] more than once"):
        DatasetSchema(name="s", columns=(ColumnSpec(name="a", type="int32"), ColumnSpec(name="a", type="int64")))


def test_arrow_mismatch_messages():
    schema = DatasetSchema.load("digits")
    found = pa.schema([("id", pa.int64()), ("image", pa.string()), ("label", pa.int32()), ("extra", pa.float64())])
    with pytest.raises(SchemaMismatchError) as info:
        schema.validate_arrow(found)
    msg = str(info.value)
    assert "column 'image': expected binary, found string" in msg
    assert "column 'split' is missing (expected string)" in msg
    assert "unexpected column 'extra' (float64)" in msg
    assert info.value.dataset == "digits" and len(info.value.problems) == 3


@pytest.mark.integration
def test_spark_mismatch_names_column_expected_and_found_type(spark):
    from pyspark.sql import functions as F

    schema = DatasetSchema.load("flights_train")
    # The label arrives as a double: a typical slip (a float score written as the label).
    df = spark.createDataFrame([], schema.spark_schema()).withColumn("label", F.col("label").cast("double"))
    with pytest.raises(SchemaMismatchError) as info:
        schema.validate_spark(df)
    assert str(info.value) == (
        "schema 'flights_train' does not match the data: column 'label': expected int32, found float64"
    )


@pytest.mark.integration
def test_spark_null_check_names_column_and_count(spark):
    schema = DatasetSchema(
        name="s",
        columns=(ColumnSpec(name="id", type="int64", nullable=False), ColumnSpec(name="v", type="string")),
    )
    df = spark.createDataFrame([(1, "a"), (None, None), (None, "c")], "id long, v string")
    schema.validate_spark(df)  # types alone match
    with pytest.raises(SchemaMismatchError, match="column 'id' is declared non-nullable but has 2 nulls"):
        schema.validate_spark(df, check_nulls=True)


def test_column_errors_name_the_column_and_the_schema_file(tmp_path):
    with pytest.raises(ValueError, match=r"column 'x': unknown type 'float16'; use one of"):
        ColumnSpec(name="x", type="float16")
    with pytest.raises(ValueError, match=r"column 'img': shape '8x8' must be a list of positive sizes"):
        ColumnSpec(name="img", type="binary", shape="8x8")

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ncolumns:\n  - name: a\n    type: int32\n  - name: b\n    type: float16\n")
    with pytest.raises(ValueError, match=rf"schema 'bad' \({bad}\), column #1 \('b'\): column 'b': unknown type 'float16'"):
        DatasetSchema.load(str(bad))
    bad.write_text("name: bad\ncolumns:\n  - a\n")
    with pytest.raises(ValueError, match=rf"schema 'bad' \({bad}\), column #0: expected a mapping"):
        DatasetSchema.load(str(bad))
    bad.write_text("name: bad\ncolumns: [\n")
    with pytest.raises(ValueError, match=rf"(?s)schema file {bad} cannot be parsed: .*line 3"):
        DatasetSchema.load(str(bad))
    bad.write_text("")
    with pytest.raises(ValueError, match=rf"schema file {bad} is empty"):
        DatasetSchema.load(str(bad))
    js = tmp_path / "js.json"
    js.write_text('{"name": "js", "columns": [{"name": "a", "type": "int32"}]}')
    with pytest.raises(SchemaMismatchError, match=rf"unexpected column 'z' \(int64\): declare it in {js}"):
        DatasetSchema.load(str(js)).validate_arrow(pa.schema([("a", pa.int32()), ("z", pa.int64())]))


def test_known_schemas_include_json_files(tmp_path, monkeypatch):
    (tmp_path / "a.yaml").write_text("name: a\ncolumns: []\n")
    (tmp_path / "b.json").write_text('{"name": "b", "columns": []}')
    monkeypatch.setenv("SPARKDL_SCHEMAS_DIR", str(tmp_path))
    with pytest.raises(ValueError, match=r"known schemas: \['a', 'b'\]"):
        DatasetSchema.load("nope")
    assert DatasetSchema.load("b").name == "b"


def test_declared_nullability_goes_into_the_table_schema():
    schema = DatasetSchema.load("digits")
    found = pa.schema([pa.field(c.name, c.arrow_type, nullable=True) for c in schema.columns])
    merged = schema.arrow_with_metadata(found)
    assert [f.nullable for f in merged] == [c.nullable for c in schema.columns]
    assert not merged.field("image").nullable


@pytest.mark.integration
def test_timestamps_map_to_utc_instants_and_ntz_stays_zoneless(spark):
    from sparkdl.schema import spark_to_arrow_schema

    df = spark.sql(
        "select timestamp'2024-01-02 03:04:05' ts, timestamp_ntz'2024-01-02 03:04:05' ntz, "
        "array(timestamp'2024-01-02 03:04:05') tss, named_struct('t', timestamp'2024-01-02 03:04:05') s"
    )
    arrow = spark_to_arrow_schema(df.schema)
    assert arrow.field("ts").type == pa.timestamp("us", tz="UTC")
    assert arrow.field("ntz").type == pa.timestamp("us")
    assert arrow.field("tss").type.value_type == pa.timestamp("us", tz="UTC")
    assert arrow.field("s").type.field("t").type == pa.timestamp("us", tz="UTC")
    schema = DatasetSchema(name="t", columns=(ColumnSpec(name="ts", type="timestamp"), ColumnSpec(name="ntz", type="timestamp")))
    with pytest.raises(SchemaMismatchError, match="column 'ntz': expected timestamp, found timestamp_ntz"):
        schema.validate_spark(df.select("ts", "ntz"))
    DatasetSchema(name="t", columns=(ColumnSpec(name="ts", type="timestamp"), ColumnSpec(name="ntz", type="timestamp_ntz"))).validate_spark(df.select("ts", "ntz"))
