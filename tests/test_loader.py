"""TableLoader on real Delta tables on disk: sharding, shuffling, resume, decoding, errors."""

from __future__ import annotations

import gc
import io
import threading
import time
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
from sparkdl.errors import (
    EmptyTableError,
    ImageDecodeError,
    LoaderError,
    SchemaMismatchError,
    TableNotFoundError,
    TableVersionError,
)
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
    with TableLoader(uneven_table, rank=0, world_size=4, config=cfg(seed=state["seed"] + 1)) as other:
        with pytest.raises(ValueError, match="seed"):
            other.load_state_dict(state)
    with TableLoader(uneven_table, rank=0, world_size=4, config=cfg(shuffle_buffer_rows=48)) as other:
        with pytest.raises(ValueError, match="block_rows"):
            other.load_state_dict(state)
    old = {k: v for k, v in state.items() if k not in ("consumed", "leg_world_size")}
    with TableLoader(uneven_table, rank=0, world_size=2, config=cfg()) as same:
        with pytest.raises(ValueError, match="older sparkdl"):
            same.load_state_dict(old)


@pytest.fixture(scope="session")
def many_groups_table(tmp_path_factory) -> str:
    """12,000 rows in one file of 10 row groups of 1,200 rows, ids in file order."""
    return write_parts(tmp_path_factory.mktemp("lanes") / "t", [(12_000, 1200)])


def _lanes_cfg(**kw) -> LoaderConfig:
    # Blocks of 1,280 rows with stripes of >= 128 rows: 10 lanes fit the default window.
    return cfg(batch_size=32, shuffle_buffer_rows=1280, drop_last=False, seed=5, **kw)


def test_lanes_mix_every_batch_across_row_groups_and_keep_the_order_world_size_free(many_groups_table):
    with TableLoader(many_groups_table, config=_lanes_cfg()) as one:
        assert one.shuffle_lanes == 10
        assert "lane row groups" in one.memory_bound.terms
        one.set_epoch(1)
        whole = ids_of(one)
    with TableLoader(many_groups_table, config=_lanes_cfg(shuffle_window_bytes=None)) as flat:
        assert flat.shuffle_lanes == 1
        flat.set_epoch(1)
        narrow = ids_of(flat)

    def groups_per_batch(batches):
        return float(np.mean([len({i // 1200 for i in b}) for b in batches if len(b) == 32]))

    # 32 rows from a block of 1,280 rows, smaller than a row group: with 10 lanes they come from
    # about 10 row groups, without lanes from 1 or 2.
    assert groups_per_batch(whole) >= 8 > 2.5 >= groups_per_batch(narrow)
    flat_ids = [i for b in whole for i in b]
    assert sorted(flat_ids) == list(range(12_000))
    # The order does not depend on the world size: 3 ranks read consecutive thirds of it.
    per_rank = []
    for rank in range(3):
        with TableLoader(many_groups_table, rank=rank, world_size=3, config=_lanes_cfg()) as loader:
            loader.set_epoch(1)
            per_rank += [i for b in ids_of(loader) for i in b]
    assert per_rank == flat_ids


def test_a_memory_budget_lowers_the_lanes_before_the_shuffle_buffer(many_groups_table):
    with TableLoader(many_groups_table, config=_lanes_cfg()) as free:
        wide = free.memory_bound
    budget = wide.total * 2 // 3
    with TableLoader(many_groups_table, config=_lanes_cfg(max_memory_bytes=budget)) as tight:
        assert 1 < tight.shuffle_lanes < 10 and tight.block_rows == 1280
        assert tight.memory_bound.total <= budget
        ids = [i for b in ids_of(tight) for i in b]
    assert sorted(ids) == list(range(12_000))


def test_lanes_resume_on_another_world_size_reads_each_remaining_row_once(many_groups_table):
    states, taken = [], []
    for rank in range(2):
        with TableLoader(many_groups_table, rank=rank, world_size=2, config=_lanes_cfg()) as loader:
            for i, batch in enumerate(loader):
                taken += batch["id"].tolist()
                if i == 20:
                    states.append(loader.state_dict())
                    break
    state = TableLoader.merge_states(states)
    assert state["shuffle_lanes"] == 10
    rest = []
    for rank in range(3):
        with TableLoader(many_groups_table, rank=rank, world_size=3, config=_lanes_cfg()) as loader:
            loader.load_state_dict(state)
            rest += [i for b in ids_of(loader) for i in b]
    assert len(rest) == len(set(rest)) and not set(rest) & set(taken)
    assert len(taken) + len(rest) >= 12_000 - 2  # remainder="drop" leaves at most world_size - 1 out
    with TableLoader(many_groups_table, config=_lanes_cfg(shuffle_window_bytes=None)) as other:
        with pytest.raises(ValueError, match="shuffle_lanes=10.*shuffle_window_bytes"):
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


def _image_column_table(path: Path, encoded: list[bytes], shape: list[int] | None) -> str:
    spec = {"name": "image", "type": "binary", "codec": "png"}
    if shape is not None:
        spec["shape"] = shape
    schema = DatasetSchema.from_dict({"name": "imgs", "columns": [{"name": "id", "type": "int64"}, spec]})
    t = pa.table({"id": np.arange(len(encoded), dtype=np.int64), "image": encoded}, schema=schema.to_arrow())
    deltalake.write_deltalake(str(path), t)
    return str(path)


def _encode(pixels: np.ndarray, mode: str | None = None, **save) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    img = Image.fromarray(pixels) if mode is None else Image.fromarray(pixels, mode=mode)
    img.save(buf, format="PNG", **save)
    return buf.getvalue()


def test_channels_first_and_last_image_shapes(tmp_path):
    rng = np.random.default_rng(1)
    px = rng.integers(0, 256, size=(6, 4, 5, 3), dtype=np.uint8)  # 6 RGB images, 4 high, 5 wide
    encoded = [_encode(p) for p in px]
    for shape, expected in (
        ([3, 4, 5], px.transpose(0, 3, 1, 2)),  # channels first: transposed, not reshaped
        ([4, 5, 3], px),
        ([1, 4, 5], np.stack([np.asarray(_grey(p)) for p in px])[:, None]),
        ([4, 5], np.stack([np.asarray(_grey(p)) for p in px])),
    ):
        uri = _image_column_table(tmp_path / f"t{'x'.join(map(str, shape))}", encoded, shape)
        with TableLoader(uri, config=LoaderConfig(batch_size=6, shuffle=False)) as loader:
            batch = next(iter(loader))
        assert batch["image"].shape == (6, *shape)
        np.testing.assert_array_equal(batch["image"].numpy(), expected)


def _grey(pixels: np.ndarray):
    from PIL import Image

    return Image.fromarray(pixels).convert("L")


def test_image_shapes_that_do_not_fit_are_rejected(tmp_path):
    px = np.zeros((2, 4, 5, 3), dtype=np.uint8)
    encoded = [_encode(p) for p in px]
    # Same number of pixels, other layout: an error, not a silent reshape.
    uri = _image_column_table(tmp_path / "wrong", encoded, [5, 4, 3])
    with TableLoader(uri, config=LoaderConfig(batch_size=2)) as loader:
        with pytest.raises(ImageDecodeError, match=r"column 'image'.*4x5.*declares shape \[5, 4, 3\]"):
            next(iter(loader))
    with pytest.raises(ImageDecodeError, match=r"\[H, W, C\].*\[C, H, W\]"):
        TableLoader(_image_column_table(tmp_path / "bad", encoded, [2, 4, 5, 3]))
    with pytest.raises(ImageDecodeError, match=r"\[H, W, C\].*\[C, H, W\]"):
        TableLoader(_image_column_table(tmp_path / "two", encoded, [5, 4, 2]))
    # A 3x3 RGB image declared [3, 3, 3] could be either layout.
    cube = _image_column_table(tmp_path / "cube", [_encode(np.zeros((3, 3, 3), np.uint8))] * 2, [3, 3, 3])
    with TableLoader(cube, config=LoaderConfig(batch_size=2)) as loader:
        with pytest.raises(ImageDecodeError, match="ambiguous"):
            next(iter(loader))


def test_palette_pngs_give_colours_and_16_bit_pngs_are_rejected(tmp_path):
    from PIL import Image

    rgb = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 255]]], dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).quantize(4).save(buf, format="PNG")  # mode P: palette indices
    uri = _image_column_table(tmp_path / "palette", [buf.getvalue()] * 2, None)
    with TableLoader(uri, config=LoaderConfig(batch_size=2)) as loader:
        np.testing.assert_array_equal(next(iter(loader))["image"][0].numpy(), rgb)

    deep = np.array([[1000, 40000], [256, 65535]], dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(deep).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    for shape in (None, [2, 2]):
        uri = _image_column_table(tmp_path / f"deep{shape is None}", [buf.getvalue()] * 2, shape)
        with TableLoader(uri, config=LoaderConfig(batch_size=2)) as loader:
            with pytest.raises(ImageDecodeError, match=r"parquet, row [01] has Pillow mode .I;16. \(more than 8 bits"):
                next(iter(loader))


def test_declared_schema_dtypes_convert_and_mismatches_are_named(uneven_table):
    declared = DatasetSchema.from_dict({"name": "t", "columns": [
        {"name": "id", "type": "int32"}, {"name": "x", "type": "float64"}, {"name": "v", "type": "array<float64>"}]})
    with TableLoader(uneven_table, config=cfg(columns=["id", "x", "v"]), schema=declared) as loader:
        batch = next(iter(loader))
    assert (batch["id"].dtype, batch["x"].dtype, batch["v"].dtype) == (torch.int32, torch.float64, torch.float64)
    config = cfg(columns=["id", "x"], dtypes={"x": "float32"})  # the caller wins over the schema
    with TableLoader(uneven_table, config=config, schema=declared) as loader:
        assert next(iter(loader))["x"].dtype == torch.float32
    wrong = DatasetSchema.from_dict({"name": "t", "columns": [{"name": "name", "type": "float32"}]})
    with pytest.raises(SchemaMismatchError, match=r"column 'name' is declared float.*holds string"):
        TableLoader(uneven_table, config=cfg(columns=["name"]), schema=wrong)


def _flip_a_data_page_byte(path: str, row_group: int = 0, column: int = 1) -> None:
    """Flip one bit inside the first data page of a column chunk (past its page header)."""
    chunk = pq.ParquetFile(path).metadata.row_group(row_group).column(column)
    first = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    end = first + chunk.total_compressed_size
    data = bytearray(Path(path).read_bytes())
    data[(chunk.data_page_offset + end) // 2] ^= 0x10
    Path(path).write_bytes(bytes(data))


def test_a_corrupt_data_page_raises_naming_the_file(tmp_path):
    path = str(tmp_path / "part-0.parquet")
    rng = np.random.default_rng(0)
    table = pa.table({"id": np.arange(4000, dtype=np.int64), "x": rng.standard_normal(4000)})
    pq.write_table(table, path, row_group_size=1000, compression="none", write_page_checksum=True)
    _flip_a_data_page_byte(path, row_group=2)
    config = LoaderConfig(batch_size=100, shuffle=False)
    with TableLoader([path], config=config) as loader:
        with pytest.raises(LoaderError, match=r"row group 2 of .*part-0.parquet is corrupt.*restore it"):
            list(loader)
    # Unverified, the flipped bit decodes into a wrong value without any error (what the check prevents).
    with TableLoader([path], config=LoaderConfig(batch_size=100, shuffle=False, verify_checksums=False)) as loader:
        x = torch.cat([b["x"] for b in loader]).numpy()
    assert not np.array_equal(x, table.column("x").to_numpy())


@pytest.mark.integration
def test_spark_writes_page_checksums_the_loader_verifies(spark, tmp_path):
    from sparkdl.lakehouse import write_table

    uri = str(tmp_path / "t")
    df = spark.range(0, 20000, numPartitions=1).selectExpr("id", "cast(rand(1) as double) as x")
    write_table(df, uri)
    files = snapshot(uri).files
    _flip_a_data_page_byte(files[0].removeprefix("file://"), column=1)
    with TableLoader(uri, config=LoaderConfig(batch_size=1000)) as loader:
        with pytest.raises(LoaderError, match="is corrupt"):
            list(loader)


@pytest.mark.integration
def test_real_digits_tables_load_on_two_ranks(spark, tmp_path):
    from sparkdl.etl.digits import digits_images, run_digits_etl

    res = run_digits_etl(spark=spark, lakehouse=str(tmp_path / "lakehouse"))
    images, labels = digits_images()
    seen = []
    for name in ("digits_train", "digits_valid"):
        for rank in range(2):
            config = LoaderConfig(batch_size=64, remainder="pad", drop_last=False, decode_threads=2)
            with TableLoader(res.tables[name], version=res.table_versions[name], rank=rank, world_size=2,
                             config=config) as loader:
                for batch in loader:
                    ids = batch["id"].numpy()
                    assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (8, 8)
                    np.testing.assert_array_equal(batch["image"].numpy(), images[ids])
                    np.testing.assert_array_equal(batch["label"].numpy(), labels[ids])
                    seen += ids.tolist()
    assert set(seen) == set(range(len(labels)))


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


def test_filter_prunes_row_groups_by_statistics(single_file_table):
    # 8 row groups of 25 ids in order: ids 30..69 lie in row groups 1 and 2 only.
    flt = (ds.field("id") >= 30) & (ds.field("id") < 70)
    with TableLoader(single_file_table, config=cfg(drop_last=False, shuffle=False), filter=flt) as loader:
        assert loader.num_rows == 40 and len(loader._counts) == 2
        assert [i for b in ids_of(loader) for i in b] == list(range(30, 70))


def test_fsspec_filesystem_and_a_remote_parquet_uri(single_file_table):
    fsspec = pytest.importorskip("fsspec")
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    mem = fsspec.filesystem("memory")
    (local,) = snapshot(single_file_table).files
    mem.pipe("/bucket/data/t.parquet", Path(local).read_bytes())
    fs = PyFileSystem(FSSpecHandler(mem))
    # A single remote *.parquet URI is a file, not a Delta table.
    with TableLoader("memory://bucket/data/t.parquet", filesystem=fs, config=cfg(shuffle=False)) as loader:
        assert loader.version is None and loader.num_rows == 200
        assert [i for b in ids_of(loader) for i in b] == list(range(192))


def test_s3_storage_options_configure_the_data_filesystem():
    from pyarrow.fs import S3FileSystem

    from sparkdl.data.source import _filesystem_for

    options = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "eu-west-1",
               "AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}
    fs, paths = _filesystem_for(["s3a://bucket/t/part-0.parquet"], None, options)
    assert isinstance(fs, S3FileSystem) and paths == ["bucket/t/part-0.parquet"]
    kwargs = fs.__reduce__()[1][0]
    assert (kwargs["access_key"], kwargs["region"], kwargs["endpoint_override"], kwargs["scheme"]) == (
        "k", "eu-west-1", "127.0.0.1:9000", "http")


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


@pytest.mark.parametrize("kw, field", [
    ({"shuffle": "no"}, "shuffle"), ({"drop_last": None}, "drop_last"), ({"pin_memory": 1}, "pin_memory"),
    ({"max_bytes_in_flight": "1GB"}, "max_bytes_in_flight"), ({"max_bytes_in_flight": 1.5}, "max_bytes_in_flight"),
    ({"max_memory_bytes": 0}, "max_memory_bytes"), ({"dtypes": {"x": 3}}, r"dtypes\['x'\]"),
    ({"dtypes": {"x": "floaty"}}, r"dtypes\['x'\]"), ({"batch_size": 2.0}, "batch_size=2.0.*e.g. batch_size=256"),
])
def test_config_rejects_bad_values_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=f"LoaderConfig.{field}"):
        LoaderConfig(**kw)


def test_config_accepts_torch_dtypes(uneven_table):
    config = cfg(columns=["x"], dtypes={"x": torch.float64})
    assert config.dtypes == {"x": "float64"}
    with TableLoader(uneven_table, config=config) as loader:
        assert next(iter(loader))["x"].dtype == torch.float64


def test_state_names_the_source_and_filter(uneven_table, tmp_path):
    flt = ds.field("label") == 1
    with TableLoader(uneven_table, config=cfg(), filter=flt) as loader:
        state = loader.state_dict()
    other = ds.field("label") == 2  # as many rows (333) as the first filter
    with TableLoader(uneven_table, config=cfg(), filter=other) as loader:
        assert loader.num_rows == 333
        with pytest.raises(ValueError, match="filter"):
            loader.load_state_dict(state)
    copy = write_parts(tmp_path / "copy", [(300, 97), (450, 50), (250, 13)])  # same rows, other table
    with TableLoader(copy, config=cfg(), filter=flt) as loader:
        with pytest.raises(ValueError, match="source"):
            loader.load_state_dict(state)
    files = snapshot(uneven_table).files
    with TableLoader(files, config=cfg()) as a, TableLoader(list(reversed(files)), config=cfg()) as b:
        with pytest.raises(ValueError, match="source"):
            b.load_state_dict(a.state_dict())


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


@pytest.mark.integration
def test_a_script_that_exits_mid_epoch_without_closing_exits_cleanly(uneven_table):
    # A producer thread left inside native code (Arrow, torch) at interpreter exit used to abort
    # the process ("terminate called without an active exception"); the busy transform keeps
    # the producer in native code, without the GIL, nearly all the time.
    import subprocess
    import sys

    script = (
        "import sys, torch\n"
        "from sparkdl.data import LoaderConfig, TableLoader\n"
        "def busy(batch):\n"
        "    torch.ones(600, 600) @ torch.ones(600, 600)\n"
        "    return batch\n"
        "it = iter(TableLoader(sys.argv[1], config=LoaderConfig(batch_size=10, prefetch_batches=1), transform=busy))\n"
        "for _ in range(3):\n"
        "    next(it)\n"
        "print('left without closing')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, uneven_table], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "left without closing" in proc.stdout, (proc.returncode, proc.stderr[-2000:])


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


def test_byte_bound_counts_decoded_images(tmp_path):
    # Flat 32x32 RGB images: ~100 bytes of PNG, 3 KiB of pixels each.
    encoded = [_encode(np.full((32, 32, 3), i, np.uint8)) for i in range(96)]
    uri = _image_column_table(tmp_path / "flat", encoded, [32, 32, 3])
    batch_bytes = 4 * (32 * 32 * 3 + 8)
    config = LoaderConfig(batch_size=4, prefetch_batches=100, max_bytes_in_flight=2 * batch_bytes)
    with TableLoader(uri, config=config) as loader:
        most = 0
        for batch in loader:
            assert batch["image"].shape == (4, 32, 32, 3)
            # Let the producer run ahead as far as the bound lets it, then count what waits.
            time.sleep(0.02)
            waiting = list(loader._active._items)
            most = max(most, sum(sum(v.numel() * v.element_size() for v in batch.values())
                                 for item, _, _ in waiting if isinstance(item, list) for batch in item))
    assert 0 < most <= 2 * batch_bytes


def test_memory_budget_shrinks_the_shuffle_buffer(uneven_table):
    config = cfg(columns=["id", "x", "v"], batch_size=8, shuffle_buffer_rows=512)
    with TableLoader(uneven_table, config=config) as loader:
        full = loader.memory_bound
        assert loader.block_rows == 512 and full.total > 0 and not full.estimated
    # Without a budget batches are views that keep earlier blocks alive; under one they are copies.
    held = full.terms["blocks behind waiting views"]
    assert held > 0
    budget = full.total - held - 100 * 8 * (8 + 4 + 4 * 4)  # about 100 batches' worth less
    seen = []
    for rank in range(2):
        small = cfg(columns=["id", "x", "v"], batch_size=8, shuffle_buffer_rows=512, max_memory_bytes=budget,
                    drop_last=False)
        with TableLoader(uneven_table, rank=rank, world_size=2, config=small) as loader:
            assert loader.block_rows < 512 and loader.block_rows % 8 == 0
            assert loader.memory_bound.total <= budget and loader.state_dict()["block_rows"] == loader.block_rows
            seen += [i for b in ids_of(loader) for i in b]
    assert sorted(seen) == list(range(1000))
    with pytest.raises(ValueError, match=r"max_memory_bytes=1,000 cannot hold.*at least [\d,]+"):
        TableLoader(uneven_table, config=cfg(max_memory_bytes=1000))


def _malloc_in_use() -> int:
    """Bytes in use in glibc malloc (torch's and numpy's CPU allocations); 0 where unavailable."""
    import ctypes

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = Mallinfo2
    except (OSError, AttributeError):
        return 0
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def test_memory_does_not_grow_across_epochs(uneven_table):
    config = cfg(columns=["id", "x", "v"], batch_size=32, shuffle_buffer_rows=256)
    with TableLoader(uneven_table, config=config) as loader:
        arrow, heap = [], []
        for epoch in range(6):
            loader.set_epoch(epoch)
            for _ in loader:
                pass
            gc.collect()
            arrow.append(pa.total_allocated_bytes())
            heap.append(_malloc_in_use())
    # Arrow buffers and torch tensors (gathered batches) are both released every epoch.
    assert max(arrow[2:]) <= arrow[1] + 64 * 1024, arrow
    assert max(heap[2:]) <= heap[1] + 256 * 1024, heap


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


@pytest.mark.gpu
def test_batches_are_pinned_without_a_device(uneven_table):
    with TableLoader(uneven_table, config=cfg(pin_memory=True, columns=["id", "v"])) as loader:
        batch = next(iter(loader))
    assert batch["id"].is_pinned() and batch["v"].is_pinned() and batch["v"].device.type == "cpu"


@pytest.mark.parametrize("world, batch, shuffle", [(3, 4, True), (4, 2, False), (5, 3, True)])
def test_padded_batches_carry_a_mask_false_exactly_for_the_repeats(tiny_table, world, batch, shuffle):
    """11 rows on 3-5 ranks under remainder="pad": every rank reads ceil(11 / world) rows; the
    batches' _valid mask is True for exactly one reading of each of the 11 rows."""
    from sparkdl.data.loader import PAD_MASK

    real = []
    for rank in range(world):
        config = cfg(batch_size=batch, drop_last=False, remainder="pad", shuffle=shuffle, shuffle_buffer_rows=8)
        with TableLoader(tiny_table, rank=rank, world_size=world, config=config) as loader:
            for b in loader:
                mask = b[PAD_MASK]
                assert mask.dtype == torch.bool and mask.shape == b["id"].shape
                real += b["id"][mask].tolist()
    assert sorted(real) == list(range(11))
    # Without padding there is no mask.
    with TableLoader(tiny_table, rank=0, world_size=2, config=cfg(batch_size=4, drop_last=False)) as loader:
        assert all(PAD_MASK not in b for b in loader)
