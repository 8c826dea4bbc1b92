"""The bundled datasets as configs on top of the generic ETL: nycflights13 and scikit-learn digits.

Each is a YAML description (``flights.yaml``, ``digits.yaml`` next to this file) plus a raw
ingest helper that places the files the config reads under ``<lakehouse>/raw/``. Nothing in
the generic engine (``sparkdl.etl``) knows them; ``run_flights_etl`` and ``run_digits_etl``
keep the earlier entry points working.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from sparkdl.etl.config import ETLConfig

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from sparkdl.etl.engine import ETLResult

__all__ = ["BUNDLED", "bundled_config", "config_path", "prepare", "ingest_for_config", "FlightsETLConfig",
           "run_flights_etl", "run_digits_etl", "digits_images", "ingest_nycflights13", "nycflights13_dir",
           "NUMERIC_FEATURES", "CATEGORICAL_FEATURES", "FLIGHTS_TABLES", "DIGITS_TABLES"]

_HERE = Path(__file__).resolve().parent


def _ingest_flights(lakehouse: str) -> None:
    from sparkdl.examples.nycflights13 import ingest_nycflights13

    ingest_nycflights13(lakehouse)


def _ingest_digits(lakehouse: str) -> None:
    from sparkdl.examples.digits import ingest_digits

    ingest_digits(lakehouse)


BUNDLED: dict[str, Callable[[str], None]] = {"flights": _ingest_flights, "digits": _ingest_digits}
"""Bundled dataset -> its raw ingest (idempotent)."""


def config_path(name: str) -> Path:
    """The YAML file of a bundled dataset."""
    if name not in BUNDLED:
        raise ValueError(f"no bundled dataset {name!r}; bundled: {list(BUNDLED)} (or pass --config <file.yaml>)")
    return _HERE / f"{name}.yaml"


def bundled_config(name: str) -> ETLConfig:
    return ETLConfig.from_yaml(config_path(name))


def ingest_for_config(path: str | Path) -> Callable[[str], None] | None:
    """The raw ingest of a config file when it is one of the bundled ones, else None."""
    resolved = Path(path).resolve()
    for name in BUNDLED:
        if config_path(name) == resolved:
            return BUNDLED[name]
    return None


def prepare(name: str, lakehouse: str) -> ETLConfig:
    """Ingest a bundled dataset's raw files into the lakehouse and return its config."""
    config = bundled_config(name)
    BUNDLED[name](lakehouse)
    return config


def __getattr__(name: str):
    # The flights/digits entry points load lazily: importing sparkdl.examples stays cheap.
    if name in ("FlightsETLConfig", "run_flights_etl", "NUMERIC_FEATURES", "CATEGORICAL_FEATURES", "FLIGHTS_TABLES"):
        from sparkdl.examples import bundled

        return getattr(bundled, name)
    if name in ("run_digits_etl", "DIGITS_TABLES"):
        from sparkdl.examples import bundled

        return getattr(bundled, name)
    if name == "digits_images":
        from sparkdl.examples.digits import digits_images

        return digits_images
    if name in ("ingest_nycflights13", "nycflights13_dir"):
        from sparkdl.examples import nycflights13

        return getattr(nycflights13, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
