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
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import torch

from sparkdl.data.config import REMAINDER_POLICIES, LoaderConfig
from sparkdl.data.decode import build_decoders, concat_batches, cut_batch, cut_batches, decode_block
from sparkdl.data.memory import MIN_STRIPE_ROWS, MemoryBound, choose_lanes, fit_block_rows, memory_bound, row_sizes
from sparkdl.data.plan import (
    EpochOrder,
    Interval,
    Segment,
    Visit,
    batches_per_epoch,
    block_visits,
    complement,
    consumed_after,
    interval_rows,
    merge_intervals,
    rank_intervals,
    rows_per_rank,
    slice_intervals,
)
from sparkdl.data.prefetch import STOPPED as _STOPPED
from sparkdl.data.prefetch import Prefetcher
from sparkdl.data.source import PieceReader, list_pieces, loader_memory_pool, resolve_source
from sparkdl.errors import EmptyTableError
from sparkdl.schema import DatasetSchema

__all__ = ["TableLoader", "PAD_MASK"]

PAD_MASK = "_valid"
"""Key of the boolean mask every batch carries under ``remainder="pad"``: False for a row that
pads the rank (a repeat of a row another rank, or this one, reads in the same epoch)."""

Batch = dict[str, Any]
# Keys of state_dict() that must match on load_state_dict() for "resume at the next row" to hold.
# (The world size, rank, batch size, drop_last and remainder may differ: see load_state_dict.)
_STATE_MUST_MATCH = ("source", "filter", "seed", "version", "num_rows", "shuffle", "block_rows", "shuffle_queue_rows",
                     "shuffle_lanes")
_STATE_HINTS = {
    "shuffle_lanes": "; the lanes follow LoaderConfig.shuffle_window_bytes, shuffle_buffer_rows, the columns loaded "
                     "and the table's row-group sizes: set shuffle_window_bytes as when it was saved (None for 1 lane)",
}
_STOPPED_MESSAGE = (
    "this iteration was stopped: the loader was closed, or set_epoch(), load_state_dict() or a new "
    "iteration started while it ran"
)
# Rows the shuffling-queue reader gathers at a time.
_QUEUE_WINDOW_ROWS = 16_384
# Blocks the fast path lets wait, cut into batches by the consumer.
_LAZY_BLOCKS = 2
# Batches the consumer cuts from a block at once (one split per column for all of them).
_SPLIT_BATCHES = 8
_LEG_KEYS = ("consumed", "leg_world_size", "leg_batch_size", "leg_drop_last", "leg_remainder")


class _BlockBatches:
    """Full batches ``[lo, hi)`` of a decoded block of tensor columns, cut by the consumer."""

    __slots__ = ("columns", "lo", "hi", "batch_size")

    def __init__(self, rows: dict[str, torch.Tensor], lo: int, hi: int, batch_size: int) -> None:
        self.columns = list(rows.items())
        self.lo, self.hi, self.batch_size = lo, hi, batch_size

    def batches(self) -> Iterator[Batch]:
        names = [n for n, _ in self.columns]
        step = self.batch_size * _SPLIT_BATCHES
        for lo in range(self.lo, self.hi, step):
            hi = min(lo + step, self.hi)
            # One split per column for a few batches: cheaper than a slice per column per batch,
            # and only a few batches' views exist before the consumer takes them.
            for parts in zip(*[t[lo:hi].split(self.batch_size) for _, t in self.columns]):
                yield dict(zip(names, parts))


@dataclass(frozen=True)
class _Leg:
    """A stretch of an epoch read at one world size (sparkdl/data/plan.py)."""

    consumed: tuple[Interval, ...]
    """Order positions already handed out when the leg started (sorted, disjoint)."""
    world_size: int
    batch_size: int
    drop_last: bool
    remainder: str


def _batch_rows(batch: Any) -> int:
    if isinstance(batch, Mapping):
        for v in batch.values():
            return len(v)
    return 0


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
        self._sizes = row_sizes(self._source.schema, self._decoders, fragments)
        group_rows = max(int(f.row_groups[0].num_rows) for f in fragments)
        bound_args = dict(
            group_rows=group_rows,
            prefetch_batches=self.config.prefetch_batches,
            max_bytes_in_flight=self.config.max_bytes_in_flight,
            pin=self._pin,
        )
        block_rows = self.config.shuffle_buffer_rows
        self._copy = self.config.max_memory_bytes is not None
        self._tensor_only = all(d.kind == "tensor" for d in self._decoders)
        # The fast path: when batches are plain views of their block (tensor columns, no
        # transform, no pinning, no copies), the background thread hands over whole blocks and
        # the consuming thread cuts them into batches as it goes. That saves a thread round trip
        # per batch, and the batch objects die as soon as the consumer drops them instead of
        # waiting in a queue long enough to be promoted through the garbage collector's
        # generations (which triggered full collections, at hundreds of ms each, every few M rows).
        self._lazy = (not self._copy and self._tensor_only and self._transform is None and not self._pin
                      and self.config.max_bytes_in_flight is None)
        self._queue_items = _LAZY_BLOCKS if self._lazy else self.config.prefetch_batches
        bound_args["held_blocks"] = _LAZY_BLOCKS + 1 if self._lazy else None
        queue = self.config.shuffle_queue_rows if self.config.shuffle else None
        lanes = 1
        if self.config.shuffle and queue is None:
            lanes = choose_lanes(self.config.shuffle_window_bytes, arrow_row_bytes=self._sizes.arrow,
                                 block_rows=block_rows, group_rows=group_rows, pieces=len(pieces))
        if self._copy:
            while True:
                try:
                    block_rows = fit_block_rows(
                        self.config.max_memory_bytes, self.config.block_rows, batch_size=self.config.batch_size,
                        sizes=self._sizes, lanes=lanes, **bound_args,
                    )
                    break
                except ValueError:
                    if lanes == 1:
                        raise
                    # Fewer lanes before a smaller buffer: the budget holds whole row groups per lane.
                    lanes = lanes // 2 if lanes > 3 else 1
            lanes = min(lanes, block_rows // MIN_STRIPE_ROWS)  # a smaller buffer: thinner stripes
            if lanes < 2:
                lanes = 1
        self.block_rows = block_rows
        """Rows of a canonical shuffle block: LoaderConfig.shuffle_buffer_rows, or under
        max_memory_bytes the largest whole number of batches up to it that fits the budget."""
        self.shuffle_lanes = lanes
        """Lanes K of the shuffle (LoaderConfig.shuffle_window_bytes): a batch mixes rows of about K
        row groups; 1 when shuffling is off, lanes are off, or shuffle_queue_rows is set."""
        # Lanes keep each lane's row group open across blocks; otherwise the last one read is
        # kept, for the block after it that usually shares it.
        self._reader = PieceReader(self._source, pieces, fragments, columns, filter,
                                   verify_checksums=self.config.verify_checksums,
                                   keep_all=lanes > 1)
        self.memory_bound: MemoryBound = memory_bound(
            self._sizes, block_rows=block_rows if queue is None else min(block_rows, _QUEUE_WINDOW_ROWS),
            batch_size=self.config.batch_size, views=not self._copy, queue_rows=queue,
            order_rows=min(block_rows, self.num_rows), lanes=lanes, **bound_args
        )
        """What the loader's buffers may hold at once (bytes), besides the consumer's batch."""
        self.epoch = 0
        self._position = 0
        self._leg = self._fresh_leg()
        self._resume: tuple[int, _Leg, int] | None = None
        self._active: Prefetcher | None = None
        self._closed = False

    # ----- legs -----
    def _fresh_leg(self, consumed: tuple[Interval, ...] = ()) -> "_Leg":
        cfg = self.config
        return _Leg(consumed=consumed, world_size=self.world_size, batch_size=cfg.batch_size,
                    drop_last=cfg.drop_last, remainder=cfg.remainder)

    def _leg_plan(self, leg: "_Leg", rank: int) -> tuple[int, int, list[Interval]]:
        """(rows per rank, batches, rank ``rank``'s order intervals) of ``leg``."""
        per_rank, mine = rank_intervals(leg.consumed, self.num_rows, rank, leg.world_size, leg.remainder)
        return per_rank, batches_per_epoch(per_rank, leg.batch_size, leg.drop_last), mine

    def _consumed_now(self) -> list[Interval]:
        """Order positions of this epoch handed out so far, by every rank (the same on each)."""
        leg = self._leg
        if self._position == 0:
            return list(leg.consumed)
        per_rank, _, _ = self._leg_plan(leg, 0)
        return consumed_after(leg.consumed, self.num_rows, leg.world_size, leg.remainder,
                              min(self._position * leg.batch_size, per_rank))

    # ----- sizes and state -----
    def __len__(self) -> int:
        """Batches of a whole epoch for this rank at this world size; the same on every rank."""
        return self._len

    @property
    def epoch_batches(self) -> int:
        """Batches the current epoch yields on this rank, counted from its current leg's start:
        ``len(self)``, unless this epoch was resumed from a state saved on another world size
        (or batch size), when it is what is left of the epoch, split over this world."""
        return self._leg_plan(self._leg, self.rank)[1]

    @property
    def batches_left(self) -> int:
        """Batches the next iteration yields (the same on every rank)."""
        return max(self.epoch_batches - self._position, 0)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration yields (its shuffle), starting at its first batch,
        unless a ``load_state_dict`` for this same epoch is pending."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch={epoch!r} must be a non-negative integer")
        self._stop_active()
        if self._resume is not None and self._resume[0] == epoch:
            self.epoch, self._leg, self._position = self._resume
        else:
            self.epoch, self._leg, self._position = int(epoch), self._fresh_leg(), 0
        self._resume = None

    def state_dict(self) -> dict[str, Any]:
        """Where the run is in the epoch: the same dict on every rank (bar ``rank``), loadable by
        a loader on any world size (see :meth:`load_state_dict`).

        ``position`` counts the batches of the epoch's current leg handed out by each rank;
        ``consumed`` (flat ``[start, stop, ...]`` order positions) and the ``leg_*`` keys define
        that leg; ``samples_seen`` is the number of distinct rows the whole world has taken this
        epoch (the global cursor). Only ints, strings, bools, None and lists of them: it loads
        with ``torch.load(weights_only=True)``."""
        cfg = self.config
        leg = self._leg
        return {
            "epoch": self.epoch,
            "position": self._position,
            "consumed": [x for iv in leg.consumed for x in iv],
            "leg_world_size": leg.world_size,
            "leg_batch_size": leg.batch_size,
            "leg_drop_last": leg.drop_last,
            "leg_remainder": leg.remainder,
            "samples_seen": interval_rows(self._consumed_now()),
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
            "shuffle_queue_rows": cfg.shuffle_queue_rows,
            "block_rows": self.block_rows,
            "shuffle_lanes": self.shuffle_lanes,
            "drop_last": cfg.drop_last,
            "remainder": cfg.remainder,
            "batches_per_epoch": self._len,
        }

    @staticmethod
    def merge_states(states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """One state from the states of all the ranks of a world (they agree on everything but
        ``rank``); ValueError when they do not. Any of them loads as well; this checks them."""
        if not states:
            raise ValueError("merge_states needs at least one loader state")
        first = dict(states[0])
        for i, other in enumerate(states[1:], 1):
            for key in first:
                if key != "rank" and other.get(key) != first[key]:
                    raise ValueError(
                        f"loader states disagree: state 0 has {key}={first[key]!r}, state {i} has "
                        f"{key}={other.get(key)!r}; pass the states saved together at one step"
                    )
        return first

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Make the next iteration of ``state["epoch"]`` continue that epoch where it stopped.

        ``state`` may come from any rank of a world of any size. On the world size, batch size,
        ``drop_last`` and ``remainder`` it was saved with, the iteration continues row for row
        (the batches it would have yielded). Otherwise the rows of the epoch not yet handed out
        by any rank are split afresh over this world (a new *leg*): every one of them once,
        equal batches on every rank, under this loader's ``remainder`` and ``drop_last``."""
        if "shuffle_lanes" not in state:  # saved before lanes existed: its order had one lane
            state = {**state, "shuffle_lanes": 1}
        missing = [k for k in ("epoch", "position", *_STATE_MUST_MATCH, *_LEG_KEYS) if k not in state]
        if missing:
            old = "consumed" in missing and "epoch" not in missing
            raise ValueError(
                f"loader state lacks keys {missing}; pass a dict from TableLoader.state_dict()"
                + ("; this one was saved by an older sparkdl whose order differs: restart the epoch "
                   "(drop the loader state) or resume with the sparkdl that wrote it" if old else "")
            )
        mine = self.state_dict()
        for key in _STATE_MUST_MATCH:
            if state[key] != mine[key]:
                raise ValueError(
                    f"loader state was saved with {key}={state[key]!r} but this loader has {key}={mine[key]!r}; "
                    f"a resume needs the same {key} (pass it to TableLoader/LoaderConfig){_STATE_HINTS.get(key, '')}"
                )
        flat = [int(x) for x in state["consumed"]]
        leg = _Leg(
            consumed=tuple(merge_intervals(zip(flat[::2], flat[1::2]))), world_size=int(state["leg_world_size"]),
            batch_size=int(state["leg_batch_size"]), drop_last=bool(state["leg_drop_last"]),
            remainder=str(state["leg_remainder"]),
        )
        if leg.world_size < 1 or leg.batch_size < 1 or leg.remainder not in REMAINDER_POLICIES or any(
                not 0 <= a < b <= self.num_rows for a, b in leg.consumed) or len(flat) % 2:
            raise ValueError(f"loader state has an invalid leg {leg}; pass a dict from TableLoader.state_dict()")
        epoch, position = int(state["epoch"]), int(state["position"])
        batches = self._leg_plan(leg, 0)[1]
        if epoch < 0 or not 0 <= position <= batches:
            raise ValueError(f"loader state has epoch={epoch}, position={position}; position must be in 0..{batches}")
        self._stop_active()
        if leg != self._fresh_leg(leg.consumed):
            # Another world (or batch size): a new leg over the rows nobody has taken yet.
            self._leg, self._position = leg, position
            # A finished leg is a finished epoch: what it left out (remainder, drop_last) stays out.
            done = [(0, self.num_rows)] if position >= batches else self._consumed_now()
            leg, position = self._fresh_leg(tuple(done)), 0
        self.epoch, self._leg, self._position = epoch, leg, position
        self._resume = (epoch, leg, position)

    # ----- iteration -----
    def __iter__(self) -> Iterator[Batch]:
        """One epoch (``self.epoch``) of batches, from the current position; afterwards the
        loader is at the next epoch, position 0."""
        if self._closed:
            raise ValueError("this TableLoader is closed; create a new one")
        self._stop_active()
        self._resume = None
        return self._iterate(self.epoch, self._leg, self._position)

    def _iterate(self, epoch: int, leg: "_Leg", start: int) -> Iterator[Batch]:
        prefetcher: Prefetcher | None = None
        try:
            per_rank, batches, mine = self._leg_plan(leg, self.rank)
            if start < batches:
                order = EpochOrder(self._counts, block_rows=self.block_rows, shuffle=self.config.shuffle,
                                   seed=self.config.seed, epoch=epoch, queue_rows=self.config.shuffle_queue_rows,
                                   lanes=self.shuffle_lanes)
                rows_out = min(per_rank, batches * leg.batch_size)  # drop_last cuts the tail
                stream = slice_intervals(mine, start * leg.batch_size, rows_out)
                prefetcher = Prefetcher(
                    lambda put: self._produce(put, order, stream),
                    max_items=self._queue_items,
                    max_bytes=self.config.max_bytes_in_flight,
                )
                self._active = prefetcher
                _OPEN_LOADERS.add(self)
                device = self._device
                # Under "pad", unwrapped position q of the rank's range (rank * per_rank + offset)
                # is a repeat when q >= the rows the leg has left (sparkdl/data/plan.py).
                padded = leg.remainder == "pad"
                if padded:
                    left = interval_rows(complement(leg.consumed, self.num_rows))
                    at = self.rank * per_rank + start * leg.batch_size
                for item in prefetcher:
                    if item is _STOPPED:
                        raise RuntimeError(_STOPPED_MESSAGE)
                    for batch in (item if type(item) is list else item.batches()):
                        if prefetcher.closed:
                            raise RuntimeError(_STOPPED_MESSAGE)
                        if padded and isinstance(batch, Mapping):
                            n = len(next(iter(batch.values())))
                            batch = {**batch, PAD_MASK: torch.arange(at, at + n) < left}
                            at += n
                        if device is not None:
                            batch = self._to_device(batch)
                        self._position += 1
                        yield batch
            self.epoch, self._leg, self._position = epoch + 1, self._fresh_leg(), 0
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

    def _chunks(
        self, order: EpochOrder, visits: list[Visit]
    ) -> Iterator[tuple[dict[str, Any], Callable[[int], str], int]]:
        """The rank's rows, decoded, in stream order, as (rows, where, row count) chunks: one per
        block visit, or (shuffling queue) a few per visit."""
        segs = order.block_segments(visits[0].block) if visits else []
        for i, visit in enumerate(visits):
            if order.shuffle and order.queue_rows is not None:
                yield from self._queue_windows(order, visit)
                continue
            rows, where = self._read_visit(order, visit, segs)
            segs = order.block_segments(visits[i + 1].block) if i + 1 < len(visits) else []
            if order.lanes > 1:
                # A lane's row group is used by consecutive blocks: keep those the next block
                # reads again, drop the ones lanes have moved past.
                self._reader.retain({s.piece for s in segs})
            yield rows, where, visit.num_rows

    def _queue_windows(
        self, order: EpochOrder, visit: Visit
    ) -> Iterator[tuple[dict[str, Any], Callable[[int], str], int]]:
        """A visit to a block ordered by the shuffling queue, read as the queue would: each row
        group when its first row is due, kept (compacted to the rows still due) while any is."""
        reader = self._reader
        perm = order.block_permutation(visit.block)
        segs = order.block_segments(visit.block)
        starts = np.zeros(len(segs) + 1, dtype=np.int64)
        np.cumsum([s.num_rows for s in segs], out=starts[1:])
        due = np.zeros(len(perm), dtype=bool)  # block rows this visit still hands out
        for a, b in visit.ranges:
            due[perm[a:b]] = True
        cache: dict[int, tuple[pa.Table, np.ndarray]] = {}  # segment -> (rows still due, their block rows)
        window = max(_QUEUE_WINDOW_ROWS, self.config.batch_size)
        windows = [(lo, min(lo + window, b)) for a, b in visit.ranges for lo in range(a, b, window)]
        for w_lo, w_hi in windows:
            wanted = perm[w_lo:w_hi].astype(np.int64)  # block rows, in stream order
            seg_of = np.searchsorted(starts, wanted, side="right") - 1
            involved = np.unique(seg_of)
            for s in involved.tolist():
                if s not in cache:
                    table = reader.read([segs[s]])
                    offsets = np.arange(starts[s], starts[s + 1], dtype=np.int64)
                    keep = due[offsets]
                    cache[s] = (table.filter(pa.array(keep)) if not keep.all() else table, offsets[keep])
            # The kept block rows of the involved segments, in segment order, are sorted (segments
            # hold increasing block rows), so one searchsorted finds every wanted row.
            parts = [cache[s] for s in involved.tolist()]
            kept = parts[0][1] if len(parts) == 1 else np.concatenate([o for _, o in parts])
            index = np.searchsorted(kept, wanted)
            tables = [t for t, _ in parts]
            gathered = (tables[0] if len(tables) == 1 else pa.concat_tables(tables)).take(pa.array(index))
            due[wanted] = False
            for s in involved.tolist():
                table, offsets = cache[s]
                still = due[offsets]
                if not still.any():
                    del cache[s]
                elif 2 * int(still.sum()) < len(offsets):
                    cache[s] = (table.filter(pa.array(still)), offsets[still])

            def where(row: int, _wanted: np.ndarray = wanted) -> str:
                return reader.locate(segs, int(_wanted[row]))

            yield decode_block(gathered, self._decoders, where), where, len(wanted)
        reader.clear()

    def _read_visit(self, order: EpochOrder, visit: Visit, segs: list[Segment]
                    ) -> tuple[dict[str, Any], Callable[[int], str]]:
        """The rows a rank takes from one canonical block, decoded, in its stream order: the block
        read whole (``segs``, its segments), then one ``take`` in the shuffled order (a slice when
        unshuffled)."""
        reader = self._reader
        if order.lanes > 1:
            missing = reader.missing(segs)
            if len(missing) > 1:
                # The first block of lanes needs a row group per lane at once: in a fresh
                # process two at a time decoded them in 0.24 s against 0.44 s one at a time.
                with ThreadPoolExecutor(2, thread_name_prefix="sparkdl-loader-lanes") as pool:
                    list(pool.map(reader.read_piece, missing))
        table = reader.read(segs)
        perm = order.block_permutation(visit.block)
        if perm is None and len(visit.ranges) == 1:
            lo, hi = visit.ranges[0]
            table = table.slice(lo, hi - lo)

            def where(row: int) -> str:
                return reader.locate(segs, lo + row)
        else:
            idx = np.concatenate([
                perm[a:b] if perm is not None else np.arange(a, b, dtype=np.int64) for a, b in visit.ranges
            ])
            table = pc.take(table, pa.array(idx), memory_pool=loader_memory_pool())

            def where(row: int) -> str:
                return reader.locate(segs, int(idx[row]))
        return decode_block(table, self._decoders, where), where

    def _produce(self, put: Callable[..., None], order: EpochOrder, stream: list[Interval]) -> None:
        cfg = self.config
        B = cfg.batch_size
        visits = block_visits(stream, self.block_rows)
        images = any(d.kind == "image" for d in self._decoders)
        pool = ThreadPoolExecutor(cfg.decode_threads, thread_name_prefix="sparkdl-loader-decode") if (
            images and cfg.decode_threads > 1) else None
        # The next block is read, gathered and decoded ahead while the current one is cut into
        # batches: Parquet decoding and Arrow's take run outside the GIL, so they overlap with
        # the Python work of batching.
        read_ahead = ThreadPoolExecutor(1, thread_name_prefix="sparkdl-loader-read")
        release = cfg.max_memory_bytes is not None
        copy, threads, decoders = self._copy, cfg.decode_threads, self._decoders
        row_bytes: float | None = None
        lazy = self._lazy

        def emit(batch: Batch) -> None:
            nonlocal row_bytes
            if self._transform is not None:
                batch = self._transform(batch)
            if self._pin and isinstance(batch, Mapping):
                batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            # Charged at what the batch holds (decoded images included), so that
            # max_bytes_in_flight bounds the memory the waiting batches really use; a batch of
            # tensors only costs the same per row every time.
            if row_bytes is None or not self._tensor_only or self._transform is not None:
                nbytes = _batch_bytes(batch)
                rows = _batch_rows(batch)
                if self._tensor_only and self._transform is None and rows:
                    row_bytes = nbytes / rows
            else:
                nbytes = int(row_bytes * _batch_rows(batch))
            put([batch], nbytes)

        chunks = self._chunks(order, visits)
        try:
            pending = read_ahead.submit(next, chunks, None)
            carry: list[Batch] = []
            carried = 0
            while True:
                chunk = pending.result()
                if chunk is None:
                    break
                pending = read_ahead.submit(next, chunks, None)
                rows, where, n = chunk
                off = 0
                if carried:
                    # The batch that straddles the previous block and this one.
                    off = min(B - carried, n)
                    carry.append(cut_batch(rows, decoders, 0, off, where, pool, threads, copy=False))
                    carried += off
                    if carried == B:
                        emit(concat_batches(carry))
                        carry, carried = [], 0
                full = off + (n - off) // B * B
                if lazy:
                    if full > off:
                        put(_BlockBatches(rows, off, full, B))
                else:
                    for batch in cut_batches(rows, decoders, off, full, B, where, pool, threads, copy=copy):
                        emit(batch)
                if full < n:
                    carry.append(cut_batch(rows, decoders, full, n, where, pool, threads, copy=copy))
                    carried += n - full
                del rows
                if release:
                    # Under a memory budget, hand the block's freed Arrow pages back to the OS now:
                    # the allocator otherwise keeps them a while, and the resident set outgrows the bound.
                    loader_memory_pool().release_unused()
            if carry:  # the final partial batch (drop_last=False)
                emit(concat_batches(carry))
        finally:
            read_ahead.shutdown(wait=True, cancel_futures=True)
            self._reader.clear()
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
