"""Configuration of the streaming loader."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

__all__ = ["LoaderConfig", "REMAINDER_POLICIES", "torch_dtype"]

REMAINDER_POLICIES = ("drop", "pad")


def torch_dtype(name: str, *, what: str) -> torch.dtype:
    """The torch dtype called ``name`` (``"float32"``, ``"torch.int64"``); ValueError naming ``what``."""
    attr = name.removeprefix("torch.")
    dtype = getattr(torch, attr, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(
            f"{what}: {name!r} is not a torch dtype; use a name such as 'float32', 'float16', "
            "'bfloat16', 'int64', 'int32', 'uint8' or 'bool'"
        )
    return dtype


@dataclass(kw_only=True)
class LoaderConfig:
    """How a :class:`~sparkdl.data.TableLoader` batches, shuffles and prefetches."""

    batch_size: int = 256
    """Rows per batch."""
    columns: list[str] | None = None
    """Columns to load, in this order (projection pushed down to Parquet); None loads all columns."""
    shuffle: bool = True
    """Reshuffle every epoch: row groups are permuted, then rows inside each shuffle block."""
    seed: int = 0
    """Seed of every shuffle; the same seed and epoch give the same order of rows on any world size."""
    shuffle_buffer_rows: int = 65_536
    """Rows of a canonical shuffle block: consecutive rows of the epoch's row-group stream read and
    shuffled together. Bigger mixes better (a batch draws from more row groups) and costs memory;
    it is also the unit a resume skips without reading. Part of the order: a resume needs the same."""
    shuffle_window_bytes: int | None = 256 * 2**20
    """Decoded bytes of row groups the shuffle may hold open at once, to mix widely: the epoch's
    row-group stream is cut into K lanes that every shuffle block takes an equal stripe of, so a
    batch mixes rows of about K row groups spread over the whole table (Mosaic Streaming's
    shuffles do this with shards). K is the most that keeps the bound's row-group term
    (``TableLoader.memory_bound``, "lane row groups") within this, at most one per row group and
    per 128 rows of shuffle_buffer_rows (``TableLoader.shuffle_lanes``). Its costs: this memory,
    and up to about one window of extra decoding per rank per epoch (a rank reads the row groups
    at both ends of its part of every lane whole). None (or a window too small for two lanes)
    turns lanes off: each block is consecutive rows of the row-group stream, so a batch mixes
    only the row groups one shuffle buffer spans. Part of the order: a resume needs the same K."""
    shuffle_queue_rows: int | None = None
    """None: each shuffle block is read whole and its rows permuted uniformly (memory grows with
    shuffle_buffer_rows). A row count C: each block's rows are ordered by a deterministic
    shuffling queue of C rows (as Petastorm's shuffling queue, but resumable and the same on any
    world size), and the reader holds only the rows still in the queue: set shuffle_buffer_rows
    large (e.g. 4,194,304) so a batch mixes rows from across that many rows' row groups, in memory
    for about C rows plus a row group. Part of the order: a resume needs the same."""
    drop_last: bool = True
    """Drop each rank's final partial batch; False yields it (it has the same size on every rank)."""
    remainder: str = "drop"
    """Rows beyond floor(T / world_size) * world_size of the T rows an epoch (or, after a resume on
    another world size, its rest) splits: "drop" leaves them out (different rows each shuffled
    epoch); "pad" gives every rank ceil(T / world_size) rows by repeating rows."""
    prefetch_batches: int = 4
    """Batches prepared ahead by the background thread."""
    max_bytes_in_flight: int | None = None
    """Bound on the bytes of prepared batches waiting for the consumer, counted as the tensors they
    hold (images decoded); at least one batch is always allowed. None bounds them only by
    prefetch_batches. This bounds the waiting batches only; max_memory_bytes bounds everything."""
    max_memory_bytes: int | None = None
    """Bound on all the loader's buffers (the shuffle buffer being cut, the one read ahead, the row
    groups they span, the waiting batches), not counting the batch the consumer holds. When set,
    the shuffle buffer is shrunk (in whole batches, never below one) so that TableLoader.memory_bound
    fits it; a budget too small for one batch per buffer fails at construction with the minimum.
    None: no overall bound (TableLoader.memory_bound still reports what the settings imply)."""
    decode_threads: int = 4
    """Threads decoding PNG/JPEG columns."""
    dtypes: dict[str, str] = field(default_factory=dict)
    """Per-column torch dtype overrides, e.g. {"x": "float32"} (names or torch.dtype values); they
    win over the dtypes of a declared schema; other columns keep their table type."""
    verify_checksums: bool = True
    """Verify the CRC of every Parquet data page read, where the writer stored one (Spark does by
    default); a corrupt page raises LoaderError naming the file. False skips the check."""
    pin_memory: bool = False
    """Put batches in pinned (page-locked) memory for faster host-to-GPU copies; ignored without CUDA."""
    device: str | None = None
    """Move batches to this device (e.g. "cuda:0"), asynchronously when pin_memory is on."""

    def __post_init__(self) -> None:
        examples = {"batch_size": 256, "shuffle_buffer_rows": 65_536, "prefetch_batches": 4, "decode_threads": 4}
        for name, example in examples.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LoaderConfig.{name}={value!r} must be a positive integer, e.g. {name}={example}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"LoaderConfig.seed={self.seed!r} must be a non-negative integer, e.g. seed=0")
        for name in ("shuffle", "drop_last", "pin_memory", "verify_checksums"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"LoaderConfig.{name}={value!r} must be True or False")
        if self.remainder not in REMAINDER_POLICIES:
            raise ValueError(
                f"LoaderConfig.remainder={self.remainder!r} must be one of {list(REMAINDER_POLICIES)}, "
                "e.g. remainder='drop'"
            )
        w = self.shuffle_window_bytes
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            raise ValueError(
                f"LoaderConfig.shuffle_window_bytes={w!r} must be a positive number of bytes, e.g. "
                f"shuffle_window_bytes={256 * 2**20} for 256 MiB, or None to turn lanes off"
            )
        q = self.shuffle_queue_rows
        if q is not None and (isinstance(q, bool) or not isinstance(q, int) or q < 1):
            raise ValueError(
                f"LoaderConfig.shuffle_queue_rows={q!r} must be a positive integer, e.g. shuffle_queue_rows=131072, "
                "or None to permute whole shuffle blocks"
            )
        if q is not None and self.max_memory_bytes is not None:
            raise ValueError(
                "LoaderConfig.shuffle_queue_rows and max_memory_bytes cannot be combined yet: bound the memory "
                "with shuffle_queue_rows itself, or set shuffle_queue_rows=None"
            )
        for name in ("max_bytes_in_flight", "max_memory_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(
                    f"LoaderConfig.{name}={value!r} must be a positive integer number of bytes, e.g. "
                    f"{name}={256 * 2**20} for 256 MiB, or None for no bound"
                )
        if self.columns is not None:
            if isinstance(self.columns, str) or not all(isinstance(c, str) for c in self.columns):
                raise ValueError(
                    f"LoaderConfig.columns={self.columns!r} must be a list of column names, e.g. ['x', 'y']"
                )
            self.columns = list(self.columns)
            if not self.columns:
                raise ValueError("LoaderConfig.columns=[] selects nothing; pass None for all columns")
            dupes = sorted({c for c in self.columns if self.columns.count(c) > 1})
            if dupes:
                raise ValueError(f"LoaderConfig.columns names {dupes} more than once; list each column once")
        if not isinstance(self.dtypes, Mapping):
            raise ValueError(f"LoaderConfig.dtypes={self.dtypes!r} must be a dict, e.g. {{'x': 'float32'}}")
        dtypes = {}
        for col, name in self.dtypes.items():
            what = f"LoaderConfig.dtypes[{col!r}]"
            if isinstance(name, torch.dtype):
                name = str(name)
            if not isinstance(name, str):
                raise ValueError(f"{what}={name!r} must be a dtype name such as 'float32' or a torch.dtype")
            torch_dtype(name, what=what)
            dtypes[col] = name.removeprefix("torch.")
        self.dtypes = dtypes
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as e:
                raise ValueError(
                    f"LoaderConfig.device={self.device!r} is not a torch device: {e}; e.g. device='cuda:0'"
                ) from e

    @property
    def block_rows(self) -> int:
        """The shuffle buffer in rows, rounded up to whole batches: the most max_memory_bytes may keep."""
        return -(-self.shuffle_buffer_rows // self.batch_size) * self.batch_size
