"""Property: Spark ``encode`` and pandas ``encode_pandas`` agree bit for bit, for every transform
on every declared column type, with nulls and values the fit never saw.

Each example is one table holding a column of every type (int, long, float, double, decimal,
string, boolean, date, timestamp); the vocabularies and label classes are fitted in Spark on
half of the rows (as the ETL fits them), so the other half brings unseen values. Two Spark jobs
per example: the vocabulary pass and the encode.
"""

from __future__ import annotations

import datetime as dt
import decimal

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparkdl.etl.analyzers import VocabRequest, fit_vocabularies
from sparkdl.etl.transforms import as_key, pandas_feature, spark_feature
from sparkdl.preprocess import PreprocessingSpec

TYPES = {
    "int": st.integers(-2**31, 2**31 - 1),
    "bigint": st.integers(-2**63, 2**63 - 1),
    "float": st.floats(width=32, allow_nan=True, allow_infinity=True),
    "double": st.floats(allow_nan=True, allow_infinity=True),
    "decimal(10,2)": st.decimals(min_value=-10**7, max_value=10**7, places=2, allow_nan=False, allow_infinity=False),
    "string": st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=6),
    "boolean": st.booleans(),
    "date": st.dates(min_value=dt.date(1900, 1, 1), max_value=dt.date(2200, 12, 31)),
    "timestamp": st.datetimes(min_value=dt.datetime(1900, 1, 1), max_value=dt.datetime(2200, 1, 1)),
}
NUMERIC = ("int", "bigint", "float", "double", "decimal(10,2)", "boolean")
NAMES = {t: f"c{i}" for i, t in enumerate(TYPES)}


@st.composite
def tables(draw):
    """Rows of one value per type (None for null), drawn from a small pool so values repeat."""
    n = draw(st.integers(2, 24))
    cols = {}
    for t, values in TYPES.items():
        pool = draw(st.lists(values, min_size=1, max_size=3))
        cols[t] = draw(st.lists(st.one_of(st.none(), st.sampled_from(pool), values), min_size=n, max_size=n))
    finite = st.floats(-1e6, 1e6, allow_nan=False)
    numbers = {"mean": draw(finite), "std": draw(st.one_of(st.just(0.0), st.floats(1e-3, 1e6))),
               "min": draw(finite), "span": draw(st.floats(0, 1e6)), "fill": draw(finite),
               "bounds": sorted(set(draw(st.lists(finite, max_size=4))))}
    label_type = draw(st.sampled_from(list(TYPES)))
    label_task = draw(st.sampled_from(["classes", "positive"] + (["regression", "threshold"]
                                                                 if label_type in NUMERIC else [])))
    positive = draw(st.lists(st.sampled_from([v for v in cols[label_type] if v is not None] or [None]),
                             max_size=2))
    return n, cols, numbers, label_type, label_task, positive


def _spark_frame(spark, n, cols):
    from pyspark.sql.types import StructType

    schema = StructType.fromDDL(", ".join(["rid int", "_is_train boolean"] + [f"{NAMES[t]} {t}" for t in TYPES]))
    utc = dt.timezone.utc
    rows = [(i, i % 2 == 0, *[(v.replace(tzinfo=utc) if t == "timestamp" and v is not None else v)
                              for t, v in ((t, cols[t][i]) for t in TYPES)]) for i in range(n)]
    return spark.createDataFrame(rows, schema)


def _pandas_frame(n, cols):
    out = {"rid": list(range(n))}
    for t in TYPES:
        v = cols[t]
        if t in ("int", "bigint"):
            s = pd.array(v, dtype="Int64")
        elif t in ("float", "double"):
            s = np.asarray([np.nan if x is None else x for x in v], dtype=np.float64)
        elif t == "boolean":
            s = pd.array(v, dtype="boolean")
        elif t == "timestamp":
            s = pd.to_datetime(pd.Series(v, dtype=object))
        else:
            s = pd.Series(v, dtype=object)
        out[NAMES[t]] = s
    return pd.DataFrame(out)


def _spec(vocabs, numbers, label) -> PreprocessingSpec:
    transforms = []
    for t, c in NAMES.items():
        transforms.append({"type": "vocabulary", "input": c, "output": f"{c}_id", "vocab": vocabs[c],
                           "input_type": t})
        transforms.append({"type": "hash", "input": c, "output": f"{c}_hash", "num_buckets": 7, "input_type": t})
        if t in NUMERIC:
            transforms += [
                {"type": "standardize", "input": c, "output": f"{c}_z", "mean": numbers["mean"],
                 "std": numbers["std"], "input_type": t},
                {"type": "minmax", "input": c, "output": f"{c}_mm", "min": numbers["min"],
                 "max": numbers["min"] + numbers["span"], "input_type": t},
                {"type": "numeric", "input": c, "output": f"{c}_f", "fill": numbers["fill"], "input_type": t},
                {"type": "bucketize", "input": c, "output": f"{c}_b", "boundaries": numbers["bounds"],
                 "num_buckets": 5, "input_type": t},
            ]
    return PreprocessingSpec(dataset="prop", transforms=transforms, label=label, id_column="rid")


def _same(got: pd.DataFrame, want: pd.DataFrame, columns: list[str]) -> None:
    for c in columns:
        for i, (a, b) in enumerate(zip(got[c], want[c])):
            if b is None or b is pd.NA or (isinstance(b, float) and np.isnan(b)):
                assert a is None or pd.isna(a), (c, i, a, b)
            elif isinstance(b, (float, np.floating)):
                assert np.float32(a).view(np.int32) == np.float32(b).view(np.int32), (c, i, a, b)
            else:
                assert a is not None and not pd.isna(a) and int(a) == int(b), (c, i, a, b)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow, HealthCheck.data_too_large])
@given(tables())
def test_spark_and_pandas_encode_agree_on_every_type(spark, table):
    n, cols, numbers, label_type, label_task, positive = table
    df = _spark_frame(spark, n, cols)
    source = NAMES[label_type]
    requests = [VocabRequest(name=c, input=c) for c in NAMES.values()]
    requests.append(VocabRequest(name="\0label", input=source))
    vocabs = fit_vocabularies(df, requests)  # training rows only: the rest may hold unseen values
    label = {"column": "label", "source": source, "source_type": label_type}
    if label_task == "classes":
        label.update(task="multiclass", classes=sorted(vocabs["\0label"]))
    elif label_task == "positive":
        label.update(task="binary", positive=[as_key(v) for v in positive if v is not None])
    elif label_task == "regression":
        label.update(task="regression")
    else:
        label.update(task="binary", threshold=numbers["mean"], op=">=")
    spec = _spec(vocabs, numbers, label)
    got = spec.encode(df.drop("_is_train")).orderBy("rid").toPandas()
    want = spec.encode_pandas(_pandas_frame(n, cols))
    _same(got, want, spec.features + ["label"])


@pytest.mark.parametrize("kind", ["standardize", "minmax", "numeric", "bucketize"])
@pytest.mark.parametrize("input_type", ["string", "date", "timestamp", "binary"])
def test_numeric_transform_of_a_non_numeric_column_fails_alike(spark, kind, input_type):
    from pyspark.sql import functions as F

    t = {"type": kind, "input": "x", "output": "x_out", "mean": 0.0, "std": 1.0, "min": 0.0, "max": 1.0,
         "fill": 0.0, "boundaries": [], "num_buckets": 2, "input_type": input_type}
    with pytest.raises(ValueError, match=rf"{kind} of column 'x' needs numbers, but 'x' is {input_type}; declare"):
        spark_feature(t, F.col("x"))
    with pytest.raises(ValueError, match=rf"{kind} of column 'x' needs numbers, but 'x' is {input_type}; declare"):
        pandas_feature(t, pd.Series(["1"]))


def test_a_double_vocabulary_keys_alike_in_spark_and_pandas(spark):
    """The case users met: a vocabulary on a double column keyed "4.0" in Spark and "4" in pandas."""
    df = spark.createDataFrame([(4.0,), (2.5,), (4.0,), (None,)], "x double")
    vocab = fit_vocabularies(df, [VocabRequest(name="x", input="x")])["x"]
    spec = PreprocessingSpec(dataset="d", transforms=[
        {"type": "vocabulary", "input": "x", "output": "x_id", "vocab": vocab, "input_type": "double"}])
    got = list(spec.encode(df).toPandas().x_id)
    want = list(spec.encode_pandas(pd.DataFrame({"x": [4.0, 2.5, 4.0, None]})).x_id)
    assert got == want == [1, 2, 1, 0]
    assert list(spec.encode_pandas(pd.DataFrame({"x": ["4", 2.5, 7.0, decimal.Decimal("4.00")]})).x_id) == [1, 2, 0, 1]
