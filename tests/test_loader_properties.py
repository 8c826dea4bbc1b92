"""Property-based tests of the sharding plan and of TableLoader over a real Delta table."""

from __future__ import annotations

from collections import Counter

import deltalake
import numpy as np
import pyarrow as pa
import pytest
from deltalake import WriterProperties
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparkdl.data import LoaderConfig, TableLoader
from sparkdl.data.plan import rank_segments, rows_per_rank, slice_segments

N_ROWS = 157


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> str:
    """157 rows in 3 files with row groups of 7, 20 and 1..3 rows."""
    path = str(tmp_path_factory.mktemp("props") / "t")
    start = 0
    for n, per_group in [(61, 7), (80, 20), (16, 3)]:
        ids = np.arange(start, start + n, dtype=np.int64)
        props = WriterProperties(max_row_group_size=per_group, write_batch_size=per_group)
        deltalake.write_deltalake(path, pa.table({"id": ids}), mode="append", writer_properties=props)
        start += n
    return path


def _rows(segments, offsets) -> list[int]:
    return [int(offsets[s.piece]) + r for s in segments for r in range(s.start, s.stop)]


@settings(max_examples=200, deadline=None)
@given(
    counts=st.lists(st.integers(0, 40), min_size=1, max_size=25).filter(lambda c: sum(c) > 0),
    world=st.integers(1, 7),
    remainder=st.sampled_from(["drop", "pad"]),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**31),
    epoch=st.integers(0, 50),
)
def test_plan_covers_every_row_once_with_equal_shares(counts, world, remainder, shuffle, seed, epoch):
    offsets = np.concatenate([[0], np.cumsum(counts)])
    total = sum(counts)
    per_rank = rows_per_rank(total, world, remainder)
    seen: list[int] = []
    for rank in range(world):
        segments = rank_segments(counts, rank, world, epoch=epoch, seed=seed, shuffle=shuffle, remainder=remainder)
        assert all(0 <= s.start < s.stop <= counts[s.piece] for s in segments)
        rows = _rows(segments, offsets)
        assert len(rows) == per_rank
        seen += rows
    if remainder == "drop":
        assert len(seen) == len(set(seen)) == (total // world) * world
    else:
        assert set(seen) == set(range(total))
        # Padding repeats rows as evenly as the stream allows.
        assert max(Counter(seen).values()) <= -(-per_rank * world // total)


@settings(max_examples=100, deadline=None)
@given(
    counts=st.lists(st.integers(1, 30), min_size=1, max_size=10),
    block=st.integers(1, 50),
    seed=st.integers(0, 1000),
)
def test_blocks_partition_a_rank_stream(counts, block, seed):
    offsets = np.concatenate([[0], np.cumsum(counts)])
    segments = rank_segments(counts, 0, 1, epoch=0, seed=seed, shuffle=True, remainder="drop")
    stream = _rows(segments, offsets)
    pieces = [_rows(slice_segments(segments, lo, lo + block), offsets) for lo in range(0, len(stream), block)]
    assert [r for p in pieces for r in p] == stream


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    world=st.integers(1, 4),
    batch_size=st.integers(1, 40),
    buffer_rows=st.integers(1, 100),
    drop_last=st.booleans(),
    remainder=st.sampled_from(["drop", "pad"]),
    shuffle=st.booleans(),
    epoch=st.integers(0, 5),
)
def test_loader_shards_exactly_with_equal_batches(table, world, batch_size, buffer_rows, drop_last, remainder, shuffle, epoch):
    per_rank = rows_per_rank(N_ROWS, world, remainder)
    shapes, seen = [], []
    for rank in range(world):
        config = LoaderConfig(batch_size=batch_size, shuffle_buffer_rows=buffer_rows, drop_last=drop_last,
                              remainder=remainder, shuffle=shuffle, seed=11)
        with TableLoader(table, rank=rank, world_size=world, config=config) as loader:
            loader.set_epoch(epoch)
            batches = [b["id"].tolist() for b in loader]
        assert len(batches) == len(loader)
        shapes.append([len(b) for b in batches])
        seen += [i for b in batches for i in b]
    assert all(s == shapes[0] for s in shapes)
    expected_rows = (per_rank // batch_size) * batch_size if drop_last else per_rank
    assert sum(shapes[0]) == expected_rows
    if remainder == "drop":
        assert len(seen) == len(set(seen)) and set(seen) <= set(range(N_ROWS))
    elif not drop_last:
        assert set(seen) == set(range(N_ROWS))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    world=st.integers(1, 3),
    batch_size=st.integers(1, 20),
    buffer_rows=st.integers(1, 60),
    stop_fraction=st.floats(0, 1),
    epoch=st.integers(0, 3),
)
def test_resume_continues_with_exactly_the_unseen_rows(table, world, batch_size, buffer_rows, stop_fraction, epoch):
    config = LoaderConfig(batch_size=batch_size, shuffle_buffer_rows=buffer_rows, drop_last=False, seed=5)
    rank = world - 1
    with TableLoader(table, rank=rank, world_size=world, config=config) as loader:
        loader.set_epoch(epoch)
        full = [b["id"].tolist() for b in loader]
        stop = int(stop_fraction * len(full))
        loader.set_epoch(epoch)
        it = iter(loader)
        for _ in range(stop):
            next(it)
        state = loader.state_dict()
        del it
    with TableLoader(table, rank=rank, world_size=world, config=config) as resumed:
        resumed.load_state_dict(state)
        resumed.set_epoch(state["epoch"])
        assert [b["id"].tolist() for b in resumed] == full[stop:]
