"""TableLoader on real Delta tables on disk: sharding, shuffling, resume, decoding, errors."""

from __future__ import annotations

import gc
import io
import threading
from pathlib import Path

import deltalake
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from deltalake import WriterProperties

from sparkdl.data import LoaderConfig, TableLoader
from sparkdl.errors import EmptyTableError, ImageDecodeError, LoaderError, TableNotFoundError, TableVersionError
from sparkdl.lakehouse import snapshot
from sparkdl.schema import DatasetSchema

VEC = 4


def _rows(start: int, n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    ids = np.arange(start, start + n, dtype=np.int64)
    vec = (ids[:, None] * 10 + np.arange(VEC)).astype(np.float32)
    return pa.table({
        "id": ids,
        "x": rng.random(n, dtype=np.float32),
        "label": (ids % 3).astype(np.int32),
        "v": pa.array(list(vec), pa.list_(pa.float32())),
        "name": pa.array([f"row{i}" for i in ids]),
    })


def write_parts(path: Path, parts: list[tuple[int, int]], **kw) -> str:
    """One append (one file) per (rows, rows per row group) part; ids run 0..N-1 across parts."""
    start = 0
    for i, (n, per_group) in enumerate(parts):
        props = WriterProperties(max_row_group_size=per_group, write_batch_size=min(per_group, 1024))
        deltalake.write_deltalake(str(path), _rows(start, n, i), mode="append", writer_properties=props, **kw)
        start += n
    return str(path)


@pytest.fixture(scope="session")
def uneven_table(tmp_path_factory) -> str:
    """1,000 rows in 3 files with row groups of 97, 50 and 13 rows (and their remainders)."""
    return write_parts(tmp_path_factory.mktemp("uneven") / "t", [(300, 97), (450, 50), (250, 13)])


@pytest.fixture(scope="session")
def tiny_table(tmp_path_factory) -> str:
    """11 rows in a single file of 2 row groups: fewer row groups than ranks."""
    return write_parts(tmp_path_factory.mktemp("tiny") / "t", [(11, 6)])


@pytest.fixture(scope="session")
def single_file_table(tmp_path_factory) -> str:
    """200 rows in one file of 8 row groups, ids in file order."""
    return write_parts(tmp_path_factory.mktemp("single") / "t", [(200, 25)])


def ids_of(loader: TableLoader) -> list[list[int]]:
    return [b["id"].tolist() for b in loader]


def cfg(**kw) -> LoaderConfig:
    kw.setdefault("batch_size", 16)
    kw.setdefault("shuffle_buffer_rows", 40)
    kw.setdefault("columns", ["id", "x"])
    return LoaderConfig(**kw)


# ---------------------------------------------------------------------------------------
# Sharding: every row once, the same number of batches on every rank
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("table", ["uneven_table", "tiny_table"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("remainder", ["drop", "pad"])
@pytest.mark.parametrize("shuffle", [True, False])
def test_every_row_once_and_equal_batches(request, table, world, remainder, shuffle):
    uri = request.getfixturevalue(table)
    n_rows = snapshot(uri).num_rows
    batch = 16 if table == "uneven_table" else 2
    per_rank_batches, per_rank_sizes, seen = [], [], []
    for rank in range(world):
        config = cfg(batch_size=batch, shuffle=shuffle, remainder=remainder, drop_last=False, seed=3)
        with TableLoader(uri, rank=rank, world_size=world, config=config) as loader:
            batches = ids_of(loader)
        assert len(batches) == len(loader)
        per_rank_batches.append(len(batches))
        per_rank_sizes.append([len(b) for b in batches])
        seen += [i for b in batches for i in b]
    assert len(set(per_rank_batches)) == 1, per_rank_batches
    assert all(sizes == per_rank_sizes[0] for sizes in per_rank_sizes)
    if remainder == "drop":
        assert len(seen) == len(set(seen)) == (n_rows // world) * world
    else:
        assert set(seen) == set(range(n_rows))
        assert len(seen) == -(-n_rows // world) * world


def test_drop_last_gives_full_batches_of_equal_count(uneven_table):
    counts = []
    for rank in range(3):
        with TableLoader(uneven_table, rank=rank, world_size=3, config=cfg(batch_size=32)) as loader:
            sizes = [len(b) for b in ids_of(loader)]
        assert sizes == [32] * (333 // 32)
        counts.append(len(sizes))
    assert counts == [10, 10, 10]


def test_dropped_remainder_rows_change_across_epochs(uneven_table):
    # 1,000 rows over 3 ranks: 1 row per epoch is left out, a different one each epoch.
    left_out = []
    for epoch in range(4):
        seen = set()
        for rank in range(3):
            with TableLoader(uneven_table, rank=rank, world_size=3, config=cfg(drop_last=False)) as loader:
                loader.set_epoch(epoch)
                seen |= {i for b in ids_of(loader) for i in b}
        left_out.append(set(range(1000)) - seen)
    assert all(len(s) == 1 for s in left_out)
    assert len(set(map(frozenset, left_out))) > 1


# ---------------------------------------------------------------------------------------
# Shuffling
# ---------------------------------------------------------------------------------------
def test_same_seed_same_order_other_seed_other_order(uneven_table):
    def run(seed):
        with TableLoader(uneven_table, rank=1, world_size=2, config=cfg(seed=seed)) as loader:
            return ids_of(loader)

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_each_epoch_reshuffled(uneven_table):
    with TableLoader(uneven_table, config=cfg(drop_last=False, shuffle_buffer_rows=64)) as loader:
        epochs = []
        for epoch in range(3):
            loader.set_epoch(epoch)
            epochs.append([i for b in ids_of(loader) for i in b])
    for order in epochs:
        assert sorted(order) == list(range(1000))
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]
    # Row groups are permuted across files, not only rows within them: the position of a row
    # in the epoch is nearly uncorrelated with its position in the table (~36 row groups).
    for order in epochs:
        assert abs(np.corrcoef(order, np.arange(1000))[0, 1]) < 0.8


def test_iterating_again_without_set_epoch_moves_to_the_next_epoch(uneven_table):
    with TableLoader(uneven_table, config=cfg()) as a, TableLoader(uneven_table, config=cfg()) as b:
        ids_of(a)
        second = ids_of(a)
        b.set_epoch(1)
        assert second == ids_of(b)


def test_shuffle_false_keeps_file_order(single_file_table, uneven_table):
    with TableLoader(single_file_table, config=cfg(shuffle=False, drop_last=False)) as loader:
        assert [i for b in ids_of(loader) for i in b] == list(range(200))
    halves = []
    for rank in range(2):
        with TableLoader(single_file_table, rank=rank, world_size=2, config=cfg(shuffle=False, drop_last=False)) as loader:
            halves.append([i for b in ids_of(loader) for i in b])
    assert halves == [list(range(100)), list(range(100, 200))]
    # Several files: the order of the files sorted by path, rows in file order.
    expected = [i for f in sorted(snapshot(uneven_table).files) for i in pq.read_table(f, columns=["id"])["id"].to_pylist()]
    with TableLoader(uneven_table, config=cfg(shuffle=False, drop_last=False, batch_size=64)) as loader:
        assert [i for b in ids_of(loader) for i in b] == expected


# ---------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("stop_after", [1, 3, 5, 13])
def test_resume_mid_epoch_yields_exactly_the_rest(uneven_table, stop_after):
    config = cfg(batch_size=16, shuffle_buffer_rows=40, drop_last=False)  # blocks of 48 rows = 3 batches
    with TableLoader(uneven_table, rank=1, world_size=2, config=config) as loader:
        loader.set_epoch(2)
        full = ids_of(loader)

    with TableLoader(uneven_table, rank=1, world_size=2, config=config) as loader:
        loader.set_epoch(2)
        for i, _ in enumerate(loader):
            if i + 1 == stop_after:
                state = loader.state_dict()
                break
    assert state["epoch"] == 2 and state["position"] == stop_after

    with TableLoader(uneven_table, rank=1, world_size=2, config=config) as resumed:
        resumed.load_state_dict(state)
        rest = []
        for epoch in range(state["epoch"], 4):
            resumed.set_epoch(epoch)
            rest.append(ids_of(resumed))
        assert resumed.state_dict()["epoch"] == 4 and resumed.state_dict()["position"] == 0
    assert rest[0] == full[stop_after:]
    assert len(rest[1]) == len(full)  # the next epoch starts from its beginning


def test_state_after_full_epoch_and_mismatched_state(uneven_table):
    with TableLoader(uneven_table, rank=0, world_size=2, config=cfg()) as loader:
        loader.set_epoch(5)
        ids_of(loader)
        state = loader.state_dict()
        assert (state["epoch"], state["position"]) == (6, 0)
        assert state["rank"] == 0 and state["world_size"] == 2 and state["version"] == loader.version
    with TableLoader(uneven_table, rank=0, world_size=4, config=cfg()) as other:
        with pytest.raises(ValueError, match="world_size"):
            other.load_state_dict(state)


# ---------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------
def test_tensor_string_and_dtype_columns(uneven_table):
    config = cfg(columns=["id", "v", "label", "name"], dtypes={"label": "int64", "v": "float64"}, shuffle=True)
    with TableLoader(uneven_table, config=config) as loader:
        batch = next(iter(loader))
    assert list(batch) == ["id", "v", "label", "name"]
    assert batch["v"].shape == (16, VEC) and batch["v"].dtype == torch.float64
    assert batch["label"].dtype == torch.int64 and batch["id"].dtype == torch.int64
    ids = batch["id"].numpy()
    np.testing.assert_array_equal(batch["v"].numpy(), ids[:, None] * 10 + np.arange(VEC))
    np.testing.assert_array_equal(batch["label"].numpy(), ids % 3)
    assert batch["name"] == [f"row{i}" for i in ids]


def test_declared_shape_reshapes_and_mismatch_is_named(uneven_table):
    schema = DatasetSchema.from_dict({"name": "t", "columns": [{"name": "v", "type": "array<float32>", "shape": [2, 2]}]})
    with TableLoader(uneven_table, config=cfg(columns=["id", "v"]), schema=schema) as loader:
        assert next(iter(loader))["v"].shape == (16, 2, 2)
    bad = DatasetSchema.from_dict({"name": "t", "columns": [{"name": "v", "type": "array<float32>", "shape": [5]}]})
    with TableLoader(uneven_table, config=cfg(columns=["v"]), schema=bad) as loader:
        with pytest.raises(LoaderError, match=r"column 'v'.*holds 4 values.*declared shape \[5\]"):
            next(iter(loader))


def test_ragged_arrays_name_the_column_file_and_row(tmp_path):
    t = pa.table({"id": np.arange(6), "v": pa.array([[1.0, 2.0]] * 4 + [[1.0]] + [[1.0, 2.0]], pa.list_(pa.float32()))})
    deltalake.write_deltalake(str(tmp_path / "ragged"), t)
    with TableLoader(str(tmp_path / "ragged"), config=LoaderConfig(batch_size=2, shuffle=False)) as loader:
        with pytest.raises(LoaderError, match=r"column 'v'.*\.parquet, row 4 holds 1 values"):
            list(loader)


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _image_table(path: Path, n: int, corrupt_row: int | None = None) -> tuple[str, np.ndarray]:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(n, 8, 8), dtype=np.uint8)
    images = [_png(p) for p in pixels]
    if corrupt_row is not None:
        images[corrupt_row] = b"\x89PNG not really a png"
    schema = DatasetSchema.load("digits")
    arrow = pa.schema([schema.column("id").arrow_field(), schema.column("image").arrow_field(),
                       schema.column("label").arrow_field()])
    t = pa.table({"id": np.arange(n, dtype=np.int64), "image": images, "label": np.zeros(n, np.int32)}, schema=arrow)
    deltalake.write_deltalake(str(path), t, writer_properties=WriterProperties(max_row_group_size=16, write_batch_size=16))
    return str(path), pixels


def test_png_images_decode_to_uint8_tensors(tmp_path):
    uri, pixels = _image_table(tmp_path / "digits", 70)
    config = LoaderConfig(batch_size=8, shuffle_buffer_rows=24, decode_threads=3, drop_last=False)
    with TableLoader(uri, rank=0, world_size=2, config=config) as loader:
        seen = 0
        for batch in loader:
            assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (8, 8)
            np.testing.assert_array_equal(batch["image"].numpy(), pixels[batch["id"].numpy()])
            seen += len(batch["id"])
    assert seen == 35


def test_corrupt_image_names_file_and_row(tmp_path):
    uri, _ = _image_table(tmp_path / "corrupt", 40, corrupt_row=21)
    (path,) = snapshot(uri).files
    with TableLoader(uri, config=LoaderConfig(batch_size=8, shuffle=True, decode_threads=2)) as loader:
        with pytest.raises(ImageDecodeError) as err:
            list(loader)
    assert "column 'image'" in str(err.value) and f"{path}, row 21" in str(err.value)
    assert not [t for t in threading.enumerate() if t.name.startswith("sparkdl-loader")]


# ---------------------------------------------------------------------------------------
# Sources, versions, filters
# ---------------------------------------------------------------------------------------
def test_filter_pushdown_and_counts(uneven_table):
    flt = ds.field("label") == 1
    expected = {i for i in range(1000) if i % 3 == 1}
    seen = []
    for rank in range(2):
        with TableLoader(uneven_table, rank=rank, world_size=2, config=cfg(drop_last=False), filter=flt) as loader:
            assert loader.num_rows == len(expected)
            seen += [i for b in ids_of(loader) for i in b]
    # 333 matching rows over 2 ranks: remainder="drop" leaves one out.
    assert len(seen) == len(set(seen)) == 332 and set(seen) <= expected


def test_filter_on_partition_column(tmp_path):
    t = _rows(0, 60, 0).append_column("part", pa.array(["a", "b", "c"] * 20))
    deltalake.write_deltalake(str(tmp_path / "p"), t, partition_by=["part"])
    flt = ds.field("part") == "b"
    with TableLoader(str(tmp_path / "p"), config=cfg(columns=["id", "part"], drop_last=False), filter=flt) as loader:
        batches = list(loader)
    assert sorted(i for b in batches for i in b["id"].tolist()) == list(range(1, 60, 3))
    assert {p for b in batches for p in b["part"]} == {"b"}


def test_version_pinning_and_parquet_file_list(tmp_path):
    uri = write_parts(tmp_path / "versions", [(50, 20)])
    write_parts(tmp_path / "versions", [(30, 20)])  # version 1 appends 30 more rows
    with TableLoader(uri, version=0, config=cfg(drop_last=False)) as old, TableLoader(uri, config=cfg(drop_last=False)) as new:
        assert (old.version, old.num_rows) == (0, 50)
        assert (new.version, new.num_rows) == (1, 80)
    files = snapshot(uri, 0).files
    with TableLoader(files, config=cfg(drop_last=False)) as loader:
        assert loader.version is None
        assert sorted(i for b in ids_of(loader) for i in b) == list(range(50))


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------
def test_clear_errors(uneven_table, tmp_path):
    with pytest.raises(ValueError, match=r"unknown columns \['nope'\].*available columns: \['id', 'x', 'label', 'v', 'name'\]"):
        TableLoader(uneven_table, config=LoaderConfig(columns=["id", "nope"]))
    with pytest.raises(ValueError, match=r"rank=2 is out of range for world_size=2"):
        TableLoader(uneven_table, rank=2, world_size=2)
    with pytest.raises(TableVersionError, match="no version 9"):
        TableLoader(uneven_table, version=9)
    with pytest.raises(TableNotFoundError):
        TableLoader(str(tmp_path / "missing"))
    with pytest.raises(EmptyTableError, match="no rows match the filter"):
        TableLoader(uneven_table, filter=ds.field("id") < 0)
    with pytest.raises(EmptyTableError, match="less than one batch"):
        TableLoader(uneven_table, world_size=4, config=LoaderConfig(batch_size=300))
    with pytest.raises(ValueError, match=r"dtypes names columns \['y'\]"):
        TableLoader(uneven_table, config=LoaderConfig(columns=["x"], dtypes={"y": "float32"}))
    with pytest.raises(ValueError, match="filter"):
        TableLoader(uneven_table, filter=ds.field("nope") > 1)
    with pytest.raises(ValueError, match="LoaderConfig.remainder"):
        LoaderConfig(remainder="wrap")
    with pytest.raises(ValueError, match="LoaderConfig.batch_size"):
        LoaderConfig(batch_size=0)


def test_empty_table_raises(tmp_path):
    deltalake.write_deltalake(str(tmp_path / "empty"), _rows(0, 0, 0))
    with pytest.raises(EmptyTableError):
        TableLoader(str(tmp_path / "empty"))


# ---------------------------------------------------------------------------------------
# Prefetch threads and memory
# ---------------------------------------------------------------------------------------
def _loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("sparkdl-loader")]


def test_threads_stop_on_break_close_and_exit(uneven_table, tmp_path):
    loader = TableLoader(uneven_table, config=cfg(prefetch_batches=2))
    for i, _ in enumerate(loader):
        assert _loader_threads()
        if i == 2:
            break
    assert not _loader_threads()

    it = iter(loader)
    next(it)
    assert _loader_threads()
    loader.close()
    loader.close()  # idempotent
    assert not _loader_threads()
    with pytest.raises(RuntimeError, match="stopped"):
        next(it)
    with pytest.raises(ValueError, match="closed"):
        iter(loader)

    uri, _ = _image_table(tmp_path / "img", 40)
    with TableLoader(uri, config=LoaderConfig(batch_size=4, decode_threads=3)) as images:
        next(iter(images))
    assert not _loader_threads()


def test_transform_and_bounded_prefetch(uneven_table):
    produced = []

    def double(batch):
        produced.append(1)
        return {**batch, "x2": batch["x"] * 2}

    config = cfg(prefetch_batches=8, max_bytes_in_flight=100)  # less than one batch: one at a time
    with TableLoader(uneven_table, config=config, transform=double) as loader:
        for consumed, batch in enumerate(loader, start=1):
            torch.testing.assert_close(batch["x2"], batch["x"] * 2)
            # At most one batch waits in the queue and one more is blocked handing itself over.
            assert len(produced) - consumed <= 2


def test_memory_does_not_grow_across_epochs(uneven_table):
    config = cfg(columns=["id", "x", "v"], batch_size=32, shuffle_buffer_rows=256)
    with TableLoader(uneven_table, config=config) as loader:
        after = []
        for epoch in range(6):
            loader.set_epoch(epoch)
            for _ in loader:
                pass
            gc.collect()
            after.append(pa.total_allocated_bytes())
    assert max(after[2:]) <= after[1] + 64 * 1024, after


def test_pin_memory_without_cuda_is_ignored_with_a_warning(uneven_table):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: pin_memory is honoured")
    with pytest.warns(UserWarning, match="pin_memory"):
        loader = TableLoader(uneven_table, config=cfg(pin_memory=True, device="cpu"))
    with loader:
        assert next(iter(loader))["x"].device.type == "cpu"


@pytest.mark.gpu
def test_batches_pinned_and_moved_to_cuda(uneven_table):
    with TableLoader(uneven_table, config=cfg(pin_memory=True, device="cuda:0", columns=["id", "v", "name"])) as loader:
        batch = next(iter(loader))
    assert batch["id"].is_cuda and batch["v"].is_cuda and batch["v"].shape == (16, VEC)
    assert isinstance(batch["name"], list)
