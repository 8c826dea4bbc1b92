"""Sharding and shuffle planning: the epoch's one global order, and which part of it each rank reads.

Pure functions over row-group row counts; nothing here reads data, so every rank computes
the same plan on its own, with no communication.

**The epoch's order does not depend on the world size.** The table's row-group *pieces* are
permuted with ``RNG(seed, epoch)`` (when shuffling) and concatenated into one stream of N rows,
rotated by a random offset (so that the rows the ``drop`` policy leaves out differ from epoch to
epoch). That stream is cut into *canonical blocks* of ``block_rows`` rows (the shuffle buffer),
and the rows of block k are permuted with ``RNG(seed, epoch, k)``. The result, the epoch's
*order*, is a fixed sequence of the N rows for a given table version, seed, epoch and buffer;
positions in it are what the plan talks about.

**Lanes.** With ``lanes`` K > 1 (shuffling only), the rotated piece stream is cut, at the piece
boundaries nearest to multiples of N / K, into K *lanes*, and the order interleaves them in R
rounds of *stripes* (about ``block_rows // K`` rows; lane l's stripe is ``len(l) / R`` rows, so
all lanes end together): stripe 0 of lane 0, of lane 1, ..., of lane K-1, then stripe 1 of
each, and so on; blocks then cut that interleaved stream. So every block, and
every batch cut from it, mixes rows of about K row groups from K different stretches of the
table, while a reader holds only the row groups each lane is in (about K, read one at a time as
lanes move on), never K blocks. The lanes are a function of N and K only: still no world size.

With ``shuffle_queue_rows`` set, a block's rows are ordered instead by a deterministic shuffling
queue of that many rows (:func:`reservoir_permutation`), so big blocks mix many row groups in
little memory: a reader holds only the rows still in the queue, not the whole block.

**Legs.** An epoch is read in one or more *legs*, each at one world size w and batch size B.
A leg starts from a set of order positions already consumed (empty for a fresh epoch), takes
the positions not yet consumed, in order (the *remaining stream*, T rows), and gives rank r the
contiguous range ``[r*R, (r+1)*R)`` of it, with ``R = floor(T / w)`` (``drop``: the last
``T - w*R`` rows are left out) or ``ceil(T / w)`` (``pad``: the range wraps around to the start
of the remaining stream). After p batches on every rank, the consumed set is the leg's start set
plus the first ``p*B`` rows of every rank's range: the same set whichever rank computes it. That
set (as sorted position intervals) is the loader's state; a later leg on any world size reads
exactly the rows not in it. A run that never changes its world size has one leg per epoch, and
a same-size resume continues that leg row for row.

A rank's range touches only the canonical blocks inside it, plus at most two it shares with its
neighbours; a block is read whole (its row groups, sliced by row ranges, so a table with fewer
row groups than ranks still shards evenly) and the rank keeps its rows of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "Piece",
    "Segment",
    "Interval",
    "EpochOrder",
    "Visit",
    "reservoir_permutation",
    "rows_per_rank",
    "batches_per_epoch",
    "slice_segments",
    "merge_intervals",
    "complement",
    "slice_intervals",
    "rank_intervals",
    "consumed_after",
    "block_visits",
    "interval_rows",
]

Interval = tuple[int, int]
"""Positions ``[start, stop)`` of the epoch's order."""


@dataclass(frozen=True)
class Piece:
    """One Parquet row group (or the rows of it that match the loader's filter)."""

    file: int
    """Index of the file in the source's file list."""
    row_group: int
    """Row-group id inside the file."""
    num_rows: int
    """Rows this piece contributes (after the filter)."""
    first_row: int
    """Index in the file of the row group's first row (for error messages)."""


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, stop)`` of piece ``piece`` (in the piece's own, filtered, row numbering)."""

    piece: int
    start: int
    stop: int

    @property
    def num_rows(self) -> int:
        return self.stop - self.start


def rows_per_rank(num_rows: int, world_size: int, remainder: str) -> int:
    """Rows every rank gets under the ``drop`` or ``pad`` remainder policy."""
    if remainder == "pad":
        return -(-num_rows // world_size)
    return num_rows // world_size


def batches_per_epoch(rows: int, batch_size: int, drop_last: bool) -> int:
    return rows // batch_size if drop_last else -(-rows // batch_size)


def slice_segments(segments: Sequence[Segment], start: int, stop: int) -> list[Segment]:
    """Rows ``[start, stop)`` of the stream that ``segments`` form, as segments."""
    out: list[Segment] = []
    pos = 0
    for seg in segments:
        n = seg.num_rows
        lo, hi = max(start - pos, 0), min(stop - pos, n)
        if lo < hi:
            out.append(Segment(seg.piece, seg.start + lo, seg.start + hi))
        pos += n
        if pos >= stop:
            break
    return out


class EpochOrder:
    """The epoch's global order of the N rows (module docstring): pieces permuted and rotated,
    cut into canonical blocks of ``block_rows`` rows whose rows are permuted."""

    def __init__(
        self,
        counts: Sequence[int] | np.ndarray,
        *,
        block_rows: int,
        shuffle: bool,
        seed: int,
        epoch: int,
        queue_rows: int | None = None,
        lanes: int = 1,
    ) -> None:
        if isinstance(lanes, bool) or not isinstance(lanes, (int, np.integer)) or lanes < 1:
            raise ValueError(f"lanes={lanes!r} must be a positive integer")
        counts = np.asarray(counts, dtype=np.int64)
        self.queue_rows = queue_rows
        self.total = int(counts.sum())
        self.block_rows = int(block_rows)
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        if shuffle:
            rng = np.random.default_rng([seed, epoch])
            self._order = rng.permutation(len(counts))
            self._rotation = int(rng.integers(self.total)) if self.total else 0
        else:
            self._order = np.arange(len(counts))
            self._rotation = 0
        self._bounds = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts[self._order], out=self._bounds[1:])
        self.lanes = int(lanes) if shuffle else 1
        # Interleaved stream -> rotated piece stream: stripe i covers interleaved positions
        # [_stripe_pos[i], _stripe_pos[i + 1]) and starts at rotated-stream row _stripe_src[i].
        self._stripe_pos: np.ndarray | None = None
        self._stripe_src: np.ndarray | None = None
        if self.lanes > 1 and self.total:
            self._build_lanes()

    def _build_lanes(self) -> None:
        # Lanes split the *rotated* stream at piece boundaries, so a row group belongs to one
        # lane and is read once an epoch (only the one the rotation cuts is read twice). Lanes
        # are then only about N / K rows long, so each takes an equal share of R rounds.
        n = self.total
        ends = np.cumsum([s.num_rows for s in self._rotated(0, n)], dtype=np.int64)
        targets = np.arange(1, self.lanes, dtype=np.int64) * n // self.lanes
        right = np.minimum(np.searchsorted(ends, targets), len(ends) - 1)
        left = np.maximum(right - 1, 0)
        nearest = np.where(np.abs(ends[left] - targets) <= np.abs(ends[right] - targets), ends[left], ends[right])
        edges = np.unique(np.concatenate([[0], nearest, [n]]))
        lengths = np.diff(edges)
        self.lanes = len(lengths)
        if self.lanes < 2:
            return
        stripe = max(1, self.block_rows // self.lanes)
        rounds = -(-int(lengths.max()) // stripe)
        r = np.arange(rounds + 1, dtype=np.int64)[:, None]
        cuts = r * lengths[None, :] // rounds  # lane rows where each round starts
        sizes = np.diff(cuts, axis=0).ravel()
        src = (edges[:-1][None, :] + cuts[:-1]).ravel()
        keep = sizes > 0
        self._stripe_src = src[keep]
        self._stripe_pos = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
        np.cumsum(sizes[keep], out=self._stripe_pos[1:])

    @property
    def num_blocks(self) -> int:
        return -(-self.total // self.block_rows)

    def block_size(self, k: int) -> int:
        return min(self.block_rows, self.total - k * self.block_rows)

    def _stream(self, start: int, stop: int) -> list[Segment]:
        """Rows ``[start, stop)`` of the piece stream (before rotation) as piece segments."""
        out: list[Segment] = []
        order, bounds = self._order, self._bounds
        i = int(np.searchsorted(bounds, start, side="right")) - 1
        pos = start
        while pos < stop:
            lo, hi = int(bounds[i]), int(bounds[i + 1])
            end = min(stop, hi)
            if end > pos:
                out.append(Segment(int(order[i]), pos - lo, end - lo))
            pos = end
            i += 1
        return out

    def _rotated(self, start: int, stop: int) -> list[Segment]:
        """Rows ``[start, stop)`` of the piece stream rotated by the epoch's offset."""
        lo, hi = start + self._rotation, stop + self._rotation
        if lo >= self.total:
            return self._stream(lo - self.total, hi - self.total)
        if hi <= self.total:
            return self._stream(lo, hi)
        return self._stream(lo, self.total) + self._stream(0, hi - self.total)

    def _interleaved(self, start: int, stop: int) -> list[Segment]:
        """Rows ``[start, stop)`` of the lanes' interleaved stream as piece segments."""
        pos, src = self._stripe_pos, self._stripe_src
        if pos is None or src is None:
            return self._rotated(start, stop)
        out: list[Segment] = []
        i = int(np.searchsorted(pos, start, side="right")) - 1
        while i < len(src) and pos[i] < stop:
            lo, hi = max(start, int(pos[i])), min(stop, int(pos[i + 1]))
            first = int(src[i]) + lo - int(pos[i])
            out += self._rotated(first, first + hi - lo)
            i += 1
        return out

    def block_segments(self, k: int) -> list[Segment]:
        """The rows of canonical block k, before its permutation, as piece segments."""
        lo = k * self.block_rows
        if self._stripe_pos is not None:
            return self._interleaved(lo, lo + self.block_size(k))
        return self._rotated(lo, lo + self.block_size(k))

    def block_permutation(self, k: int) -> np.ndarray | None:
        """Row order inside block k: ``perm[i]`` is the block row at position i (None without
        shuffling: the identity)."""
        if not self.shuffle:
            return None
        if self.queue_rows is not None:
            sizes = [s.num_rows for s in self.block_segments(k)]
            rng = np.random.default_rng([self.seed, self.epoch, k, 2])
            return reservoir_permutation(sizes, self.queue_rows, rng)
        return np.random.default_rng([self.seed, self.epoch, k, 1]).permutation(self.block_size(k))


def reservoir_permutation(segment_rows: Sequence[int], capacity: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a shuffling queue of ``capacity`` rows emits a block's rows.

    The block's row groups (segments) are pushed in order, in slices of at most capacity / 4
    rows; whenever the queue holds more than ``capacity`` rows, the excess leaves it, drawn
    uniformly from everything it holds; the rest leaves in a random order at the end. So a batch
    mixes the rows of every row group still in the queue, as Petastorm's shuffling queue does,
    while the queue, and the reader, hold about ``capacity`` rows: deterministic, so every rank
    computes the same order from the row counts alone."""
    unit = max(1, capacity // 4)
    # int32 while it fits: the order of a big block is the largest array the loader keeps.
    dtype = np.int32 if sum(segment_rows) < 2**31 else np.int64
    out: list[np.ndarray] = []
    queue = np.empty(0, dtype=dtype)
    pos = 0
    for n in segment_rows:
        for lo in range(0, n, unit):
            m = min(unit, n - lo)
            queue = np.concatenate([queue, np.arange(pos, pos + m, dtype=dtype)])
            pos += m
            extra = len(queue) - capacity
            if extra > 0:
                pick = rng.permutation(len(queue))
                out.append(queue[pick[:extra]])
                queue = queue[pick[extra:]]
    out.append(queue[rng.permutation(len(queue))])
    return np.concatenate(out)


# ----- position intervals -----
def merge_intervals(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted, disjoint, non-empty intervals covering the union of ``intervals``."""
    out: list[list[int]] = []
    for a, b in sorted((int(a), int(b)) for a, b in intervals if b > a):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def interval_rows(intervals: Iterable[Interval]) -> int:
    return sum(b - a for a, b in intervals)


def complement(consumed: Sequence[Interval], total: int) -> list[Interval]:
    """The positions of ``[0, total)`` not in ``consumed`` (sorted, disjoint), in order."""
    out: list[Interval] = []
    pos = 0
    for a, b in consumed:
        if a > pos:
            out.append((pos, a))
        pos = max(pos, b)
    if pos < total:
        out.append((pos, total))
    return out


def slice_intervals(intervals: Sequence[Interval], start: int, stop: int) -> list[Interval]:
    """Rows ``[start, stop)`` of the stream the intervals form, as intervals."""
    out: list[Interval] = []
    pos = 0
    for a, b in intervals:
        n = b - a
        lo, hi = max(start - pos, 0), min(stop - pos, n)
        if lo < hi:
            out.append((a + lo, a + hi))
        pos += n
        if pos >= stop:
            break
    return out


def rank_intervals(
    consumed: Sequence[Interval], total: int, rank: int, world_size: int, remainder: str
) -> tuple[int, list[Interval]]:
    """(rows per rank, rank ``rank``'s range as order intervals, in stream order) of a leg that
    starts from ``consumed`` (sorted, disjoint)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    remaining = complement(consumed, total)
    left = interval_rows(remaining)
    per_rank = rows_per_rank(left, world_size, remainder)
    if per_rank == 0:
        return 0, []
    start = rank * per_rank % left
    stop = start + per_rank
    # per_rank <= left, so a range wraps around the end of the remaining stream at most once.
    out = slice_intervals(remaining, start, min(stop, left))
    if stop > left:
        out += slice_intervals(remaining, 0, stop - left)
    return per_rank, out


def consumed_after(
    consumed: Sequence[Interval], total: int, world_size: int, remainder: str, rows_each: int
) -> list[Interval]:
    """The consumed set after every rank of a leg (started from ``consumed``) took the first
    ``rows_each`` rows of its range: the same on every rank."""
    if rows_each <= 0:
        return list(consumed)
    taken = list(consumed)
    for rank in range(world_size):
        _, mine = rank_intervals(consumed, total, rank, world_size, remainder)
        taken += slice_intervals(mine, 0, rows_each)
    return merge_intervals(taken)


@dataclass(frozen=True)
class Visit:
    """The rows a rank takes from one canonical block, in its stream order."""

    block: int
    ranges: tuple[Interval, ...]
    """Offsets ``[lo, hi)`` inside the (permuted) block."""

    @property
    def num_rows(self) -> int:
        return sum(b - a for a, b in self.ranges)


def block_visits(intervals: Sequence[Interval], block_rows: int) -> list[Visit]:
    """A rank's stream (order intervals) as consecutive visits to canonical blocks."""
    out: list[Visit] = []
    cur_block = -1
    cur: list[Interval] = []
    for a, b in intervals:
        pos = a
        while pos < b:
            k = pos // block_rows
            end = min(b, (k + 1) * block_rows)
            if k != cur_block and cur:
                out.append(Visit(cur_block, tuple(cur)))
                cur = []
            cur_block = k
            lo, hi = pos - k * block_rows, end - k * block_rows
            if cur and cur[-1][1] == lo:
                cur[-1] = (cur[-1][0], hi)
            else:
                cur.append((lo, hi))
            pos = end
    if cur:
        out.append(Visit(cur_block, tuple(cur)))
    return out
