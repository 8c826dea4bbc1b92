"""The loader's input: a Delta table version or a list of Parquet files, as row-group pieces.

Only stable ``pyarrow.dataset`` / ``pyarrow.parquet`` / ``pyarrow.fs`` APIs are used: one
``ParquetFileFragment`` per file (carrying the Delta partition values as its partition
expression, so partition columns read like any other column and filters on them prune whole
files), split into one fragment per row group.
"""

from __future__ import annotations

import functools

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Mapping, Sequence
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from sparkdl import _fs
from sparkdl.data.plan import Piece, Segment
from sparkdl.errors import EmptyTableError, LoaderError

__all__ = ["TableSource", "resolve_source", "list_pieces", "PieceReader", "s3_filesystem"]

_LOCAL_SCHEMES = ("", "file")
# Schemes whose filesystem paths carry no host part (the host is the cluster, not a bucket).
_HOSTLESS_SCHEMES = ("hdfs", "viewfs")


@dataclass
class TableSource:
    """What a loader reads: files, their filesystem, the table schema and the row-group pieces."""

    uri: str | None
    """Delta table root, or None for a plain file list."""
    version: int | None
    """Resolved Delta version, or None for a plain file list."""
    files: list[str]
    """File URIs as the table lists them (used in messages)."""
    schema: pa.Schema
    """Schema of the table, partition columns included, with sparkdl column metadata if any."""
    fragments: list[ds.ParquetFileFragment]
    """One fragment per file, with the file's partition values as its partition expression."""


def _fs_path(uri: str) -> str:
    parsed = urlparse(uri)
    if parsed.scheme in _LOCAL_SCHEMES or (len(parsed.scheme) == 1 and os.name == "nt"):
        return unquote(parsed.path) if parsed.scheme == "file" else uri
    if parsed.scheme in _HOSTLESS_SCHEMES:
        return parsed.path
    return f"{parsed.netloc}{parsed.path}"


# deltalake (object_store) storage option keys -> pyarrow.fs.S3FileSystem arguments.
_S3_OPTIONS = {
    "aws_access_key_id": "access_key", "access_key_id": "access_key",
    "aws_secret_access_key": "secret_key", "secret_access_key": "secret_key",
    "aws_session_token": "session_token", "session_token": "session_token", "aws_token": "session_token",
    "aws_region": "region", "region": "region", "aws_default_region": "region",
    "aws_endpoint_url": "endpoint_override", "aws_endpoint": "endpoint_override", "endpoint": "endpoint_override",
    "endpoint_url": "endpoint_override",
}
_S3_SCHEMES = ("s3", "s3a", "s3n")


def s3_filesystem(storage_options: Mapping[str, str]) -> pafs.S3FileSystem:
    """A ``pyarrow.fs.S3FileSystem`` configured by deltalake-style S3 ``storage_options`` (keys
    ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``,
    ``AWS_ENDPOINT_URL``, ``AWS_ALLOW_HTTP``; any case); other keys are ignored."""
    kwargs: dict[str, str] = {}
    allow_http = False
    for key, value in storage_options.items():
        k = key.lower()
        if k in _S3_OPTIONS:
            kwargs[_S3_OPTIONS[k]] = str(value)
        elif k in ("aws_allow_http", "allow_http"):
            allow_http = str(value).lower() in ("1", "true", "yes")
    endpoint = kwargs.get("endpoint_override")
    if endpoint is not None:
        parsed = urlparse(endpoint)
        if parsed.scheme in ("http", "https"):
            kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
            kwargs["scheme"] = parsed.scheme
        elif allow_http:
            kwargs["scheme"] = "http"
    return pafs.S3FileSystem(**kwargs)


def _filesystem_for(
    files: Sequence[str], filesystem: pafs.FileSystem | None, storage_options: Mapping[str, str] | None = None
) -> tuple[pafs.FileSystem, list[str]]:
    if filesystem is None:
        scheme = urlparse(files[0]).scheme
        if scheme in _LOCAL_SCHEMES:
            filesystem = pafs.LocalFileSystem()
        elif scheme in _S3_SCHEMES and storage_options:
            # The Delta log is read with storage_options; the data files must see the same
            # credentials and endpoint (e.g. MinIO), not the default AWS chain.
            filesystem = s3_filesystem(storage_options)
        elif scheme in _HOSTLESS_SCHEMES:
            filesystem = _fs.resolve(files[0])[0]  # hdfs-native: pyarrow's HDFS needs libhdfs
        else:
            try:
                filesystem, _ = pafs.FileSystem.from_uri(_fs.pyarrow_uri(files[0]))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
                raise RuntimeError(
                    f"pyarrow has no filesystem for {files[0]}: {e}. Pass filesystem= a "
                    "pyarrow.fs.FileSystem (e.g. pyarrow.fs.S3FileSystem(...), or an fsspec one "
                    "wrapped as pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)))"
                ) from e
    return filesystem, [_fs_path(_fs.pyarrow_uri(f)) for f in files]


def _remote_hint(path: str) -> str:
    if urlparse(path).scheme in _LOCAL_SCHEMES:
        return ""
    return (
        "; the data files are read through pyarrow.fs, not deltalake: pass TableLoader(filesystem=...) "
        "configured for this store (S3 storage_options are mapped to pyarrow.fs.S3FileSystem)"
    )


def _partition_expression(values: Mapping[str, str | None], schema: pa.Schema) -> ds.Expression | None:
    expr = None
    for name, raw in values.items():
        field = schema.field(name)
        if raw is None:
            term = ds.field(name).is_null()
        else:
            try:
                value = pa.scalar(raw, pa.string()).cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise LoaderError(
                    f"partition value {raw!r} of column {name!r} does not convert to {field.type}: {e}"
                ) from e
            term = ds.field(name) == value
        expr = term if expr is None else expr & term
    return expr


def resolve_source(
    source: str | os.PathLike[str] | Sequence[str],
    *,
    version: int | None,
    storage_options: Mapping[str, str] | None,
    filesystem: pafs.FileSystem | None,
) -> TableSource:
    """Resolve a Delta URI (at ``version``) or a list of Parquet files to its fragments."""
    fmt = ds.ParquetFileFormat()
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        # A remote *.parquet URI is taken as one file (isfile cannot look there); a Delta
        # table's root is a folder, whose name rarely ends in .parquet.
        scheme = urlparse(text).scheme
        remote = scheme not in _LOCAL_SCHEMES and len(scheme) > 1
        if text.endswith(".parquet") and (remote or os.path.isfile(_fs_path(text))):
            source = [text]
        else:
            return _resolve_delta(text, version, storage_options, filesystem, fmt)
    files = [os.fspath(f) for f in source]
    if version is not None:
        raise ValueError("version= applies to a Delta table; a list of Parquet files has no versions")
    if not files:
        raise EmptyTableError("the list of Parquet files is empty; pass at least one file")
    fs, paths = _filesystem_for(files, filesystem, storage_options)
    try:
        schema = ds.dataset(paths, format=fmt, filesystem=fs).schema
    except (FileNotFoundError, pa.ArrowInvalid, OSError) as e:
        raise LoaderError(
            f"cannot open the Parquet files {files[:3]}{'...' if len(files) > 3 else ''}: {e}{_remote_hint(files[0])}"
        ) from e
    fragments = [fmt.make_fragment(p, filesystem=fs) for p in paths]
    return TableSource(uri=None, version=None, files=files, schema=schema, fragments=fragments)


def _resolve_delta(
    uri: str,
    version: int | None,
    storage_options: Mapping[str, str] | None,
    filesystem: pafs.FileSystem | None,
    fmt: ds.ParquetFileFormat,
) -> TableSource:
    from sparkdl.lakehouse import snapshot

    snap = snapshot(uri, version, storage_options=storage_options)
    if not snap.files:
        raise EmptyTableError(f"table {snap.uri} version {snap.version} has no data files (no rows to load)")
    # Sorted, so every rank (and every process) sees the pieces in one order, whatever
    # order the Delta log replay lists the files in.
    listed = sorted(zip(snap.files, snap.partition_values), key=lambda fp: fp[0])
    files = [f for f, _ in listed]
    fs, paths = _filesystem_for(files, filesystem, storage_options)
    schema = snap.schema
    fragments = [
        fmt.make_fragment(p, filesystem=fs, partition_expression=_partition_expression(pv, schema))
        if pv else fmt.make_fragment(p, filesystem=fs)
        for p, (_, pv) in zip(paths, listed)
    ]
    return TableSource(uri=snap.uri, version=snap.version, files=files, schema=schema, fragments=fragments)


def _filter_error(flt: ds.Expression, schema: pa.Schema, e: Exception) -> ValueError:
    return ValueError(f"filter {flt} cannot be applied: {e}; available columns: {schema.names}")


def list_pieces(
    source: TableSource, flt: ds.Expression | None, *, threads: int = 8
) -> tuple[list[Piece], list[ds.ParquetFileFragment]]:
    """Every non-empty row group of the source as a piece (rows counted under ``flt``), in file
    then row-group order, with the row-group fragment that reads it."""

    def one_file(i: int) -> list[tuple[Piece, ds.ParquetFileFragment]]:
        frag = source.fragments[i]
        try:
            frag.ensure_complete_metadata()
        except (OSError, pa.ArrowInvalid) as e:
            raise LoaderError(
                f"cannot read the Parquet footer of {source.files[i]}: {e}{_remote_hint(source.files[i])}"
            ) from e
        starts, pos = {}, 0
        for rg in frag.row_groups:
            starts[rg.id] = pos
            pos += rg.num_rows
        try:
            subs = frag.split_by_row_group(flt, schema=source.schema) if flt is not None else frag.split_by_row_group()
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError) as e:
            raise _filter_error(flt, source.schema, e) from e
        out = []
        for sub in subs:
            rg = sub.row_groups[0]
            if flt is None:
                n = rg.num_rows
            else:
                try:
                    n = sub.scanner(schema=source.schema, columns=[], filter=flt).count_rows()
                except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError) as e:
                    raise _filter_error(flt, source.schema, e) from e
            if n:
                out.append((Piece(file=i, row_group=rg.id, num_rows=int(n), first_row=starts[rg.id]), sub))
        return out

    n_files = len(source.fragments)
    with ThreadPoolExecutor(max(1, min(threads, n_files)), thread_name_prefix="sparkdl-loader-plan") as pool:
        per_file = list(pool.map(one_file, range(n_files)))
    pieces = [p for chunk in per_file for p, _ in chunk]
    fragments = [f for chunk in per_file for _, f in chunk]
    return pieces, fragments


@functools.cache
def loader_memory_pool() -> pa.MemoryPool:
    """The Arrow memory pool the loader decodes and gathers row groups into: jemalloc where
    pyarrow has it. With mimalloc (Arrow's default) the resident set outgrew the loader's
    memory bound by 10-60 MiB (freed row groups' pages kept, and purged then faulted in again);
    jemalloc stayed within it at the same speed (docs/benchmarks.md)."""
    try:
        return pa.jemalloc_memory_pool()
    except NotImplementedError:  # a pyarrow built without it (e.g. on Windows)
        return pa.default_memory_pool()


class PieceReader:
    """Reads segments of pieces (projected, filtered) as one Arrow table.

    Keeps the last piece it read (``keep_all``: every piece, until :meth:`retain` drops it):
    consecutive blocks of a rank's stream usually share a row group at their boundary,
    and with shuffle lanes every block reads a stripe of each lane's open row group.
    """

    def __init__(
        self,
        source: TableSource,
        pieces: list[Piece],
        fragments: list[ds.ParquetFileFragment],
        columns: list[str],
        flt: ds.Expression | None,
        *,
        verify_checksums: bool = True,
        keep_all: bool = False,
    ) -> None:
        self._source = source
        self._pieces = pieces
        self._fragments = fragments
        self._columns = columns
        self._filter = flt
        self._keep_all = keep_all
        # Rebound, never mutated in place by clear()/retain(): the read-ahead thread may be reading.
        self._cache: dict[int, pa.Table] = {}
        # A flipped bit in a data page otherwise decodes into wrong values without any error;
        # pages written without a CRC (some writers omit it) are read unverified.
        self._scan_options = ds.ParquetFragmentScanOptions(page_checksum_verification=verify_checksums)

    def read_piece(self, index: int) -> pa.Table:
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        piece = self._pieces[index]
        try:
            table = self._fragments[index].to_table(
                schema=self._source.schema, columns=self._columns, filter=self._filter, use_threads=True,
                fragment_scan_options=self._scan_options, memory_pool=loader_memory_pool(),
            )
        except (OSError, pa.ArrowInvalid) as e:
            where = self._source.files[piece.file]
            if "checksum" in str(e).lower() or "crc" in str(e).lower():
                raise LoaderError(
                    f"row group {piece.row_group} of {where} is corrupt: {e}. The file changed after it was "
                    "written (disk or transfer damage); restore it from a replica or backup, or rewrite the "
                    "table (re-run the job that wrote it) and train on the new version"
                ) from e
            raise LoaderError(f"cannot read row group {piece.row_group} of {where}: {e}{_remote_hint(where)}") from e
        if table.num_rows != piece.num_rows:
            raise LoaderError(
                f"row group {piece.row_group} of {self._source.files[piece.file]} has {table.num_rows} "
                f"rows now but {piece.num_rows} when the loader was planned; the file changed underneath "
                "the loader (Delta data files must be immutable: rewrite tables as new versions)"
            )
        if self._keep_all:
            self._cache[index] = table
        else:
            self._cache = {index: table}
        return table

    def read(self, segments: Sequence[Segment]) -> pa.Table:
        parts = [self.read_piece(s.piece).slice(s.start, s.num_rows) for s in segments]
        if len(parts) == 1:
            return parts[0]
        return pa.concat_tables(parts)

    def missing(self, segments: Sequence[Segment]) -> list[int]:
        """The pieces of ``segments`` not cached, each once, in order."""
        cache = self._cache
        return list(dict.fromkeys(s.piece for s in segments if s.piece not in cache))

    def clear(self) -> None:
        self._cache = {}

    def retain(self, pieces: set[int]) -> None:
        """Drop the cached pieces not in ``pieces``."""
        self._cache = {i: t for i, t in self._cache.items() if i in pieces}

    def locate(self, segments: Sequence[Segment], row: int) -> str:
        """Where row ``row`` of the concatenation of ``segments`` lives, for error messages."""
        for seg in segments:
            if row < seg.num_rows:
                piece = self._pieces[seg.piece]
                where = self._source.files[piece.file]
                if self._filter is None:
                    return f"{where}, row {piece.first_row + seg.start + row}"
                return (
                    f"{where}, row group {piece.row_group} (rows {piece.first_row}..), "
                    f"match #{seg.start + row} of the filter {self._filter}"
                )
            row -= seg.num_rows
        return "an unknown row"
