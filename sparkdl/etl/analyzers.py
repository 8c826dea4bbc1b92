"""Analyzers: the map/reduce passes that fit a spec on the training split.

Each pass is one Spark aggregation; only its small result (one row of statistics, or the
kept vocabulary entries with their counts) reaches the driver, never the data rows:

- ``fit_numeric``: count, mean, population std, min, max of every numeric input and the
  approximate quantiles of every bucketized one, all in one ``agg`` (Spark's partial then
  final aggregation: partials per partition, merged across one exchange).
- ``fit_vocabularies``: every vocabulary (categorical values, words of a text column, label
  classes) in one pass: each row emits (name, value) pairs, one ``groupBy(name, value).count()``
  counts them all, and the min count / top-k cut runs in Spark before the collect.
- ``fit_images``: per-channel pixel mean and std, partial sums per partition then one sum.

``count_jobs`` (``sparkdl.session``) counts the Spark jobs a pass started, reported
by the ETL as ``ETLResult.analyzer_jobs``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from sparkdl.session import count_jobs

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

__all__ = ["NumericStats", "VocabRequest", "fit_numeric", "fit_vocabularies", "fit_images", "count_jobs"]


@dataclass
class NumericStats:
    """Result of ``fit_numeric``."""

    rows: int
    """Rows aggregated (nulls included)."""
    columns: dict[str, dict[str, Any]]
    """Column -> {count, mean, std, min, max} over its non-null, non-NaN values (None when count is 0)."""
    quantiles: dict[str, list[float]] = field(default_factory=dict)
    """Request name -> approximate quantiles (percentile_approx) at the requested probabilities."""


def _double(c: str) -> "Column":
    from pyspark.sql import functions as F

    x = F.col(c).try_cast("double")
    return F.when(~F.isnan(x), x)


def fit_numeric(df: "DataFrame", columns: list[str], *, quantiles: dict[str, tuple[str, list[float], int]],
                extremes: list[str] | None = None) -> NumericStats:
    """Count, mean and population std of ``columns``, min and max of ``extremes`` (default:
    ``columns``), and quantiles of ``quantiles`` (name -> (column, probabilities, accuracy)) in
    one aggregation. ``percentile_approx`` with accuracy A returns, for probability p, a value
    whose rank among the n non-null values is within n / A of p * n."""
    from pyspark.sql import functions as F

    extremes = list(columns) if extremes is None else extremes
    # Only the aggregates asked for: a few dozen more would push the generated aggregation code
    # past the JIT's method-size limit and slow the whole pass down.
    aggs = [F.count(F.lit(1)).alias("_rows")]
    for i, c in enumerate(columns):
        x = _double(c)
        aggs += [F.count(x).alias(f"n{i}"), F.avg(x).alias(f"m{i}"), F.stddev_pop(x).alias(f"s{i}")]
    for i, c in enumerate(extremes):
        x = _double(c)
        aggs += [F.min(x).alias(f"lo{i}"), F.max(x).alias(f"hi{i}")]
    for j, (c, probs, accuracy) in enumerate(quantiles.values()):
        aggs.append(F.percentile_approx(_double(c), list(probs), accuracy).alias(f"q{j}"))
    row = df.agg(*aggs).first()
    stats: dict[str, dict[str, Any]] = {}
    for i, c in enumerate(columns):
        n = int(row[f"n{i}"])
        stats[c] = {"count": n, "mean": _f(row[f"m{i}"]), "std": _f(row[f"s{i}"], 0.0 if n else None)}
    for i, c in enumerate(extremes):
        stats.setdefault(c, {}).update(min=_f(row[f"lo{i}"]), max=_f(row[f"hi{i}"]))
    q = {name: [float(v) for v in (row[f"q{j}"] or [])] for j, name in enumerate(quantiles)}
    return NumericStats(rows=int(row["_rows"]), columns=stats, quantiles=q)


def _f(v: Any, default: Any = None) -> Any:
    return default if v is None else float(v)


@dataclass(kw_only=True)
class VocabRequest:
    """One vocabulary to fit."""

    name: str
    """Key of the result."""
    input: str
    """Column the values come from."""
    kind: str = "value"
    """value (the column as a string), tokens (words of a text column) or items (a multilabel
    column: an array, or a string split by ``separator``)."""
    min_count: int = 1
    """Values seen fewer times are left out."""
    top_k: int | None = None
    """Keep at most this many (most frequent first, ties by value ascending)."""
    separator: str | None = None
    """items: the separator of a string column."""
    train_only: bool = True
    """Count only rows where the frame's ``_is_train`` column is true (if it has one)."""


def _values(r: VocabRequest, per_row_filter: bool) -> "Column":
    """The (name, value) pairs one row emits for request ``r``; null or empty when none."""
    import re

    from pyspark.sql import functions as F

    from sparkdl.etl.transforms import TOKEN_PATTERN

    col = F.col(r.input)
    if r.kind == "value" and not per_row_filter:
        # The cheap common case: one pair per row, nulls dropped after the explode.
        return F.array(F.struct(F.lit(r.name).alias("k"), col.cast("string").alias("v")))
    if r.kind == "value":
        vals = F.when(col.isNotNull(), F.array(col.cast("string")))
    elif r.kind == "tokens":
        vals = F.filter(F.split(F.lower(col.cast("string")), TOKEN_PATTERN), lambda w: w != F.lit(""))
    elif r.kind == "items":
        items = F.split(col.cast("string"), re.escape(r.separator)) if r.separator else col.cast("array<string>")
        vals = F.filter(F.transform(items, lambda v: F.trim(v)), lambda v: v != F.lit(""))
    else:
        raise ValueError(f"VocabRequest {r.name!r}: kind {r.kind!r} is not value, tokens or items")
    if per_row_filter and r.train_only:
        vals = F.when(F.col("_is_train"), vals)
    pairs = F.transform(vals, lambda v: F.struct(F.lit(r.name).alias("k"), v.alias("v")))
    return F.coalesce(pairs, F.array().cast("array<struct<k:string,v:string>>"))


def fit_vocabularies(df: "DataFrame", requests: list[VocabRequest]) -> dict[str, list[str]]:
    """Every requested vocabulary in one pass: name -> values, most frequent first, ties by
    value (ascending, by code point), after the min-count and top-k cuts."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    if not requests:
        return {}
    names = [r.name for r in requests]
    if len(set(names)) != len(names):
        raise ValueError(f"vocabulary names {names} repeat; give each request its own name")
    flagged = "_is_train" in df.columns
    # Rows are filtered once when every request counts training rows only; a request over all
    # rows (label classes) makes the filter per request instead.
    per_row = flagged and not all(r.train_only for r in requests)
    if flagged and not per_row:
        df = df.where(F.col("_is_train"))
    arrays = [_values(r, per_row) for r in requests]
    simple = not per_row and all(r.kind == "value" for r in requests)
    pairs = F.concat(*arrays) if simple else F.flatten(F.array(*arrays))
    counts = df.select(F.explode(pairs).alias("p")).select("p.k", "p.v").where(F.col("v").isNotNull())
    counts = counts.groupBy("k", "v").count()
    min_counts = F.create_map(*[x for r in requests for x in (F.lit(r.name), F.lit(r.min_count))])
    counts = counts.where(F.col("count") >= F.element_at(min_counts, F.col("k")))
    if any(r.top_k for r in requests):
        limits = F.create_map(*[x for r in requests for x in (F.lit(r.name), F.lit(r.top_k or 2**31 - 1))])
        rank = F.row_number().over(Window.partitionBy("k").orderBy(F.col("count").desc(), F.col("v").asc()))
        counts = counts.withColumn("_rank", rank).where(F.col("_rank") <= F.element_at(limits, F.col("k")))
    found: dict[str, list[tuple[int, str]]] = {r.name: [] for r in requests}
    for row in counts.collect():
        found[row["k"]].append((-int(row["count"]), row["v"]))
    return {name: [v for _, v in sorted(pairs_)] for name, pairs_ in found.items()}


def fit_images(df: "DataFrame", transforms: dict[str, dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Per-channel mean and population std of pixel / 255 (after resizing) of each image
    transform (name -> transform), over the rows where ``_is_train`` is true: partial sums per
    partition (mapInPandas), one sum on the driver side of the aggregation."""
    from pyspark.sql import functions as F

    if not transforms:
        return {}
    items = list(transforms.items())
    inputs = [t["input"] for _, t in items]
    frame = df.where(F.col("_is_train")) if "_is_train" in df.columns else df
    frame = frame.select(*[F.col(c).alias(f"c{i}") for i, c in enumerate(inputs)])
    widths = [int(t["shape"][2]) if len(t["shape"]) == 3 else 1 for _, t in items]
    fields = ", ".join(f"n{i} double, s{i} array<double>, q{i} array<double>" for i in range(len(items)))

    def partials(batches: Iterator[Any]) -> Iterator[Any]:
        import numpy as np
        import pandas as pd

        from sparkdl.etl.transforms import image_pixels

        n = [0.0] * len(items)
        s = [np.zeros(w) for w in widths]
        q = [np.zeros(w) for w in widths]
        for pdf in batches:
            for i, (_, t) in enumerate(items):
                for v in pdf[f"c{i}"]:
                    px = image_pixels(t, v)
                    if px is None:
                        continue
                    x = px.reshape(-1, px.shape[2]).astype(np.float64) / 255.0
                    n[i] += x.shape[0]
                    s[i] += x.sum(axis=0)
                    q[i] += (x * x).sum(axis=0)
        row = {}
        for i in range(len(items)):
            row.update({f"n{i}": [n[i]], f"s{i}": [s[i].tolist()], f"q{i}": [q[i].tolist()]})
        yield pd.DataFrame(row)

    parts = frame.mapInPandas(partials, fields)
    aggs = []
    for i, w in enumerate(widths):
        aggs.append(F.sum(f"n{i}").alias(f"n{i}"))
        aggs += [F.sum(F.col(f"s{i}")[k]).alias(f"s{i}_{k}") for k in range(w)]
        aggs += [F.sum(F.col(f"q{i}")[k]).alias(f"q{i}_{k}") for k in range(w)]
    row = parts.agg(*aggs).first()
    out = {}
    for i, (name, _) in enumerate(items):
        n = row[f"n{i}"] or 0.0
        if n == 0:
            raise ValueError(f"image column {inputs[i]!r} has no images in the training rows; check the input")
        mean = [row[f"s{i}_{k}"] / n for k in range(widths[i])]
        std = [max(row[f"q{i}_{k}"] / n - m * m, 0.0) ** 0.5 for k, m in enumerate(mean)]
        out[name] = {"mean": mean, "std": std}
    return out
