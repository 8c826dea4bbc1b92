"""Files of the lakehouse that are not Delta tables: runs, checkpoints, models, markers.

Delta tables go through Spark's Hadoop filesystems and deltalake; everything else sparkdl
writes goes through ``pyarrow.fs``, so the same code serves a local folder, ``file://``,
``s3://``/``s3a://``, ``gs://``, ``abfs://`` and ``hdfs://``. Paths are URIs or local paths, as
given to ``Lakehouse``.

``hdfs://`` (and ``viewfs://``) go through the ``hdfs-native`` client (``sparkdl[hdfs]``), a Rust
implementation of the HDFS protocol wrapped as a pyarrow filesystem: no libhdfs, JVM or
CLASSPATH on the ranks, and it reads HADOOP_CONF_DIR for name services. pyarrow's own
HadoopFileSystem is not used: it needs libhdfs.so, which no pip or Maven package ships
(docs/storage.md).

Atomicity: ``write_bytes`` writes a hidden temporary object and moves it into place. On a
local or HDFS filesystem the move is a rename; on object stores a single PUT is already
all-or-nothing, and the move is a server-side copy, so a reader never sees a torn file.
"""

from __future__ import annotations

import os
import uuid
from functools import lru_cache
from urllib.parse import unquote, urlparse

import pyarrow.fs as pafs

__all__: list[str] = []  # internal

_HADOOP_S3 = ("s3a://", "s3n://")
_HDFS_SCHEMES = ("hdfs", "viewfs")


def is_local(uri: str) -> bool:
    return urlparse(os.fspath(uri)).scheme in ("", "file")


def pyarrow_uri(uri: str) -> str:
    """``uri`` as pyarrow.fs and deltalake spell it: Hadoop's ``s3a://``/``s3n://`` become ``s3://``."""
    for prefix in _HADOOP_S3:
        if uri.startswith(prefix):
            return "s3://" + uri[len(prefix):]
    return uri


class _HdfsHandler(pafs.FSSpecHandler):
    """pyarrow's contract for ``move`` replaces an existing file; HDFS's rename needs OVERWRITE for that."""

    def move(self, src: str, dest: str) -> None:
        self.fs.mv(src, dest, overwrite=True)


def _hdfs(scheme: str, netloc: str) -> pafs.FileSystem:
    try:
        from hdfs_native.fsspec import HdfsFileSystem
    except ImportError as e:
        raise RuntimeError(
            f"{scheme}:// paths need the hdfs-native package: pip install 'sparkdl[hdfs]' (docs/storage.md)"
        ) from e
    host, _, port = netloc.partition(":")
    fs = HdfsFileSystem(host=host or None, port=int(port) if port else None)
    if scheme == "viewfs":
        fs.protocol = "viewfs"
    return pafs.PyFileSystem(_HdfsHandler(fs))


@lru_cache(maxsize=32)
def _fs_for(scheme_and_host: str, pid: int) -> pafs.FileSystem:
    """Cached per process (``pid``): a forked rank must not reuse its parent's client connections."""
    parsed = urlparse(scheme_and_host)
    if parsed.scheme in _HDFS_SCHEMES:
        return _hdfs(parsed.scheme, parsed.netloc)
    fs, _ = pafs.FileSystem.from_uri(scheme_and_host)
    return fs


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    uri = os.fspath(uri)
    if is_local(uri):
        path = unquote(urlparse(uri).path) if uri.startswith("file:") else uri
        return pafs.LocalFileSystem(), os.path.abspath(path)
    uri = pyarrow_uri(uri)
    parsed = urlparse(uri)
    try:
        fs = _fs_for(f"{parsed.scheme}://{parsed.netloc}", os.getpid())
    except RuntimeError:
        raise
    except Exception as e:
        raise RuntimeError(
            f"cannot open the filesystem of {uri} through pyarrow.fs ({type(e).__name__}: {e}); "
            "see docs/storage.md for what each scheme needs (credentials, endpoints, hdfs-native)"
        ) from e
    path = f"{parsed.netloc}{parsed.path}" if parsed.scheme in ("s3", "gs", "gcs") else parsed.path
    return fs, path.rstrip("/")


def join(base: str, *parts: str) -> str:
    return "/".join([os.fspath(base).rstrip("/"), *[p.strip("/") for p in parts]])


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def listdir(uri: str) -> list[str]:
    """Names (not paths) directly under ``uri``; empty when it does not exist."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return sorted(info.base_name for info in fs.get_file_info(pafs.FileSelector(path, recursive=False)))


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode()


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` at ``uri`` so that readers see the old content or the new, never a part."""
    fs, path = resolve(uri)
    parent, _, name = path.rpartition("/")
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        if isinstance(fs, pafs.LocalFileSystem):
            with open(tmp, "rb+") as f:  # durable before it becomes visible
                os.fsync(f.fileno())
        fs.move(tmp, path)
    finally:
        try:
            if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                fs.delete_file(tmp)
        except OSError:
            pass


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def delete(uri: str) -> None:
    """Delete a file or a folder tree; nothing when it does not exist."""
    fs, path = resolve(uri)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind != pafs.FileType.NotFound:
        fs.delete_file(path)


def local_path(uri: str) -> str | None:
    """The local filesystem path of ``uri``, or None when it is not local."""
    return resolve(uri)[1] if is_local(uri) else None
