"""The generic ETL: one ``ETLConfig`` -> rejects, (clean,) train/valid(/test) tables and a spec.

Steps, all in Spark:

1. Read the main source as is; the id is an existing column or Spark's ``xxhash64`` (seed 42)
   of raw columns; an optional sample keeps ``pmod(xxhash64(id, "sample"), 1e6) < f * 1e6``.
2. Parse declared columns and evaluate the rules; a failing row goes to the rejects table with
   its original values and the first failing reason (order: ``RulesConfig``).
3. Usable rows: derived columns, joins (one row per key, so no row is duplicated), derived
   columns after joins, the split (``SplitConfig``) -> the clean frame.
4. Analyzers on the training split only (``sparkdl.etl.analyzers``): one numeric pass, one
   vocabulary pass, one image pass when an image is normalized; the Spark jobs of each pass
   are counted into ``ETLResult.analyzer_jobs``.
5. Encode with ``PreprocessingSpec.encode`` (the code inference uses) and write. Every check
   and count runs before the first commit: rows in = rows out + rows rejected, declared
   schemas, nulls in non-nullable columns; a failure leaves every table as it was. The spec is
   saved content-addressed under ``specs/<dataset>/`` and linked from the commits of the clean
   and encoded tables; each commit records the row accounting.

The commits are separate Delta transactions: a failure between them leaves the tables
written so far at their new versions and the others at their old ones; the versions in
``ETLResult.table_versions`` are the consistent set.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from sparkdl.errors import SchemaMismatchError
from sparkdl.etl.analyzers import VocabRequest, count_jobs, fit_images, fit_numeric, fit_vocabularies
from sparkdl.etl.config import ETLConfig
from sparkdl.etl.keys import is_numeric_type, numeric_type_error
from sparkdl.etl.sources import apply_joins, check_sources, label_rule, parse, read_source, split_column
from sparkdl.lakehouse import Lakehouse, WriteResult, table_exists, write_table
from sparkdl.preprocess import PreprocessingSpec, save_spec, spec_commit_metadata
from sparkdl.session import on_storage
from sparkdl.schema import ColumnSpec, DatasetSchema

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

__all__ = ["ETLResult", "run_etl_config", "format_etl_result", "fit_spec"]

WIDENING_CASTS = frozenset({
    ("int8", "int16"), ("int8", "int32"), ("int8", "int64"), ("int16", "int32"), ("int16", "int64"),
    ("int32", "int64"), ("float32", "float64"),
})
"""(found, declared) type pairs the ETL may cast to match a declared schema: lossless widenings
within integers and within floats only."""


@dataclass
class ETLResult:
    """What one ETL run wrote."""

    dataset: str
    """The config's dataset name."""
    rows_in: int
    """Rows read from the main source (after sampling)."""
    rows_out: int
    """Rows written to the encoded tables (all splits)."""
    rows_rejected: int
    """Rows written to the rejects table."""
    rows_per_split: dict[str, int]
    """Split name -> rows."""
    reject_reasons: dict[str, int]
    """Rejected rows per reason."""
    tables: dict[str, str]
    """Table name -> URI."""
    table_versions: dict[str, int]
    """Table name -> the version this run committed: together, one consistent set."""
    spec_path: str
    """URI of the spec, named by its content."""
    spec_sha256: str
    """SHA-256 of the spec file's text, as recorded in the commits."""
    analyzer_jobs: dict[str, int] = field(default_factory=dict)
    """Analyzer pass -> Spark jobs it ran (numeric, vocabulary, image)."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time per step and in total."""

    @property
    def rows_train(self) -> int:
        return self.rows_per_split.get("train", 0)

    @property
    def rows_valid(self) -> int:
        return self.rows_per_split.get("valid", 0)

    @property
    def rows_per_second(self) -> float:
        return self.rows_in / max(self.seconds.get("total", 0.0), 1e-9)


def _conform(df: "DataFrame", schema: DatasetSchema) -> "DataFrame":
    """``df`` in the schema's column order after checking it: a missing or undeclared column,
    or a type that differs other than by a lossless widening, raises ``SchemaMismatchError``."""
    from pyspark.sql import functions as F

    from sparkdl.schema import _type_name, spark_to_arrow_schema

    found = spark_to_arrow_schema(df.schema)
    problems, casts = [], {}
    for problem in schema.mismatches(found):
        col = next((c for c in schema.columns if problem.startswith(f"column {c.name!r}: expected")), None)
        if col is not None and (_type_name(found.field(col.name).type), col.type) in WIDENING_CASTS:
            casts[col.name] = col.type
        else:
            problems.append(problem)
    if problems:
        raise SchemaMismatchError(schema.name, problems)
    target = schema.spark_schema()
    return df.select(*[
        (F.col(f.name).cast(f.dataType) if f.name in casts else F.col(f.name)).alias(f.name) for f in target.fields
    ])


def _inferred_schema(name: str, df: "DataFrame", roles: dict[str, str], nonnull: set[str]) -> DatasetSchema:
    from sparkdl.schema import _type_name, spark_to_arrow_schema

    cols = [ColumnSpec(name=f.name, type=_type_name(f.type), role=roles.get(f.name, "meta"),
                       nullable=f.name not in nonnull) for f in spark_to_arrow_schema(df.schema)]
    return DatasetSchema(name=name, columns=tuple(cols))


def _merge_descriptions(generated: list[ColumnSpec], declared: DatasetSchema | None) -> list[ColumnSpec]:
    if declared is None:
        return generated
    import dataclasses

    names = set(declared.names)
    return [dataclasses.replace(c, description=declared.column(c.name).description or c.description)
            if c.name in names else c for c in generated]


def _rows_and_nulls(df: "DataFrame", key: str, schema: DatasetSchema) -> dict[Any, tuple[int, dict[str, int]]]:
    """key value -> (rows, nulls per non-nullable column of ``schema``), in one aggregation pass."""
    from pyspark.sql import functions as F

    required = [c.name for c in schema.columns if not c.nullable and c.name in df.columns]
    aggs = [F.count(F.lit(1)).alias("_rows")]
    aggs += [F.sum(F.col(c).isNull().cast("long")).alias(f"_nulls{i}") for i, c in enumerate(required)]
    return {
        r[key]: (int(r["_rows"]), {c: int(r[f"_nulls{i}"] or 0) for i, c in enumerate(required)})
        for r in df.groupBy(key).agg(*aggs).collect()
    }


_INTERNAL = ("reason", "split")
"""Columns the ETL adds to the user's rows (the reject reason, the split name)."""


def _label_error(config: ETLConfig, rows: int) -> str:
    lab = config.label
    need = {
        "regression": "regression needs a numeric label: declare it under columns "
                      f"({lab.source}: double), or derive a number from it",
        "binary": "a binary label needs 0/1 values, a threshold (label.threshold) or the positive values "
                  "(label.positive)",
        "multiclass": f"with label.num_classes the label must hold ids 0..{(lab.num_classes or 1) - 1}; give "
                      "label.classes (or neither, to fit them) when it holds names",
    }.get(lab.task, "check label.task and its options")
    return (f"label.source {lab.source!r}: none of the {rows} rows holds a valid {lab.task} label "
            f"(all rejected as invalid_label); {need}")


def _raise_on_nulls(schema: DatasetSchema, counted: dict[Any, tuple[int, dict[str, int]]]) -> None:
    totals: dict[str, int] = {}
    for _, nulls in counted.values():
        for c, n in nulls.items():
            totals[c] = totals.get(c, 0) + n
    bad = [f"column {c!r} is declared non-nullable but has {n} nulls" for c, n in totals.items() if n]
    if bad:
        raise SchemaMismatchError(schema.name, bad)


def fit_spec(spark: "SparkSession", clean: "DataFrame", config: ETLConfig, *,
             jobs: dict[str, int] | None = None, source: dict[str, Any] | None = None) -> PreprocessingSpec:
    """Run the analyzers on the training rows of ``clean`` (a frame with a ``split`` column)
    and build the spec."""
    from pyspark.sql import functions as F

    jobs = {} if jobs is None else jobs
    train = clean.where(F.col("split") == "train")
    flagged = clean.withColumn("_is_train", F.col("split") == "train")
    feats = config.features
    types = dict(clean.dtypes)
    for t in feats:
        if t.type in ("standardize", "minmax", "numeric", "bucketize") and not is_numeric_type(types[t.input]):
            raise numeric_type_error(t.type, t.input, types[t.input])
    numeric_inputs = list(dict.fromkeys(t.input for t in feats if t.type == "standardize"))
    extremes = list(dict.fromkeys(t.input for t in feats if t.type == "minmax"))
    quantiles = {t.output: (t.input, [i / t.num_buckets for i in range(1, t.num_buckets)], t.accuracy)
                 for t in feats if t.type == "bucketize"}
    stats = None
    if numeric_inputs or extremes or quantiles:
        with count_jobs(spark, jobs, "numeric"):
            stats = fit_numeric(train, numeric_inputs, quantiles=quantiles, extremes=extremes)
        empty = [c for c in numeric_inputs if stats.columns[c]["count"] == 0]
        empty += [c for c in extremes if stats.columns[c]["min"] is None]
        if empty:
            raise ValueError(f"column {empty[0]!r} has no non-null values in the training rows; drop its "
                             "transform from features or check the input")
    requests = [VocabRequest(name=t.output, input=t.input, kind="tokens" if t.type == "tokens" else "value",
                             min_count=t.min_count, top_k=t.top_k) for t in feats if t.type in ("vocabulary", "tokens")]
    lab = config.label
    fit_classes = lab.task in ("multiclass", "multilabel") and lab.classes is None and lab.num_classes is None
    if fit_classes:
        # Classes come from every row (a label is not a feature): a validation row never has an unknown class.
        requests.append(VocabRequest(name="\0label", input=lab.source, kind="items" if lab.task == "multilabel" else "value",
                                     separator=lab.separator, train_only=False))
    vocabs: dict[str, list[str]] = {}
    if requests:
        with count_jobs(spark, jobs, "vocabulary"):
            vocabs = fit_vocabularies(flagged, requests)
    normalized = {t.output: _transform_dict(t) for t in feats if t.type == "image" and t.normalize}
    images = {}
    if normalized:
        with count_jobs(spark, jobs, "image"):
            images = fit_images(flagged, normalized)
    transforms = []
    for t in feats:
        d = _transform_dict(t)
        if t.type != "image":
            d["input_type"] = types[t.input]
        if t.type == "standardize":
            st = stats.columns[t.input]
            d.update(mean=st["mean"], std=st["std"])
        elif t.type == "minmax":
            st = stats.columns[t.input]
            d.update(min=st["min"], max=st["max"])
        elif t.type == "bucketize":
            d["boundaries"] = sorted(set(stats.quantiles[t.output]))
        elif t.type in ("vocabulary", "tokens"):
            d["vocab"] = vocabs[t.output]
        elif t.type == "image" and t.normalize:
            d.update(images[t.output])
        transforms.append(d)
    classes = sorted(vocabs["\0label"]) if fit_classes else None
    if fit_classes and not classes:
        raise ValueError(f"label.source {lab.source!r} holds no values to take classes from; check the input")
    label = label_rule(config, classes) or {}
    if label and lab.task != "multilabel":
        label["source_type"] = types[lab.source]
    return PreprocessingSpec(
        dataset=config.dataset, transforms=transforms, label=label,
        id_column=config.id.column, weight_column=config.weight, source=dict(source or {}),
    )


def _transform_dict(t) -> dict[str, Any]:
    d: dict[str, Any] = {"type": t.type, "input": t.input, "output": t.output}
    if t.type == "numeric":
        d["fill"] = float(t.fill)
    elif t.type == "bucketize":
        d.update(num_buckets=t.num_buckets, accuracy=t.accuracy)
    elif t.type in ("vocabulary", "tokens"):
        d.update(min_count=t.min_count, top_k=t.top_k)
        if t.type == "tokens":
            d["length"] = t.length
    elif t.type == "hash":
        d["num_buckets"] = t.num_buckets
    elif t.type == "image":
        d.update(codec=t.codec, shape=list(t.shape), resize=list(t.resize) if t.resize else None,
                 normalize=t.normalize)
    if t.description:
        d["description"] = t.description
    return d


def _clean_columns(config: ETLConfig) -> list[str]:
    cols = [config.id.column] + [t.input for t in config.features] + [config.label.source]
    if config.weight:
        cols.append(config.weight)
    return list(dict.fromkeys(cols)) + ["split"]


def run_etl_config(config: ETLConfig, *, spark: "SparkSession", lakehouse: str) -> ETLResult:
    """Run the ETL described by ``config`` into the lakehouse at ``lakehouse``; see the module docstring."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    lh = Lakehouse(lakehouse)
    check_sources(config, lh.root)
    names = config.table_names()
    tables = {name: lh.table(name) for name in names.values()}
    if config.mode == "error":
        existing = on_storage(spark, _existing_tables, tables)
        if existing:
            raise ValueError(f"tables {existing} already exist under {lh.root}; pass mode='overwrite' "
                             "(--mode overwrite) to write new versions")
    declared = {role: DatasetSchema.load(s) for role, s in config.output.schemas.items()}
    seconds: dict[str, float] = {}
    jobs: dict[str, int] = {}
    start = tick = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        seconds[name] = round(now - tick, 3)
        tick = now

    raw = read_source(spark, config, config.main, lh.root)
    raw_columns = [c for c in raw.columns if c != config.id.column]
    if config.label.source not in raw.columns:
        raise ValueError(f"label.source {config.label.source!r} must be a column of the main source "
                         f"{config.main!r}; it has {raw.columns}")
    parsed = parse(raw, config)
    good = parsed.where(F.col("reason").isNull())
    good = good.withColumns({k: F.expr(v) for k, v in config.derive.items()}) if config.derive else good
    joined = apply_joins(spark, good, config, lh.root)
    reject_cols = [config.id.column, *[F.col(f"_raw_{c}" if c in config.columns else c).alias(c) for c in raw_columns],
                   "reason"]
    rejects = parsed.where(F.col("reason").isNotNull()).select(*reject_cols)
    if any(j.how == "inner" for j in config.joins):
        # Rows an inner join found no match for: rejected after the joins, with their raw values.
        rejects = rejects.unionByName(joined.where(F.col("reason").isNotNull()).select(*reject_cols))
        joined = joined.where(F.col("reason").isNull())
    for k, v in config.derive_after_joins.items():
        joined = joined.withColumn(k, F.expr(v))
    joined = joined.withColumn("split", split_column(config))
    missing = [c for c in _clean_columns(config) if c not in joined.columns]
    if missing:
        from sparkdl.errors import MissingColumnsError

        raise MissingColumnsError(f"the {config.dataset} ETL (features, label and weight)", missing,
                                  [c for c in joined.columns if not c.startswith("_") and c not in _INTERNAL])
    clean = joined.select(*_clean_columns(config))
    roles = {config.id.column: "id", **{t.input: "feature" for t in config.features}, config.label.source: "meta",
             "split": "meta", **({config.weight: "weight"} if config.weight else {})}
    nonnull = {config.id.column, config.label.source, "split"}
    clean_schema = declared.get("clean") or _inferred_schema(names.get("clean", f"{config.dataset}_clean"), clean,
                                                             roles, nonnull)
    clean = _conform(clean, clean_schema)
    rejects_schema = declared.get("rejects") or _inferred_schema(
        names["rejects"], rejects, {config.id.column: "id"}, {config.id.column, "reason"})
    rejects = _conform(rejects, rejects_schema)
    lap("plan")

    parsed = parsed.persist(StorageLevel.MEMORY_AND_DISK)
    cached = [parsed]
    try:
        rows_in = parsed.count()
        lap("parse")
        clean = clean.persist(StorageLevel.MEMORY_AND_DISK)
        cached.append(clean)
        # Counts and null checks before fitting: one pass per frame.
        by_reason = _rows_and_nulls(rejects, "reason", rejects_schema)
        by_split = _rows_and_nulls(clean, "split", clean_schema)
        reasons = {r: n for r, (n, _) in by_reason.items()}
        split_counts = {s: n for s, (n, _) in by_split.items()}
        rows_rejected, rows_clean = sum(reasons.values()), sum(split_counts.values())
        if rows_clean + rows_rejected != rows_in:
            raise RuntimeError(
                f"{config.dataset} ETL lost rows: {rows_in} in, but {rows_clean} usable + {rows_rejected} rejected "
                f"= {rows_clean + rows_rejected}; a join duplicated or dropped rows (check the join keys); "
                "no table was written")
        if reasons.get("invalid_label") and reasons["invalid_label"] == rows_in:
            raise ValueError(_label_error(config, rows_in))
        if not split_counts.get("train"):
            raise ValueError(f"the training split of {config.dataset} is empty ({rows_in} rows in, "
                             f"{rows_rejected} rejected {reasons}); check the split and the rules")
        lap("count")
        spec = fit_spec(spark, clean, config, jobs=jobs, source={
            "main": config.main, "fit_split": "train", "fit_rows": split_counts["train"], "rows_in": rows_in,
            "split": asdict(config.split), "sample_fraction": config.sample_fraction,
            **({"fit_table": tables[names["clean"]]} if "clean" in names else {}),
        })
        lap("fit")
        id_type = clean_schema.column(config.id.column).type
        encoded_cols = spec.outputs + (["split"] if config.output.include_split else [])
        generated = spec.columns(id_type) + ([ColumnSpec(name="split", type="string", role="meta", nullable=False,
                                                         description="train, valid or test")]
                                             if config.output.include_split else [])
        encoded_schema = DatasetSchema(name=f"{config.dataset}_encoded", columns=tuple(
            _merge_descriptions(generated, declared.get("encoded"))))
        check_schema = declared.get("encoded") or encoded_schema
        encoded = spec.encode(clean)
        parts = {s: _conform(encoded.where(F.col("split") == s).select(*encoded_cols), check_schema)
                 for s in config.split.names}
        counted = _rows_and_nulls(encoded.select(*dict.fromkeys(["split", *encoded_cols])), "split", encoded_schema)
        _raise_on_nulls(rejects_schema, by_reason)
        _raise_on_nulls(clean_schema, by_split)
        _raise_on_nulls(encoded_schema, counted)
        lap("check")

        spec_path, spec_sha = on_storage(spark, save_spec, spec, lh.root)
        expected = {names["rejects"]: rows_rejected, **{names[s]: split_counts.get(s, 0) for s in config.split.names}}
        if "clean" in names:
            expected[names["clean"]] = rows_clean
        accounting = json.dumps({"rows_in": rows_in, "rows_out": rows_clean, "rows_rejected": rows_rejected})
        etl_meta = {"sparkdl.etl": config.dataset, "sparkdl.etl_rows": accounting,
                    "sparkdl.etl_config": json.dumps(asdict(config), sort_keys=True, default=str)}
        spec_meta = {**etl_meta, **spec_commit_metadata(spec_path, spec_sha, config.dataset)}
        outputs: dict[str, tuple[Any, dict[str, str], dict[str, Any], DatasetSchema]] = {
            names["rejects"]: (rejects, etl_meta, {}, rejects_schema)}
        if "clean" in names:
            outputs[names["clean"]] = (clean, spec_meta, {}, clean_schema)
        for s in config.split.names:
            outputs[names[s]] = (parts[s], spec_meta, {"row_group_mb": config.output.row_group_mb}, encoded_schema)
        lap("spec")
        writes: dict[str, WriteResult] = {}
        for name, (df, meta, options, schema) in outputs.items():
            writes[name] = write_table(df, tables[name], mode=config.mode, schema=schema, commit_metadata=meta,
                                       **options)
            lap(f"write_{name}")
    finally:
        for df in cached:
            df.unpersist()

    drift = {n: (expected[n], w.num_rows) for n, w in writes.items() if w.num_rows is not None and w.num_rows != expected[n]}
    if drift:
        raise RuntimeError(
            f"{config.dataset} ETL accounting failed: the tables hold other row counts than counted before the "
            f"commits (table: (counted, written)) {drift}; the input changed while the job ran: re-run the ETL")
    seconds["total"] = round(time.perf_counter() - start, 3)
    return ETLResult(
        dataset=config.dataset, rows_in=rows_in, rows_out=rows_clean, rows_rejected=rows_rejected,
        rows_per_split={s: split_counts.get(s, 0) for s in config.split.names},
        reject_reasons=dict(sorted(reasons.items())), tables=tables,
        table_versions={n: w.version for n, w in writes.items()}, spec_path=spec_path, spec_sha256=spec_sha,
        analyzer_jobs=jobs, seconds=seconds,
    )


def _existing_tables(tables: dict[str, str]) -> list[str]:
    return [n for n, uri in tables.items() if table_exists(uri)]


def format_etl_result(name: str, result: Any) -> str:
    """Human summary of one ETL run: rows in = out + rejected, splits, table versions, spec, analyzer jobs."""
    rejected = getattr(result, "rows_rejected", 0)
    lines = [
        f"{name}: rows in {result.rows_in}, out {result.rows_out} "
        f"(train {result.rows_train}, valid {result.rows_valid}), rejected {rejected} "
        f"in {result.seconds.get('total', 0.0):.1f}s"
    ]
    lines.append(f"  rows in {result.rows_in} = out {result.rows_out} + rejected {rejected}"
                 f"{'' if result.rows_in == result.rows_out + rejected else '  MISMATCH'}")
    reasons = getattr(result, "reject_reasons", None)
    if reasons:
        lines.append("  rejected by reason: " + ", ".join(f"{k} {v}" for k, v in reasons.items()))
    for table, version in result.table_versions.items():
        lines.append(f"  {table} v{version}  {result.tables[table]}")
    spec = getattr(result, "spec_path", None)
    if spec:
        lines.append(f"  preprocessing spec {spec} (sha256 {result.spec_sha256[:12]})")
    jobs = getattr(result, "analyzer_jobs", None)
    if jobs:
        lines.append("  analyzer passes (Spark jobs): " + ", ".join(f"{k} {v}" for k, v in jobs.items()))
    return "\n".join(lines)
