"""Sharding and shuffle planning: which rows each rank reads in an epoch, and in what order.

Pure functions over row-group row counts; nothing here reads data, so every rank computes
the same plan on its own, with no communication.

An epoch's plan: the table's row-group *pieces* are permuted with ``RNG(seed, epoch)`` (when
shuffling) and concatenated into one global row stream of N rows, rotated by a random offset
so that the rows the ``drop`` policy leaves out differ from epoch to epoch. Rank r takes the
contiguous range ``[r*R, (r+1)*R)`` of that stream, with ``R = floor(N / w)`` (``drop``) or
``ceil(N / w)`` (``pad``, wrapping around to the stream's start). Every rank therefore gets
exactly R rows, and the ranks together cover every row once (``drop``: all but ``N - w*R``
rows; ``pad``: every row, ``w*R - N`` of them twice). A rank's range touches only the row
groups inside it plus at most two it shares with its neighbours, which are split by row
ranges; so a table with fewer row groups than ranks still shards evenly.

The rank's stream is then cut into blocks of ``block_rows`` rows (the shuffle buffer, a
multiple of the batch size); a block is read whole and its rows permuted with
``RNG(seed, epoch, rank, block)``. Blocks start at batch boundaries, so resuming at batch p
reads from block ``p*B // block_rows`` on and skips the blocks before it unread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = [
    "Piece",
    "Segment",
    "rows_per_rank",
    "batches_per_epoch",
    "rank_segments",
    "slice_segments",
    "block_permutation",
]


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
    """Rows every rank gets per epoch under the ``drop`` or ``pad`` remainder policy."""
    if remainder == "pad":
        return -(-num_rows // world_size)
    return num_rows // world_size


def batches_per_epoch(rows: int, batch_size: int, drop_last: bool) -> int:
    return rows // batch_size if drop_last else -(-rows // batch_size)


def _epoch_stream(counts: np.ndarray, *, shuffle: bool, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(piece order, cumulative row bounds in that order, rotation) of the epoch's global stream."""
    n_pieces = len(counts)
    total = int(counts.sum())
    if shuffle:
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(n_pieces)
        rotation = int(rng.integers(total)) if total else 0
    else:
        order = np.arange(n_pieces)
        rotation = 0
    bounds = np.zeros(n_pieces + 1, dtype=np.int64)
    np.cumsum(counts[order], out=bounds[1:])
    return order, bounds, rotation


def _stream_segments(order: np.ndarray, bounds: np.ndarray, start: int, stop: int) -> list[Segment]:
    """Rows ``[start, stop)`` of the global stream (no wrap) as piece segments."""
    out: list[Segment] = []
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


def rank_segments(
    counts: Sequence[int] | np.ndarray,
    rank: int,
    world_size: int,
    *,
    epoch: int,
    seed: int,
    shuffle: bool,
    remainder: str,
) -> list[Segment]:
    """The rows rank ``rank`` reads in ``epoch``, in stream order, as piece segments.

    ``counts[i]`` is the row count of piece i; pieces must be in a fixed order shared by all
    ranks (the loader sorts them by file and row group).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    per_rank = rows_per_rank(total, world_size, remainder)
    if per_rank == 0:
        return []
    order, bounds, rotation = _epoch_stream(counts, shuffle=shuffle, seed=seed, epoch=epoch)
    # per_rank <= total, so a rank's range wraps around the end of the stream at most once.
    start = (rank * per_rank + rotation) % total
    stop = start + per_rank
    segments = _stream_segments(order, bounds, start, min(stop, total))
    if stop > total:
        segments += _stream_segments(order, bounds, 0, stop - total)
    return segments


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


def block_permutation(num_rows: int, *, seed: int, epoch: int, rank: int, block: int) -> np.ndarray:
    """The row order inside one shuffle block."""
    return np.random.default_rng([seed, epoch, rank, block, 1]).permutation(num_rows)
