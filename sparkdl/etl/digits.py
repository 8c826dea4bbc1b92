"""Digits ETL: scikit-learn's 1,797 8x8 digit images -> PNG bytes in digits_train / digits_valid.

Pixel values 0..16 are scaled to 0..255 (``round(v * 255 / 16)``) and stored as 8-bit
greyscale PNGs, the way image datasets usually arrive; the ``image`` column carries codec
``png`` and shape ``[8, 8]`` in the table's metadata, so loaders decode it without the YAML.
The split is ``valid`` when ``pmod(xxhash64(id, split_seed), 10000) < valid_fraction * 10000``.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sparkdl.lakehouse import Lakehouse, table_exists, write_table
from sparkdl.schema import DatasetSchema

if TYPE_CHECKING:
    import numpy as np
    from pyspark.sql import SparkSession

__all__ = ["DigitsETLResult", "run_digits_etl", "digits_images", "DIGITS_TABLES"]

DIGITS_TABLES = ("digits_train", "digits_valid")


@dataclass
class DigitsETLResult:
    """What one digits ETL run wrote."""

    rows_in: int
    """Images read from scikit-learn's digits (1,797)."""
    rows_train: int
    """Rows written to digits_train."""
    rows_valid: int
    """Rows written to digits_valid."""
    tables: dict[str, str]
    """Table name -> URI."""
    table_versions: dict[str, int]
    """Table name -> the version this run committed."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time in total."""

    @property
    def rows_out(self) -> int:
        return self.rows_train + self.rows_valid


def digits_images() -> tuple["np.ndarray", "np.ndarray"]:
    """(images uint8 [N, 8, 8] scaled to 0..255, labels int32 [N]) of ``load_digits()``."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return images, d.target.astype(np.int32)


def _png(image: "np.ndarray") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def run_digits_etl(
    *,
    spark: "SparkSession",
    lakehouse: str,
    mode: str = "overwrite",
    valid_fraction: float = 0.2,
    split_seed: int = 0,
) -> DigitsETLResult:
    """Write digits_train and digits_valid (columns per ``schemas/digits.yaml``)."""
    import pandas as pd
    from pyspark.sql import functions as F

    if mode not in ("overwrite", "error"):
        raise ValueError(f"mode must be 'overwrite' or 'error', got {mode!r}")
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}; try 0.2")
    lh = Lakehouse(lakehouse)
    tables = {name: lh.table(name) for name in DIGITS_TABLES}
    if mode == "error":
        existing = [n for n, uri in tables.items() if table_exists(uri)]
        if existing:
            raise ValueError(f"tables {existing} already exist under {lh.root}; pass mode='overwrite'")
    schema = DatasetSchema.load("digits")
    start = time.perf_counter()
    images, labels = digits_images()
    pdf = pd.DataFrame(
        {"id": range(len(labels)), "image": [_png(im) for im in images], "label": labels}
    ).astype({"id": "int64", "label": "int32"})
    # 1,797 small rows: built on the driver, spread over a few partitions for the write.
    df = spark.createDataFrame(pdf, schema="id long, image binary, label int").repartition(2, "id")
    cut = int(round(valid_fraction * 10_000))
    df = df.withColumn(
        "split",
        F.when(F.pmod(F.xxhash64(F.col("id"), F.lit(split_seed)), F.lit(10_000)) < cut, F.lit("valid")).otherwise(
            F.lit("train")
        ),
    ).select(*schema.names)
    schema.validate_spark(df, check_nulls=True)
    versions, counts = {}, {}
    for name, split in (("digits_train", "train"), ("digits_valid", "valid")):
        part = df.where(F.col("split") == split)
        res = write_table(
            part, tables[name], mode=mode, schema=schema,
            commit_metadata={"sparkdl.etl": "digits", "sparkdl.source": "sklearn.datasets.load_digits"},
        )
        versions[name] = res.version
        counts[name] = int(res.num_rows) if res.num_rows is not None else part.count()
    if counts["digits_train"] + counts["digits_valid"] != len(labels):
        raise RuntimeError(
            f"digits ETL lost rows: {len(labels)} images in, {counts['digits_train']} train + "
            f"{counts['digits_valid']} valid written"
        )
    return DigitsETLResult(
        rows_in=len(labels),
        rows_train=counts["digits_train"],
        rows_valid=counts["digits_valid"],
        tables=tables,
        table_versions=versions,
        seconds={"total": round(time.perf_counter() - start, 3)},
    )
