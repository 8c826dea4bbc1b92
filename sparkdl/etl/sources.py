"""Reading sources, parsing typed columns, validation reasons and joins (Spark only).

The main source is kept as read (the rejects table shows these original values); parsed
columns get their typed value under the same name, with the original under ``_raw_<col>``.
The expressions stay small on purpose: Spark pushes the ``reason`` filters down into the
scan by inlining them, and a large inlined expression compiles to a method too big for the JIT.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparkdl.errors import MissingColumnsError
from sparkdl.etl.config import ETLConfig, JoinConfig, SourceConfig

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

__all__ = ["check_sources", "read_source", "parse", "apply_joins", "split_column", "parse_value"]

_SPARK_TYPES = {"int": "int", "long": "bigint", "float": "float", "double": "double", "string": "string",
                "bool": "boolean", "date": "date", "timestamp": "timestamp", "binary": "binary"}


def check_sources(config: ETLConfig, lakehouse: str) -> None:
    """``FileNotFoundError`` naming the YAML key when a local source path does not exist (no
    Spark needed: jobs call it before the session starts). Remote URIs and globs are left to Spark."""
    from sparkdl import _fs

    for name, src in config.sources.items():
        if src.format == "table" or not src.path:
            continue
        path = config.resolve(src.path, lakehouse)
        if not _fs.is_local(path) or any(ch in path for ch in "*?[{"):
            continue
        local = path.removeprefix("file://")
        if not Path(local).exists():
            given = f" (given as {src.path!r})" if src.path != path else ""
            raise FileNotFoundError(f"sources.{name}.path: {path} does not exist{given}; fix the path in the "
                                    "config or put the data there")


def read_source(spark: "SparkSession", config: ETLConfig, name: str, lakehouse: str) -> "DataFrame":
    """Source ``name`` as read, with its declared columns (a missing one is named first)."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import StringType

    src: SourceConfig = config.sources[name]
    where = f"source {name!r} ({src.table or src.path})"
    if src.format == "table":
        df = spark.table(src.table)
    elif src.format == "delta":
        from sparkdl.lakehouse import read_table

        df = read_table(spark, config.resolve(src.path, lakehouse), src.version)
    else:
        path = config.resolve(src.path, lakehouse)
        reader = spark.read.format(src.format)
        if src.format == "csv":
            reader = reader.option("header", True).option("inferSchema", False)
        for k, v in src.options.items():
            reader = reader.option(k, v)
        df = reader.load(path)
    if src.columns is not None:
        missing = [c for c in src.columns if c not in df.columns]
        if missing:
            raise MissingColumnsError(f"the {config.dataset} ETL ({where})", missing, list(df.columns))
        df = df.select(*src.columns)
    if src.blank_as_null:
        opts = {k.lower(): str(v).lower() for k, v in src.options.items()}
        # When the reader trims already, the small expression is enough (it is inlined into the scan).
        trimmed = src.format == "csv" and all(
            opts.get(k) == "true" for k in ("ignoreleadingwhitespace", "ignoretrailingwhitespace"))
        df = df.select(*[
            F.when((F.col(f.name) if trimmed else F.trim(F.col(f.name))) != "", F.col(f.name)).alias(f.name)
            if isinstance(f.dataType, StringType) else F.col(f.name) for f in df.schema.fields
        ])
    return df


def parse_value(col: "Column", type_name: str) -> "Column":
    """``col`` as ``type_name``: null when it does not parse; NaN and infinities count as unparseable."""
    from pyspark.sql import functions as F

    x = col.try_cast(_SPARK_TYPES.get(type_name, type_name))  # decimal(p,s): as written
    if type_name in ("float", "double"):
        return F.when(~F.isnan(x) & (F.abs(x) != F.lit(float("inf"))), x)
    return x


def parse(raw: "DataFrame", config: ETLConfig) -> "DataFrame":
    """Raw rows -> id, typed columns (same names), ``_raw_<col>`` originals, ``reason`` (null when usable)."""
    from pyspark.sql import functions as F

    from sparkdl.etl.transforms import spark_label

    need = list(config.columns) + list(config.rules.required) + list(config.rules.ranges) + list(config.rules.allowed)
    need += config.id.hash_of or [config.id.column]
    missing = sorted({c for c in need if c not in raw.columns}, key=need.index)
    if missing:
        raise MissingColumnsError(f"the {config.dataset} ETL (main source {config.main!r})", missing, list(raw.columns))
    raw_cols = [c for c in raw.columns if c != config.id.column]
    if config.id.hash_of:
        df = raw.select(*raw_cols, F.xxhash64(*[F.col(c) for c in config.id.hash_of]).alias(config.id.column))
    else:
        df = raw.select(*raw_cols, F.col(config.id.column))
    if config.sample_fraction < 1.0:
        keep = F.pmod(F.xxhash64(F.col(config.id.column), F.lit("sample")), F.lit(1_000_000))
        df = df.where(keep < int(config.sample_fraction * 1e6))
    if config.columns:  # Spark Connect refuses an empty withColumns
        df = df.withColumns({f"_raw_{c}": F.col(c) for c in config.columns})
        df = df.withColumns({c: parse_value(F.col(f"_raw_{c}"), t) for c, t in config.columns.items()})
    checks = [F.when(F.col(f"_raw_{c}" if c in config.columns else c).isNull(), F.lit(f"missing:{c}"))
              for c in config.rules.required]
    if config.split.time_column:
        checks.append(F.when(F.col(config.split.time_column).isNull(), F.lit(f"missing:{config.split.time_column}")))
    checks += [F.when(F.col(f"_raw_{c}").isNotNull() & F.col(c).isNull(), F.lit(f"unparseable:{c}"))
               for c in config.columns]
    for c, r in config.rules.ranges.items():
        x = F.col(c).try_cast("double")
        bad = F.lit(False)
        if "min" in r:
            bad = bad | (x < F.lit(float(r["min"])))
        if "max" in r:
            bad = bad | (x > F.lit(float(r["max"])))
        checks.append(F.when(bad, F.lit(f"out_of_range:{c}")))
    for c, values in config.rules.allowed.items():
        from sparkdl.etl.transforms import as_key

        key = F.col(c).cast("string")
        checks.append(F.when(key.isNotNull() & ~key.isin([as_key(v) for v in values]), F.lit(f"not_allowed:{c}")))
    for rule in config.rules.checks:
        checks.append(F.when(~F.coalesce(F.expr(rule.sql), F.lit(False)), F.lit(rule.reason)))
    lab = config.label
    if lab.source in df.columns:
        src = F.col(lab.source)
        checks.append(F.when(src.isNull(), F.lit("missing_label")))
        rule = label_rule(config, classes=None)
        if rule is not None:
            checks.append(F.when(spark_label(rule, src).isNull(), F.lit("invalid_label")))
    if config.weight:
        w = F.col(config.weight).try_cast("double")
        checks.append(F.when(w.isNull() | F.isnan(w) | (F.abs(w) == F.lit(float("inf"))) | (w < 0),
                             F.lit("invalid_weight")))
    return df.withColumn("reason", F.coalesce(*checks) if checks else F.lit(None).cast("string"))


def label_rule(config: ETLConfig, classes: list[str] | None) -> dict[str, Any] | None:
    """The spec's label dict; None when its classes are still to be fitted and not given."""
    lab = config.label
    rule: dict[str, Any] = {"column": lab.column, "source": lab.source, "task": lab.task}
    if lab.task == "binary":
        if lab.threshold is not None:
            rule.update(threshold=float(lab.threshold), op=lab.op)
        elif lab.positive is not None:
            rule["positive"] = list(lab.positive)
    elif lab.task in ("multiclass", "multilabel"):
        if lab.num_classes is not None:
            rule["num_classes"] = int(lab.num_classes)
        elif lab.classes is not None:
            rule["classes"] = [str(c) for c in lab.classes]
        elif classes is not None:
            rule["classes"] = list(classes)
        else:
            return None
        if lab.task == "multilabel":
            rule["separator"] = lab.separator
    return rule


def _join_source(spark: "SparkSession", config: ETLConfig, join: JoinConfig, key_types: dict[str, str],
                 lakehouse: str) -> "DataFrame":
    from pyspark.sql import functions as F

    right = read_source(spark, config, join.source, lakehouse)
    needed = list(join.keys.values()) + [jc.source_column or out for out, jc in join.columns.items()]
    missing = [c for c in needed if c not in right.columns]
    if missing:
        raise MissingColumnsError(f"the {config.dataset} ETL (join of source {join.source!r})", missing,
                                  list(right.columns))
    keys = [F.col(r).try_cast(key_types[left]).alias(left) for left, r in join.keys.items()]
    values = [parse_value(F.col(jc.source_column or out), jc.type).alias(out) for out, jc in join.columns.items()]
    aggs = [getattr(F, jc.agg or join.aggregate)(out).alias(out) for out, jc in join.columns.items()]
    if join.how == "inner":
        aggs.append(F.lit(True).alias(f"_match_{join.source}"))
    out = right.select(*keys, *values)
    for left in join.keys:
        out = out.where(F.col(left).isNotNull())
    # One row per key (a repeated key is aggregated), so the join never duplicates a main row.
    return out.groupBy(*join.keys).agg(*aggs)


def apply_joins(spark: "SparkSession", df: "DataFrame", config: ETLConfig, lakehouse: str) -> "DataFrame":
    """``df`` with every join applied (left joins keep the row count; an inner join's misses get
    reason ``no_match:<source>`` when the frame has a ``reason`` column)."""
    from pyspark.sql import functions as F

    types = dict(df.dtypes)
    for join in config.joins:
        missing = [c for c in join.keys if c not in df.columns]
        if missing:
            raise MissingColumnsError(f"the {config.dataset} ETL (join keys of source {join.source!r})", missing,
                                      list(df.columns))
        right = _join_source(spark, config, join, {k: types[k] for k in join.keys}, lakehouse)
        df = df.join(F.broadcast(right) if join.broadcast else right, list(join.keys), "left")
        if join.how == "inner":
            flag = f"_match_{join.source}"
            if "reason" in df.columns:
                df = df.withColumn("reason", F.coalesce(
                    F.col("reason"), F.when(F.col(flag).isNull(), F.lit(f"no_match:{join.source}"))))
            df = df.drop(flag)
        types = dict(df.dtypes)
    return df


def split_column(config: ETLConfig) -> "Column":
    """The split name of each row: hash buckets of the id in the listed ratio order, or time cutoffs."""
    from pyspark.sql import functions as F

    sp = config.split
    if sp.ratios is not None:
        bucket = F.pmod(F.xxhash64(F.col(config.id.column), F.lit(sp.seed)), F.lit(10_000))
        names = list(sp.ratios)
        expr = None
        cut = 0.0
        for name in names[:-1]:
            cut += sp.ratios[name]
            cond = bucket < int(round(cut * 10_000))
            expr = F.when(cond, F.lit(name)) if expr is None else expr.when(cond, F.lit(name))
        last = F.lit(names[-1])
        return last if expr is None else expr.otherwise(last)
    t = F.col(sp.time_column)
    kind = _SPARK_TYPES[config.columns[sp.time_column]]
    expr = F.when(t < F.lit(str(sp.valid_from)).cast(kind), F.lit("train"))
    if sp.test_from:
        expr = expr.when(t >= F.lit(str(sp.test_from)).cast(kind), F.lit("test"))
    return expr.otherwise(F.lit("valid"))
