"""The loader's memory bound: what its buffers may hold at once, from the schema and the footers.

A rank's producer holds, at most (``S`` = shuffle-buffer rows, ``G`` = rows of the largest
row group it reads, ``B`` = batch size):

* the block read ahead, in Arrow form: the row groups it spans, at most ``S + 2G`` rows,
  plus the compressed column chunks of the row group being decoded (``G`` rows, compressed);
* the block being cut into batches: its Arrow form (``S + 2G`` rows) and its decoded
  tensors (``S`` rows), plus one column's intermediate copy while it is converted;
* the waiting batches: ``max_bytes_in_flight``, else ``prefetch_batches`` batches;
* the batch the producer holds while it waits to hand it over (twice when pinning), and
  the Arrow rows of an image/string batch being gathered;
* with K > 1 shuffle lanes (``LoaderConfig.shuffle_window_bytes``), the two blocks' row groups
  are those the reader keeps open instead: the pieces of every lane that the current and the
  read-ahead block touch, at most ``2S/K + 2G`` rows per lane, so ``2S + 2KG`` rows in all
  ("lane row groups"); each block is then a gathered copy of ``S`` rows;
* with ``shuffle_queue_rows`` (Q), the rows still in the queue, at most ``2Q + G`` in Arrow
  form; the "blocks" above are then the windows of rows gathered from it.

Without ``max_memory_bytes``, batches are views of their block (no copy per batch), so the
waiting batches keep up to ``min(P + 1, ceil((P + 1) * B / S) + 1)`` earlier blocks alive
(``P`` = ``prefetch_batches``), a term of the bound; under ``max_memory_bytes`` batches are
copied out of the block and own their memory, so a waiting batch does not keep its block
alive. The consumer's own batch is not part of the bound. Per-row sizes are exact for
numeric, bool, temporal and array columns and for
images of a declared shape; string/binary sizes and undeclared image shapes are estimated
from the Parquet footers (``MemoryBound.estimated``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import pyarrow as pa
import pyarrow.dataset as ds
import torch

from sparkdl.data.decode import ColumnDecoder

__all__ = ["RowSizes", "MemoryBound", "row_sizes", "memory_bound", "fit_block_rows", "lane_rows", "choose_lanes"]

# Fewest rows of a lane's stripe in a block: thinner stripes only add slices per block.
MIN_STRIPE_ROWS = 128

# torch dtype widths of the Arrow types the decoder converts (see decode._scalar_tensor).
_TENSOR_WIDTH_OVERRIDE = {pa.uint16(): 4, pa.uint32(): 8, pa.uint64(): 8}
# Python object overhead of a str/bytes handed out in a list (CPython header + list slot).
_OBJECT_OVERHEAD = 56
# Decoded bytes per encoded byte assumed for an image column without a declared shape.
_UNDECLARED_IMAGE_RATIO = 8


@dataclass(frozen=True)
class RowSizes:
    """Bytes per row of the projected columns in each form the loader holds them."""

    arrow: float
    """Decoded Parquet (Arrow) bytes per row, validity and offsets included."""
    compressed: float
    """Compressed Parquet bytes per row (largest over the row groups)."""
    block: float
    """Bytes per row of a decoded block (tensors; images and strings stay Arrow)."""
    batch: float
    """Bytes per row of a batch handed out (images decoded)."""
    widest: float
    """The largest single column's bytes per row (one intermediate copy while converting)."""
    arrow_objects: float
    """Arrow bytes per row of the image/string columns (gathered per batch)."""
    estimated: bool
    """True when a variable-width column's size was estimated from the footers."""


@dataclass(frozen=True)
class MemoryBound:
    """The bytes a loader's buffers may hold at once (see the module docstring)."""

    total: int
    """Sum of the terms."""
    terms: dict[str, int] = field(default_factory=dict)
    """Each holder's share, for reports."""
    block_rows: int = 0
    """The shuffle-buffer rows the bound was computed for."""
    group_rows: int = 0
    """Rows of the largest row group read."""
    estimated: bool = False
    """True when part of it is estimated (string/binary columns, undeclared image shapes)."""

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in self.terms.items())
        approx = " (estimated)" if self.estimated else ""
        return f"{self.total / 2**20:.1f} MiB{approx} = {parts} MiB"


def _leaf_and_values(t: pa.DataType) -> tuple[pa.DataType, int | None, int]:
    """(leaf type, values per row if fixed by the type, list levels)."""
    values: int | None = 1
    levels = 0
    while pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        levels += 1
        if pa.types.is_fixed_size_list(t) and values is not None:
            values *= t.list_size
        else:
            values = None
        t = t.value_type
    return t, values, levels


def _width(t: pa.DataType) -> float:
    if pa.types.is_dictionary(t):
        return _width(t.index_type) + _width(t.value_type)
    try:
        return t.bit_width / 8
    except ValueError:
        return 8.0


def _tensor_width(t: pa.DataType, dtype: torch.dtype | None) -> float:
    if dtype is not None:
        return torch.empty((), dtype=dtype).element_size()
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_boolean(t):
        return 1
    if pa.types.is_decimal(t):
        return 8
    return _TENSOR_WIDTH_OVERRIDE.get(t, max(1.0, _width(t)))


def _footer_stats(fragments: Sequence[ds.ParquetFileFragment], columns: list[str]) -> dict[str, tuple[float, float, float]]:
    """Per column: max over the row groups of (leaf values, uncompressed bytes, compressed bytes) per row."""
    out: dict[str, list[float]] = {c: [0.0, 0.0, 0.0] for c in columns}
    wanted = set(columns)
    for frag in fragments:
        rg_id = frag.row_groups[0].id
        rg = frag.metadata.row_group(rg_id)
        rows = max(rg.num_rows, 1)
        per_col: dict[str, list[float]] = {}
        for j in range(rg.num_columns):
            chunk = rg.column(j)
            top = chunk.path_in_schema.split(".", 1)[0]
            if top not in wanted:
                continue
            acc = per_col.setdefault(top, [0.0, 0.0, 0.0])
            acc[0] = max(acc[0], chunk.num_values / rows)
            acc[1] += chunk.total_uncompressed_size / rows
            acc[2] += chunk.total_compressed_size / rows
        for name, (values, raw, packed) in per_col.items():
            cur = out[name]
            cur[0], cur[1], cur[2] = max(cur[0], values), max(cur[1], raw), max(cur[2], packed)
    return {k: (v[0], v[1], v[2]) for k, v in out.items()}


def row_sizes(
    schema: pa.Schema, decoders: Sequence[ColumnDecoder], fragments: Sequence[ds.ParquetFileFragment]
) -> RowSizes:
    """Per-row sizes of the projected columns (``decoders``) of the table ``schema``."""
    stats = _footer_stats(fragments, [d.name for d in decoders])
    arrow = compressed = block = batch = widest = objects = 0.0
    estimated = False
    for dec in decoders:
        t = schema.field(dec.name).type
        values_n, raw, packed = stats.get(dec.name, (1.0, 0.0, 0.0))
        compressed += packed
        if dec.kind == "tensor":
            leaf, fixed, levels = _leaf_and_values(t)
            if fixed is not None:
                values = float(fixed)
            elif dec.shape is not None:
                values = float(math.prod(dec.shape))
            else:
                values = max(values_n, 1.0)
            a = values * (_width(leaf) + 1 / 8) + levels * (4 + 1 / 8) + (1 / 8 if not levels else 0)
            tb = values * _tensor_width(leaf, dec.dtype)
            arrow += a
            block += tb
            batch += tb
            widest = max(widest, a, tb)
        else:
            estimated = estimated or dec.kind == "objects" or dec.shape is None
            a = raw + 4 + 1 / 8  # values, offsets, validity
            arrow += a
            block += a
            objects += a
            widest = max(widest, a)
            if dec.kind == "image":
                pixels = math.prod(dec.shape) if dec.shape is not None else raw * _UNDECLARED_IMAGE_RATIO
                batch += pixels * (torch.empty((), dtype=dec.dtype).element_size() if dec.dtype else 1)
            else:
                batch += raw + _OBJECT_OVERHEAD
    return RowSizes(arrow=arrow, compressed=compressed, block=block, batch=batch, widest=widest,
                    arrow_objects=objects, estimated=estimated)


def memory_bound(
    sizes: RowSizes,
    *,
    block_rows: int,
    group_rows: int,
    batch_size: int,
    prefetch_batches: int,
    max_bytes_in_flight: int | None,
    pin: bool,
    views: bool = False,
    held_blocks: int | None = None,
    queue_rows: int | None = None,
    order_rows: int = 0,
    lanes: int = 1,
) -> MemoryBound:
    """The bytes the loader's buffers may hold at once with these settings; ``views``: batches
    are views of their block, so the waiting batches keep earlier blocks alive."""
    S, G, B = block_rows, group_rows, batch_size
    one_batch = B * sizes.batch
    # Waiting views hold no memory of their own (their blocks are counted below); one batch
    # stands for the batch that straddles two blocks, which is a copy.
    waiting = one_batch if views else prefetch_batches * one_batch
    if max_bytes_in_flight is not None:
        waiting = max(min(waiting, max_bytes_in_flight), one_batch)
    if lanes > 1:
        terms = {
            "lane row groups": lane_rows(S, G, lanes) * sizes.arrow + G * sizes.compressed,
            "read-ahead block": S * sizes.arrow,
            "current block": S * (sizes.arrow + sizes.block + sizes.widest),
        }
    else:
        terms = {
            "read-ahead block": (S + 2 * G) * sizes.arrow + G * sizes.compressed,
            "current block": (S + 2 * G) * sizes.arrow + S * (sizes.block + sizes.widest),
        }
    terms |= {
        "waiting batches": waiting,
        "batch being handed over": one_batch * (2 if pin else 1) + B * sizes.arrow_objects,
    }
    if queue_rows is not None:
        # A shuffling-queue reader keeps the rows still in the queue, compacted only when half
        # of a row group's kept rows are gone, plus the row group it just read; and the block's
        # order (int32 per row, twice while it is built) and which of its rows are still due.
        terms["shuffling queue"] = (2 * queue_rows + G) * sizes.arrow
        terms["block order"] = (2 * 4 + 1) * order_rows
    else:
        terms["block order"] = 2 * 8 * S  # the permutation and the rows gathered
    if views:
        # The waiting batches and the consumer's batch span at most this many earlier blocks;
        # a view keeps its block's tensors alive (unshuffled: the row group's Arrow buffers).
        held = held_blocks if held_blocks is not None else min(
            prefetch_batches + 1, -(-(prefetch_batches + 1) * B // S) + 1)
        # Unshuffled (never lanes), a view may keep the row group's Arrow buffers alive; a
        # gathered block holds none of its row groups.
        behind = 0 if lanes > 1 else G * sizes.arrow
        terms["blocks behind waiting views"] = held * (S * max(sizes.block, sizes.arrow) + behind)
    ints = {k: int(math.ceil(v)) for k, v in terms.items()}
    return MemoryBound(total=sum(ints.values()), terms=ints, block_rows=S, group_rows=G, estimated=sizes.estimated)


def lane_rows(block_rows: int, group_rows: int, lanes: int) -> int:
    """Rows of the row groups a lanes reader keeps open at most: per lane, those the current and
    the read-ahead block touch (``2S/K`` consecutive lane rows, plus a row group at each end)."""
    return 2 * block_rows + 2 * lanes * group_rows


def choose_lanes(
    window_bytes: int | None, *, arrow_row_bytes: float, block_rows: int, group_rows: int, pieces: int
) -> int:
    """The most lanes K whose open row groups (:func:`lane_rows`) fit ``window_bytes``, with at
    most one lane per piece and stripes of at least MIN_STRIPE_ROWS rows; 1 (lanes off) when
    fewer than two fit or ``window_bytes`` is None."""
    if window_bytes is None:
        return 1
    most = min(pieces, block_rows // MIN_STRIPE_ROWS)
    per_row = max(arrow_row_bytes, 1e-9)
    fit = int((window_bytes / per_row - 2 * block_rows) // (2 * max(group_rows, 1)))
    k = min(most, fit)
    return k if k >= 2 else 1


def fit_block_rows(budget: int, block_rows: int, *, batch_size: int, **kwargs: object) -> int:
    """The largest multiple of ``batch_size`` up to ``block_rows`` whose bound fits ``budget``.

    Raises ValueError naming the smallest budget that fits one batch per block.
    """
    def total(rows: int) -> int:
        return memory_bound(block_rows=rows, batch_size=batch_size, **kwargs).total  # type: ignore[arg-type]

    if total(batch_size) > budget:
        smallest = memory_bound(block_rows=batch_size, batch_size=batch_size, **kwargs)  # type: ignore[arg-type]
        raise ValueError(
            f"LoaderConfig.max_memory_bytes={budget:,} cannot hold even a one-batch shuffle buffer: that needs "
            f"{smallest.total:,} bytes ({smallest}); raise max_memory_bytes to at least {smallest.total:,}, lower "
            "batch_size / prefetch_batches / max_bytes_in_flight, or write the table with smaller row groups "
            f"(its largest holds {smallest.group_rows:,} rows)"
        )
    lo, hi = 1, block_rows // batch_size  # in batches; total() grows with rows
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if total(mid * batch_size) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo * batch_size
