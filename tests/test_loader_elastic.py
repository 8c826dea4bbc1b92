"""Elastic resume: a loader state saved by N ranks continues the epoch on M ranks.

Real Delta tables (several files, uneven row groups); the properties a training run relies on:
every row of the epoch handed out exactly once across the resize (bar the documented remainder),
the same number of batches on every rank, and bit-identical batches on a same-size resume.
"""

from __future__ import annotations

from collections import Counter

import deltalake
import numpy as np
import pyarrow as pa
import pytest
import torch
from deltalake import WriterProperties
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparkdl.data import LoaderConfig, TableLoader

N_ROWS = 211


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> str:
    """211 rows (id, a float column) in 3 files with row groups of 9, 40 and 2 rows."""
    path = str(tmp_path_factory.mktemp("elastic") / "t")
    start = 0
    rng = np.random.default_rng(0)
    for n, per_group in [(83, 9), (120, 40), (8, 2)]:
        ids = np.arange(start, start + n, dtype=np.int64)
        data = pa.table({"id": ids, "x": rng.standard_normal(n).astype(np.float32)})
        props = WriterProperties(max_row_group_size=per_group, write_batch_size=per_group)
        deltalake.write_deltalake(path, data, mode="append", writer_properties=props)
        start += n
    return path


@pytest.fixture(scope="module")
def two_groups(tmp_path_factory) -> str:
    """Fewer row groups (2) than the largest world (4): ranks split row groups by row ranges."""
    path = str(tmp_path_factory.mktemp("elastic2") / "t")
    props = WriterProperties(max_row_group_size=50, write_batch_size=50)
    deltalake.write_deltalake(path, pa.table({"id": np.arange(100, dtype=np.int64)}), writer_properties=props)
    return path


def _run(uri: str, world: int, config: LoaderConfig, epoch: int, stop: int | None, state=None):
    """Every rank's batches (stopping after ``stop`` batches) and states, from ``state``."""
    batches, states = [], []
    for rank in range(world):
        with TableLoader(uri, rank=rank, world_size=world, config=config) as loader:
            if state is not None:
                loader.load_state_dict(state)
            loader.set_epoch(epoch)
            it = iter(loader)
            mine = list(it) if stop is None else [next(it) for _ in range(stop)]
            del it
            batches.append(mine)
            states.append(loader.state_dict())
    return batches, states


def _ids(batches) -> list[int]:
    return [i for rank in batches for b in rank for i in b["id"].tolist()]


RESIZES = [(2, 3), (2, 1), (3, 2), (1, 4)]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    resize=st.sampled_from(RESIZES),
    batch_size=st.integers(1, 24),
    buffer_rows=st.integers(1, 90),
    stop_fraction=st.floats(0, 1),
    shuffle=st.booleans(),
    queue=st.sampled_from([None, None, 6, 40]),
    drop_last=st.booleans(),
    epoch=st.integers(0, 4),
)
def test_resize_hands_out_every_remaining_row_once_with_equal_batches(
    table, resize, batch_size, buffer_rows, stop_fraction, shuffle, queue, drop_last, epoch
):
    old, new = resize
    config = LoaderConfig(batch_size=batch_size, shuffle_buffer_rows=buffer_rows, shuffle=shuffle,
                          shuffle_queue_rows=queue, drop_last=drop_last, seed=7)
    with TableLoader(table, rank=0, world_size=old, config=config) as probe:
        per_epoch = len(probe)
    stop = int(stop_fraction * per_epoch)
    before, states = _run(table, old, config, epoch, stop)
    assert all(len(b) == stop for b in before)
    state = TableLoader.merge_states(states)
    seen_before = _ids(before)
    assert state["samples_seen"] == len(set(seen_before)) == len(seen_before)

    # Any rank's state will do: they are the same.
    after, _ = _run(table, new, config, epoch, None, state=states[-1])
    counts = {len(b) for b in after}
    assert len(counts) == 1  # equal batches on every new rank
    shapes = [[len(x["id"]) for x in b] for b in after]
    assert all(s == shapes[0] for s in shapes)
    seen_after = _ids(after)
    everything = seen_before + seen_after
    assert len(everything) == len(set(everything)), "a row was handed out twice across the resize"
    left = N_ROWS - len(seen_before)
    per_rank = left // new
    if stop == per_epoch:
        assert seen_after == []  # the epoch was over
    elif drop_last:
        assert len(seen_after) == new * (per_rank // batch_size) * batch_size
    else:
        # remainder="drop": only the left % new rows that do not divide evenly are left out.
        assert len(seen_after) == new * per_rank


@pytest.mark.parametrize("old,new", RESIZES)
def test_resize_with_pad_covers_every_row(table, old, new):
    config = LoaderConfig(batch_size=8, shuffle_buffer_rows=32, drop_last=False, remainder="pad", seed=1)
    before, states = _run(table, old, config, 2, 3)
    after, _ = _run(table, new, config, 2, None, state=states[0])
    seen = _ids(before) + _ids(after)
    assert set(seen) == set(range(N_ROWS))
    # Only the padding repeats rows, fewer than one per new rank.
    assert sum(c - 1 for c in Counter(seen).values()) < new
    assert len({len(b) for b in after}) == 1


def test_resize_twice_in_one_epoch_and_then_the_next_epoch(table):
    config = LoaderConfig(batch_size=5, shuffle_buffer_rows=30, drop_last=False, seed=3)
    b1, s1 = _run(table, 2, config, 1, 4)
    b2, s2 = _run(table, 3, config, 1, 2, state=s1[1])
    b3, s3 = _run(table, 1, config, 1, None, state=s2[2])
    seen = _ids(b1) + _ids(b2) + _ids(b3)
    assert sorted(seen) == list(range(N_ROWS))  # world 1 at the end leaves nothing out
    assert s3[0]["epoch"] == 2 and s3[0]["position"] == 0
    assert s2[0]["samples_seen"] == len(_ids(b1) + _ids(b2))
    # The next epoch is a fresh one on the new world size.
    with TableLoader(table, rank=0, world_size=1, config=config) as loader:
        loader.load_state_dict(s3[0])
        loader.set_epoch(2)
        assert loader.epoch_batches == len(loader) and sum(len(b["id"]) for b in loader) == N_ROWS


@pytest.mark.parametrize("shuffle,queue", [(True, None), (False, None), (True, 20)])
def test_same_size_resume_is_bit_identical(table, shuffle, queue):
    config = LoaderConfig(batch_size=7, shuffle_buffer_rows=50, shuffle=shuffle, shuffle_queue_rows=queue, seed=9)
    full, _ = _run(table, 3, config, 4, None)
    _, states = _run(table, 3, config, 4, 5)
    rest, _ = _run(table, 3, config, 4, None, state=states[0])
    for rank in range(3):
        assert len(rest[rank]) == len(full[rank]) - 5
        for got, want in zip(rest[rank], full[rank][5:]):
            assert got.keys() == want.keys()
            assert all(torch.equal(got[k], want[k]) for k in got)


def test_order_does_not_depend_on_the_world_size(table):
    """Each rank takes a contiguous range of the one epoch order, so the ranks' streams, joined in
    rank order, give the same order on any world size."""
    config = LoaderConfig(batch_size=1, shuffle_buffer_rows=30, drop_last=False, remainder="pad", seed=2)
    orders = []
    for world in (1, 2, 4):
        batches, _ = _run(table, world, config, 3, None)
        orders.append(_ids(batches)[:N_ROWS])
    assert orders[0] == orders[1] == orders[2]


@pytest.mark.parametrize("old,new", [(1, 4), (4, 3), (2, 4)])
def test_fewer_row_groups_than_ranks_resize(two_groups, old, new):
    config = LoaderConfig(batch_size=4, shuffle_buffer_rows=16, drop_last=False, seed=4)
    before, states = _run(two_groups, old, config, 0, 2)
    after, _ = _run(two_groups, new, config, 0, None, state=states[0])
    seen = _ids(before) + _ids(after)
    assert len(seen) == len(set(seen)) and len(seen) >= 100 - (new - 1)
    assert len({len(b) for b in after}) == 1


def test_merge_states_refuses_states_from_different_steps(table):
    config = LoaderConfig(batch_size=8, shuffle_buffer_rows=32, seed=1)
    _, a = _run(table, 2, config, 0, 2)
    _, b = _run(table, 2, config, 0, 3)
    with pytest.raises(ValueError, match="position"):
        TableLoader.merge_states([a[0], b[1]])


def test_resume_skips_whole_blocks_without_reading_them(table, monkeypatch):
    from sparkdl.data import source

    read: list[int] = []
    original = source.PieceReader.read_piece

    def counting(self, index):
        read.append(index)
        return original(self, index)

    monkeypatch.setattr(source.PieceReader, "read_piece", counting)
    config = LoaderConfig(batch_size=10, shuffle_buffer_rows=40, shuffle=False, seed=0)
    full, _ = _run(table, 1, config, 0, None)
    everything = set(read)
    _, states = _run(table, 1, config, 0, 12)  # 120 rows: blocks 0-2 are behind the cursor
    read.clear()
    rest, _ = _run(table, 3, config, 0, None, state=states[0])
    # Unshuffled, the order is the pieces': its first 120 rows live in the pieces the resume skips.
    assert not set(_ids(rest)) & set(_ids(full)[:120])
    assert read and len(set(read)) < len(everything)
    with TableLoader(table, config=config) as loader:
        pieces = loader._reader._pieces
    first_rows = np.cumsum([0] + [p.num_rows for p in pieces])
    assert all(first_rows[i + 1] > 120 - 40 for i in set(read)), "a block wholly behind the cursor was read"
