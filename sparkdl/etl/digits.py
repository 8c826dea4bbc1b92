"""Moved: the digits dataset is a config in ``sparkdl.examples`` (kept importable here)."""

from sparkdl.examples.bundled import DIGITS_TABLES, run_digits_etl
from sparkdl.examples.digits import digits_images

__all__ = ["DIGITS_TABLES", "run_digits_etl", "digits_images"]
