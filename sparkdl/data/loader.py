"""TableLoader: one rank's shard of a Delta table version, streamed as batches of tensors.

See docs/loader.md for the guarantees and sparkdl/data/plan.py for how rows are assigned.
A background thread reads, decodes, shuffles and cuts batches ahead of the consumer, under
the bounds of ``prefetch_batches`` and ``max_bytes_in_flight`` (waiting batches) and
``max_memory_bytes`` (all buffers; see sparkdl/data/memory.py); it is started by each
iteration and stopped when the iteration ends, when the consumer breaks out of it, or on
``close()``.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import torch

from sparkdl.data.config import LoaderConfig
from sparkdl.data.decode import build_decoders, cut_batch, decode_block, permute_block
from sparkdl.data.memory import MemoryBound, fit_block_rows, memory_bound, row_sizes
from sparkdl.data.plan import (
    Segment,
    batches_per_epoch,
    block_permutation,
    rank_segments,
    rows_per_rank,
    slice_segments,
)
from sparkdl.data.prefetch import STOPPED as _STOPPED
from sparkdl.data.prefetch import Prefetcher
from sparkdl.data.source import PieceReader, list_pieces, resolve_source
from sparkdl.errors import EmptyTableError
from sparkdl.schema import DatasetSchema

__all__ = ["TableLoader"]

Batch = dict[str, Any]
# Keys of state_dict() that must match on load_state_dict() for "resume at the next row" to hold.
_STATE_MUST_MATCH = (
    "source", "filter", "rank", "world_size", "seed", "version", "num_rows", "batch_size", "shuffle",
    "block_rows", "drop_last", "remainder",
)


def _batch_bytes(batch: Any) -> int:
    if not isinstance(batch, Mapping):
        return 0
    total = 0
    for v in batch.values():
        if isinstance(v, torch.Tensor):
            total += v.element_size() * v.numel()
        elif isinstance(v, list):
            total += sum(len(x) for x in v if isinstance(x, (str, bytes)))
    return total


# Loaders with a live background thread. A daemon producer still inside Arrow or torch code
# when the interpreter finalizes aborts the process ("terminate called without an active
# exception"), so the threads of loaders left open are stopped at exit.
_OPEN_LOADERS: "weakref.WeakSet[TableLoader]" = weakref.WeakSet()


@atexit.register
def _stop_open_loaders() -> None:
    for loader in list(_OPEN_LOADERS):
        loader._stop_active()


def _source_id(uri: str | None, files: Sequence[str]) -> str:
    """What a resume must read again: the Delta table, or the Parquet files in their order."""
    if uri is not None:
        return uri
    return "files:" + hashlib.sha256("\n".join(files).encode()).hexdigest()[:16]


class TableLoader:
    """Batches of ``dict[str, torch.Tensor]`` from rank ``rank``'s shard of a table.

    ``source``: a Delta table URI or path (``version`` picks one, default the latest) or a
    list of Parquet files. Every rank of a world gets exactly ``len(loader)`` batches per
    epoch, and the ranks together see every row once per epoch (apart from
    ``LoaderConfig.remainder`` and ``drop_last``). Use it as a context manager, or call
    :meth:`close`.

    ``filter``: a ``pyarrow.dataset`` expression, pushed down to Parquet (row-group
    statistics, partition values); ``transform``: applied to every batch in the
    background thread; ``schema``: codecs and shapes to decode by (default: the table's
    sparkdl column metadata); ``storage_options``: for the Delta log (deltalake);
    ``filesystem``: the ``pyarrow.fs`` filesystem of the data files (default: from the URI,
    or from S3 ``storage_options``). ``memory_bound`` reports what the buffers may hold and
    ``block_rows`` the shuffle buffer actually used.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | Sequence[str],
        *,
        version: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        config: LoaderConfig | None = None,
        filter: ds.Expression | None = None,  # noqa: A002 - the public name of the argument
        transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
        schema: DatasetSchema | None = None,
        storage_options: Mapping[str, str] | None = None,
        filesystem: pafs.FileSystem | None = None,
    ) -> None:
        for name, value in (("rank", rank), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name}={value!r} must be an integer")
        if world_size < 1:
            raise ValueError(f"world_size={world_size} must be at least 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is out of range for world_size={world_size}; ranks are 0..{world_size - 1}")
        if filter is not None and not isinstance(filter, ds.Expression):
            raise ValueError(
                f"filter={filter!r} must be a pyarrow.dataset.Expression, e.g. pyarrow.dataset.field('x') > 0"
            )
        if transform is not None and not callable(transform):
            raise ValueError(f"transform={transform!r} must be a callable taking and returning a batch dict")
        self.config = config if config is not None else LoaderConfig()
        if not isinstance(self.config, LoaderConfig):
            raise ValueError(f"config must be a LoaderConfig, not {type(self.config).__name__}")
        self.rank = int(rank)
        self.world_size = int(world_size)
        self._filter = filter
        self._transform = transform
        self._device = torch.device(self.config.device) if self.config.device else None
        if self._device is not None and self._device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"LoaderConfig.device={self.config.device!r} but CUDA is not available here")
        self._pin = self.config.pin_memory and torch.cuda.is_available()
        if self.config.pin_memory and not self._pin:
            warnings.warn("LoaderConfig.pin_memory=True is ignored: CUDA is not available", stacklevel=2)

        self._source = resolve_source(source, version=version, storage_options=storage_options, filesystem=filesystem)
        self.version: int | None = self._source.version
        available = self._source.schema.names
        columns = self.config.columns if self.config.columns is not None else list(available)
        unknown = [c for c in columns if c not in available]
        if unknown:
            raise ValueError(f"unknown columns {unknown} in LoaderConfig.columns; available columns: {available}")
        self.columns = columns
        self._decoders = build_decoders(self._source.schema, columns, schema, self.config.dtypes)

        pieces, fragments = list_pieces(self._source, filter)
        self._counts = np.array([p.num_rows for p in pieces], dtype=np.int64)
        self.num_rows = int(self._counts.sum())
        where = self._source.uri or f"{len(self._source.files)} Parquet files"
        if self.num_rows == 0:
            detail = f" match the filter {filter}" if filter is not None else " to load"
            raise EmptyTableError(f"{where} (version {self.version}) has no rows{detail}")
        self.rows_per_rank = rows_per_rank(self.num_rows, self.world_size, self.config.remainder)
        if self.rows_per_rank == 0:
            raise EmptyTableError(
                f"{where} has {self.num_rows} rows, fewer than world_size={self.world_size}, so remainder='drop' "
                "leaves every rank empty; use LoaderConfig(remainder='pad') or fewer ranks"
            )
        self._len = batches_per_epoch(self.rows_per_rank, self.config.batch_size, self.config.drop_last)
        if self._len == 0:
            raise EmptyTableError(
                f"each rank gets {self.rows_per_rank} rows of {where}, less than one batch of "
                f"batch_size={self.config.batch_size}, and drop_last=True drops it; lower batch_size or "
                "set drop_last=False"
            )
        self._reader = PieceReader(self._source, pieces, fragments, columns, filter)
        self._sizes = row_sizes(self._source.schema, self._decoders, fragments)
        bound_args = dict(
            group_rows=max(int(f.row_groups[0].num_rows) for f in fragments),
            prefetch_batches=self.config.prefetch_batches,
            max_bytes_in_flight=self.config.max_bytes_in_flight,
            pin=self._pin,
        )
        block_rows = self.config.block_rows
        if self.config.max_memory_bytes is not None:
            block_rows = fit_block_rows(
                self.config.max_memory_bytes, block_rows, batch_size=self.config.batch_size, sizes=self._sizes,
                **bound_args,
            )
        self.block_rows = block_rows
        """Rows of the shuffle buffer: LoaderConfig.block_rows, shrunk to fit max_memory_bytes."""
        self.memory_bound: MemoryBound = memory_bound(
            self._sizes, block_rows=block_rows, batch_size=self.config.batch_size, **bound_args
        )
        """What the loader's buffers may hold at once (bytes), besides the consumer's batch."""
        self.epoch = 0
        self._position = 0
        self._resume: tuple[int, int] | None = None
        self._active: Prefetcher | None = None
        self._closed = False

    # ----- sizes and state -----
    def __len__(self) -> int:
        """Batches per epoch for this rank; the same on every rank."""
        return self._len

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration yields (its shuffle), starting at its first batch,
        unless a ``load_state_dict`` for this same epoch is pending."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch={epoch!r} must be a non-negative integer")
        self._stop_active()
        if self._resume is not None and self._resume[0] == epoch:
            self.epoch, self._position = self._resume
        else:
            self.epoch, self._position = int(epoch), 0
        self._resume = None

    def state_dict(self) -> dict[str, Any]:
        """Where this rank is: ``position`` counts the batches of ``epoch`` already handed out."""
        cfg = self.config
        return {
            "epoch": self.epoch,
            "position": self._position,
            "source": _source_id(self._source.uri, self._source.files),
            "filter": None if self._filter is None else str(self._filter),
            "seed": cfg.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "version": self.version,
            "num_rows": self.num_rows,
            "batch_size": cfg.batch_size,
            "shuffle": cfg.shuffle,
            "shuffle_buffer_rows": cfg.shuffle_buffer_rows,
            "block_rows": self.block_rows,
            "drop_last": cfg.drop_last,
            "remainder": cfg.remainder,
            "batches_per_epoch": self._len,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Make the next iteration of ``state["epoch"]`` start at the first batch not yet handed out."""
        mine = self.state_dict()
        missing = [k for k in ("epoch", "position", *_STATE_MUST_MATCH) if k not in state]
        if missing:
            raise ValueError(f"loader state lacks keys {missing}; pass a dict from TableLoader.state_dict()")
        for key in _STATE_MUST_MATCH:
            if state[key] != mine[key]:
                raise ValueError(
                    f"loader state was saved with {key}={state[key]!r} but this loader has {key}={mine[key]!r}; "
                    f"an exact resume needs the same {key} (pass it to TableLoader/LoaderConfig)"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self._len:
            raise ValueError(f"loader state has epoch={epoch}, position={position}; position must be in 0..{self._len}")
        self._stop_active()
        self.epoch, self._position = epoch, position
        self._resume = (epoch, position)

    # ----- iteration -----
    def __iter__(self) -> Iterator[Batch]:
        """One epoch (``self.epoch``) of batches, from the current position; afterwards the
        loader is at the next epoch, position 0."""
        if self._closed:
            raise ValueError("this TableLoader is closed; create a new one")
        self._stop_active()
        self._resume = None
        return self._iterate(self.epoch, self._position)

    def _iterate(self, epoch: int, start: int) -> Iterator[Batch]:
        prefetcher: Prefetcher | None = None
        try:
            if start < self._len:
                segments = rank_segments(
                    self._counts, self.rank, self.world_size, epoch=epoch, seed=self.config.seed,
                    shuffle=self.config.shuffle, remainder=self.config.remainder,
                )
                prefetcher = Prefetcher(
                    lambda put: self._produce(put, epoch, start, segments),
                    max_items=self.config.prefetch_batches,
                    max_bytes=self.config.max_bytes_in_flight,
                )
                self._active = prefetcher
                _OPEN_LOADERS.add(self)
                for batch in prefetcher:
                    if batch is _STOPPED:
                        raise RuntimeError(
                            "this iteration was stopped: the loader was closed, or set_epoch(), "
                            "load_state_dict() or a new iteration started while it ran"
                        )
                    if self._device is not None:
                        batch = self._to_device(batch)
                    self._position += 1
                    yield batch
            self.epoch, self._position = epoch + 1, 0
        finally:
            if prefetcher is not None:
                prefetcher.close()
                if self._active is prefetcher:
                    self._active = None

    def _to_device(self, batch: Any) -> Any:
        if not isinstance(batch, Mapping):
            return batch
        return {
            k: v.to(self._device, non_blocking=self._pin) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()
        }

    def _produce(self, put: Callable[[Any, int], None], epoch: int, start_batch: int, segments: list[Segment]) -> None:
        cfg = self.config
        B, S, R = cfg.batch_size, self.block_rows, self.rows_per_rank
        rows_out = min(R, self._len * B)  # rows handed out this epoch (drop_last cuts the tail)
        first = (start_batch * B) // S
        blocks = [k for k in range(first, -(-R // S)) if k * S < rows_out]
        block_segments = {k: slice_segments(segments, k * S, min((k + 1) * S, R)) for k in blocks}
        images = any(d.kind == "image" for d in self._decoders)
        pool = ThreadPoolExecutor(cfg.decode_threads, thread_name_prefix="sparkdl-loader-decode") if (
            images and cfg.decode_threads > 1) else None
        # One block is read ahead while the current one is cut into batches: Parquet decoding
        # runs outside the GIL, so it overlaps with the Python work of batching.
        read_ahead = ThreadPoolExecutor(1, thread_name_prefix="sparkdl-loader-read")
        reader = self._reader
        release = cfg.max_memory_bytes is not None
        try:
            pending = read_ahead.submit(reader.read, block_segments[blocks[0]]) if blocks else None
            for i, k in enumerate(blocks):
                lo, hi = k * S, min((k + 1) * S, R)
                table = pending.result()
                pending = read_ahead.submit(reader.read, block_segments[blocks[i + 1]]) if i + 1 < len(blocks) else None
                segs = block_segments[k]

                def where(row: int, _segs: list[Segment] = segs) -> str:
                    return reader.locate(_segs, row)

                block = decode_block(table, self._decoders, where)
                del table
                if cfg.shuffle:
                    perm = block_permutation(hi - lo, seed=cfg.seed, epoch=epoch, rank=self.rank, block=k)
                    permute_block(block, perm)

                    def where_out(row: int, _perm: np.ndarray = perm, _where: Callable[[int], str] = where) -> str:
                        return _where(int(_perm[row]))
                else:
                    where_out = where
                for b_lo in range(max(lo, start_batch * B), min(hi, rows_out), B):
                    b_hi = min(b_lo + B, hi, rows_out)
                    # Batches are copies, not views of the block (see sparkdl/data/memory.py).
                    batch = cut_batch(block, self._decoders, b_lo - lo, b_hi - lo, where_out, pool, cfg.decode_threads)
                    if self._transform is not None:
                        batch = self._transform(batch)
                    if self._pin and isinstance(batch, Mapping):
                        batch = {k2: v.pin_memory() if isinstance(v, torch.Tensor) else v for k2, v in batch.items()}
                    # Charged at what the batch holds (decoded images included), so that
                    # max_bytes_in_flight bounds the memory the waiting batches really use.
                    put(batch, _batch_bytes(batch))
                    del batch
                del block
                if release:
                    # Under a memory budget, hand the block's freed Arrow pages back to the OS now:
                    # mimalloc otherwise keeps them a while, and the resident set outgrows the bound.
                    pa.default_memory_pool().release_unused()
        finally:
            read_ahead.shutdown(wait=True, cancel_futures=True)
            reader.clear()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    # ----- lifecycle -----
    def _stop_active(self) -> None:
        if self._active is not None:
            self._active.close()
            self._active = None

    def close(self) -> None:
        """Stop the background threads and drop prefetched batches; idempotent."""
        self._stop_active()
        self._reader.clear()
        self._closed = True

    def __enter__(self) -> "TableLoader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        src = self._source.uri or f"{len(self._source.files)} files"
        return (
            f"TableLoader({src!r}, version={self.version}, rank={self.rank}/{self.world_size}, "
            f"rows={self.num_rows}, batches={self._len}, epoch={self.epoch}, position={self._position})"
        )
