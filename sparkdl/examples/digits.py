"""Raw ingest of scikit-learn's digits: 1,797 8x8 images as PNG bytes in one Parquet file.

Pixel values 0..16 are scaled to 0..255 (``round(v * 255 / 16)``) and stored as 8-bit
greyscale PNGs, the way image datasets usually arrive. ``digits.yaml`` then runs them through
the generic ETL into digits_train / digits_valid.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from sparkdl import _fs
from sparkdl.lakehouse import Lakehouse, delta_uri, join_uri, normalize_uri

if TYPE_CHECKING:
    import numpy as np

__all__ = ["digits_images", "ingest_digits"]


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


def ingest_digits(lakehouse: str) -> str:
    """Write ``<lakehouse>/raw/digits/digits.parquet`` (id int64, image binary PNG, label int32)
    unless it exists; returns its URI."""
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    path = join_uri(Lakehouse(lakehouse).raw(), "digits", "digits.parquet")
    if _fs.exists(path):
        return path
    images, labels = digits_images()
    table = pa.table({
        "id": pa.array(range(len(labels)), pa.int64()),
        "image": pa.array([_png(im) for im in images], pa.binary()),
        "label": pa.array(labels, pa.int32()),
    })
    fs, base = pafs.FileSystem.from_uri(delta_uri(path) if not _fs.is_local(path) else normalize_uri(path))
    fs.create_dir(base.rsplit("/", 1)[0], recursive=True)
    tmp = f"{base}.tmp"
    pq.write_table(table, tmp, filesystem=fs)
    fs.move(tmp, base)  # a crashed ingest leaves no half-written file under the final name
    return path
