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
from sparkdl.data.plan import (
    EpochOrder,
    block_visits,
    consumed_after,
    interval_rows,
    merge_intervals,
    rank_intervals,
    reservoir_permutation,
    rows_per_rank,
    slice_intervals,
)

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


def _order(counts, block_rows, shuffle, seed, epoch, lanes=1) -> list[int]:
    """The epoch's global order as row ids (rows numbered by piece, then row)."""
    offsets = np.concatenate([[0], np.cumsum(counts)])
    order = EpochOrder(counts, block_rows=block_rows, shuffle=shuffle, seed=seed, epoch=epoch, lanes=lanes)
    out: list[int] = []
    for k in range(order.num_blocks):
        rows = [int(offsets[s.piece]) + r for s in order.block_segments(k) for r in range(s.start, s.stop)]
        perm = order.block_permutation(k)
        out += rows if perm is None else [rows[i] for i in perm]
    return out


counts_st = st.lists(st.integers(0, 40), min_size=1, max_size=25).filter(lambda c: sum(c) > 0)


@settings(max_examples=200, deadline=None)
@given(counts=counts_st, block=st.integers(1, 60), shuffle=st.booleans(), seed=st.integers(0, 2**31),
       epoch=st.integers(0, 50), lanes=st.integers(1, 9))
def test_epoch_order_is_a_permutation_of_every_row(counts, block, shuffle, seed, epoch, lanes):
    order = _order(counts, block, shuffle, seed, epoch, lanes)
    assert sorted(order) == list(range(sum(counts)))
    if not shuffle:
        assert order == list(range(sum(counts)))


def test_lanes_make_every_block_mix_rows_from_across_the_table():
    # 40 row groups of 1,000 rows, blocks of 800 rows (less than a row group): without lanes a
    # block holds rows of one or two row groups; with 8 lanes, of at least 8, from all over.
    counts = [1000] * 40
    for lanes, fewest in ((1, 1), (8, 8)):
        order = EpochOrder(counts, block_rows=800, shuffle=True, seed=1, epoch=0, lanes=lanes)
        groups = [len({s.piece for s in order.block_segments(k)}) for k in range(order.num_blocks)]
        assert min(groups) >= fewest
        if lanes == 1:
            assert max(groups) <= 2
        else:
            spread = [max(s.piece for s in order.block_segments(k)) - min(s.piece for s in order.block_segments(k))
                      for k in range(order.num_blocks)]
            assert np.median(spread) > 20  # pieces are permuted, so ids of a block's groups spread out
    # Unshuffled, lanes do not apply: the file order stays.
    assert _order(counts[:3], 800, False, 1, 0, lanes=8) == list(range(3000))


@settings(max_examples=200, deadline=None)
@given(counts=counts_st, world=st.integers(1, 7), remainder=st.sampled_from(["drop", "pad"]),
       consumed=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 30)), max_size=4))
def test_rank_ranges_cover_the_remaining_rows_once_with_equal_shares(counts, world, remainder, consumed):
    total = sum(counts)
    done = merge_intervals((min(a, total), min(a + n, total)) for a, n in consumed)
    left = total - interval_rows(done)
    per_rank = rows_per_rank(left, world, remainder)
    seen: list[int] = []
    for rank in range(world):
        rows, mine = rank_intervals(done, total, rank, world, remainder)
        assert rows == per_rank and interval_rows(mine) == per_rank
        seen += [p for a, b in mine for p in range(a, b)]
    assert not set(seen) & {p for a, b in done for p in range(a, b)}
    if remainder == "drop":
        assert len(seen) == len(set(seen)) == (left // world) * world
    else:
        assert set(seen) == set(range(total)) - {p for a, b in done for p in range(a, b)}
        # Padding repeats rows as evenly as the stream allows.
        assert not seen or max(Counter(seen).values()) <= -(-per_rank * world // max(left, 1))


@settings(max_examples=150, deadline=None)
@given(counts=counts_st, legs=st.lists(st.tuples(st.integers(1, 6), st.integers(0, 50)), min_size=1, max_size=4))
def test_legs_never_repeat_a_row(counts, legs):
    """Any sequence of world sizes, each taking some rows per rank, hands out each row at most once,
    and consumed_after is exactly what the ranks took."""
    total = sum(counts)
    done: list = []
    taken: list[int] = []
    for world, rows_each in legs:
        for rank in range(world):
            _, mine = rank_intervals(done, total, rank, world, "drop")
            taken += [p for a, b in slice_intervals(mine, 0, rows_each) for p in range(a, b)]
        done = consumed_after(done, total, world, "drop", rows_each)
        assert len(taken) == len(set(taken)) and {p for a, b in done for p in range(a, b)} == set(taken)


@settings(max_examples=100, deadline=None)
@given(intervals=st.lists(st.tuples(st.integers(0, 200), st.integers(1, 40)), max_size=6), block=st.integers(1, 50))
def test_block_visits_partition_a_rank_stream(intervals, block):
    stream = [(a, a + n) for a, n in intervals]
    rows = [p for a, b in stream for p in range(a, b)]
    visits = block_visits(stream, block)
    assert [v.block * block + o for v in visits for lo, hi in v.ranges for o in range(lo, hi)] == rows
    assert all(0 <= lo < hi <= block for v in visits for lo, hi in v.ranges)
    assert all(a.block != b.block for a, b in zip(visits, visits[1:]))


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


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(1, 60), min_size=1, max_size=12), capacity=st.integers(1, 80),
       seed=st.integers(0, 99))
def test_reservoir_permutation_is_a_permutation_that_mixes_within_its_capacity(sizes, capacity, seed):
    perm = reservoir_permutation(sizes, capacity, np.random.default_rng(seed))
    assert sorted(perm.tolist()) == list(range(sum(sizes)))
    # Rows enter in slices of capacity // 4 and nothing leaves while the queue has room, so
    # row r cannot be emitted before position r - capacity - slice.
    unit = max(1, capacity // 4)
    assert all(p >= r - capacity - unit for p, r in enumerate(perm.tolist()))


@pytest.mark.parametrize("queue", [None, 9])
@pytest.mark.parametrize("world", [1, 3])
def test_loader_yields_the_planned_order(table, queue, world):
    """What the ranks yield, joined in rank order, is the epoch order the plan defines."""
    config = LoaderConfig(batch_size=4, shuffle_buffer_rows=50, shuffle_queue_rows=queue, drop_last=False,
                          remainder="pad", seed=3)
    got = []
    for rank in range(world):
        with TableLoader(table, rank=rank, world_size=world, config=config) as loader:
            loader.set_epoch(2)
            got += [i for b in loader for i in b["id"].tolist()]
            reader = loader._reader
            ids = [reader.read_piece(p)["id"].to_numpy() for p in range(len(reader._pieces))]
            counts = [len(x) for x in ids]
    order = EpochOrder(counts, block_rows=50, shuffle=True, seed=3, epoch=2, queue_rows=queue)
    want = []
    for k in range(order.num_blocks):
        rows = [int(ids[s.piece][r]) for s in order.block_segments(k) for r in range(s.start, s.stop)]
        want += [rows[i] for i in order.block_permutation(k)]
    assert got[:N_ROWS] == want
