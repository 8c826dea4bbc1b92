"""Arrow columns to torch tensors, by the column's declared codec and shape.

The rows a rank takes from a block (one shuffle buffer) are gathered in Arrow first, with one
``take`` per block in the shuffled order (a slice when unshuffled), and converted column by
column, once: numeric columns become
1-D tensors (zero-copy through DLPack where Arrow allows), list / fixed-size-list columns
become ``[n, *shape]`` tensors after a vectorized check that every row holds the declared
number of values, and PNG/JPEG columns stay Arrow binary until a batch is cut, when the
batch's rows are decoded by a thread pool into one ``uint8`` tensor. String and raw binary
columns are handed out as ``list[str]`` / ``list[bytes]``. A batch's tensors are views of its
block (``cut_batch(copy=False)``) or copies of them, which own their memory.

Images: an undeclared shape gives what the file holds (``[H, W]`` grey, ``[H, W, 3]`` RGB,
``[H, W, 4]`` RGBA; palette images become RGB(A), grey+alpha becomes grey). A declared shape
``[H, W]``, ``[H, W, C]`` or ``[C, H, W]`` (C = 1, 3 or 4) converts the colours to C channels
and lays the pixels out channels last or first (``[C, H, W]`` is transposed, not reshaped).
Images of more than 8 bits per channel are rejected rather than wrapped into uint8.
"""

from __future__ import annotations

import io
import json
import math
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from sparkdl.data.config import torch_dtype
from sparkdl.errors import ImageDecodeError, LoaderError, SchemaMismatchError
from sparkdl.schema import DatasetSchema

__all__ = [
    "ColumnDecoder", "build_decoders", "decode_block", "cut_batch", "cut_batches", "concat_batches", "image_layout",
]

Where = Callable[[int], str]
"""Maps a row of the block being decoded to a "file, row" description for error messages."""

_IMAGE_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
# torch has few kernels for wide unsigned integers; widen them to the next signed type.
_WIDEN = {pa.uint16(): pa.int32(), pa.uint32(): pa.int64(), pa.uint64(): pa.int64()}


@dataclass(frozen=True)
class ColumnDecoder:
    """How one column turns into a batch entry."""

    name: str
    kind: str
    """"tensor" (numbers, bools, dates, arrays), "image" (PNG/JPEG bytes) or "objects" (str/bytes)."""
    codec: str = "raw"
    shape: tuple[int, ...] | None = None
    """Per-row shape of array and image columns, when declared."""
    dtype: torch.dtype | None = None
    """dtype to convert to: LoaderConfig.dtypes, else the declared schema's type when it differs."""


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _leaf_type(t: pa.DataType) -> pa.DataType:
    while _is_list(t):
        t = t.value_type
    return t


def _numeric_like(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return (
        pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
        or pa.types.is_temporal(t) or pa.types.is_decimal(t) or pa.types.is_null(t)
    )


# Declared scalar types that convert to a torch dtype (dates and timestamps load as integers).
_TORCH_OF = {
    pa.bool_(): torch.bool, pa.int8(): torch.int8, pa.int16(): torch.int16, pa.int32(): torch.int32,
    pa.int64(): torch.int64, pa.float32(): torch.float32, pa.float64(): torch.float64,
}


def _declared_dtype(dataset: str, name: str, want: pa.DataType, found: pa.DataType) -> torch.dtype | None:
    """The dtype a declared column converts to, when its declared type differs from the table's."""
    want_leaf, found_leaf = _leaf_type(want), _leaf_type(found)
    if pa.types.is_dictionary(found_leaf):
        found_leaf = found_leaf.value_type
    if want_leaf == found_leaf or want_leaf not in _TORCH_OF:
        return None
    if _is_list(want) != _is_list(found) or not _numeric_like(found_leaf) or pa.types.is_temporal(found_leaf):
        raise SchemaMismatchError(
            dataset, [f"column {name!r} is declared {want} but the table holds {found}; fix the schema= "
                      "argument or convert the column in the ETL"]
        )
    return _TORCH_OF[want_leaf]


def build_decoders(
    schema: pa.Schema,
    columns: list[str],
    declared: DatasetSchema | None,
    dtypes: dict[str, str],
) -> list[ColumnDecoder]:
    """One decoder per projected column, from the declared schema, else the column metadata.

    A declared column takes its codec and shape from ``declared``, and its dtype too when the
    declared numeric type differs from the table's (``dtypes``, from LoaderConfig, wins)."""
    unknown = sorted(set(dtypes) - set(columns))
    if unknown:
        raise ValueError(f"LoaderConfig.dtypes names columns {unknown} that are not loaded; loaded columns: {columns}")
    decoders = []
    for name in columns:
        field = schema.field(name)
        meta = {k.decode(): v.decode() for k, v in (field.metadata or {}).items()}
        codec = meta.get("sparkdl.codec", "raw")
        shape = tuple(json.loads(meta["sparkdl.shape"])) if "sparkdl.shape" in meta else None
        t = field.type.value_type if pa.types.is_dictionary(field.type) else field.type
        dtype = None
        if declared is not None and name in declared.names:
            spec = declared.column(name)
            codec, shape = spec.codec, spec.shape
            dtype = _declared_dtype(declared.name, spec.name, spec.arrow_type, t)
        if name in dtypes:
            dtype = torch_dtype(dtypes[name], what=f"LoaderConfig.dtypes[{name!r}]")
        binary = pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)
        if codec in ("png", "jpeg"):
            if not binary:
                raise ValueError(f"column {name!r} is declared {codec} but holds {t}, not binary")
            image_layout(name, shape)
            kind = "image"
        elif binary or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
            if dtype is not None:
                raise ValueError(
                    f"LoaderConfig.dtypes[{name!r}]: column {name!r} holds {t}, which loads as a list of "
                    "Python values, not a tensor; remove it from dtypes"
                )
            kind = "objects"
        elif _numeric_like(_leaf_type(t)):
            kind = "tensor"
        else:
            raise ValueError(
                f"column {name!r} has type {t}, which the loader cannot turn into a tensor; leave it "
                "out of LoaderConfig.columns, or convert it in the ETL (e.g. to array<float32>)"
            )
        decoders.append(ColumnDecoder(name=name, kind=kind, codec=codec, shape=shape, dtype=dtype))
    return decoders


# ---------------------------------------------------------------------------------------
# Tensor columns
# ---------------------------------------------------------------------------------------
def _first(mask: pa.Array) -> int:
    return int(pc.index(mask, True).as_py())


def _scalar_tensor(arr: pa.Array, name: str, where: Where, row_scale: int = 1) -> torch.Tensor:
    """A 1-D tensor of a flat numeric/bool/temporal array; ``row_scale`` maps value index to row."""
    t = arr.type
    if pa.types.is_dictionary(t):
        arr = arr.dictionary_decode()
        t = arr.type
    if pa.types.is_null(t):
        raise LoaderError(f"column {name!r} holds only nulls ({where(0)}); fill it in the ETL or leave it out")
    if pa.types.is_decimal(t):
        arr = arr.cast(pa.float64())
    elif pa.types.is_temporal(t):
        # Dates load as days, timestamps/times/durations as their integer unit (UTC for timestamps).
        arr = arr.cast(pa.int32() if t.bit_width == 32 else pa.int64())
    elif t in _WIDEN:
        arr = arr.cast(_WIDEN[t])
    if arr.null_count:
        if pa.types.is_floating(arr.type):
            arr = arr.fill_null(float("nan"))
        else:
            row = _first(arr.is_null()) // row_scale
            raise LoaderError(
                f"column {name!r} has a null at {where(row)}; an integer/bool tensor cannot hold nulls: "
                f"fill it in the ETL, or pass filter=pyarrow.dataset.field({name!r}).is_valid()"
            )
    if pa.types.is_boolean(arr.type):
        return torch.from_numpy(np.array(arr.to_numpy(zero_copy_only=False), dtype=np.bool_))
    try:
        return torch.from_dlpack(arr)
    except (TypeError, BufferError, RuntimeError, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return torch.from_numpy(np.array(arr.to_numpy(zero_copy_only=False)))


def _list_tensor(arr: pa.Array, dec: ColumnDecoder, where: Where) -> torch.Tensor:
    n = len(arr)
    dims: list[int] = []
    values: pa.Array = arr
    per_row = 1  # values per outer row consumed so far
    while _is_list(values.type):
        if values.null_count:
            row = _first(values.is_null()) // per_row
            raise LoaderError(
                f"column {dec.name!r} has a null array at {where(row)}; fill it in the ETL or filter it "
                f"out with filter=pyarrow.dataset.field({dec.name!r}).is_valid()"
            )
        if pa.types.is_fixed_size_list(values.type):
            length = values.type.list_size
        else:
            lengths = np.diff(values.offsets.to_numpy())
            single_level = not _is_list(values.type.value_type)
            if single_level and dec.shape is not None and not dims:
                length = math.prod(dec.shape)
            else:
                length = int(lengths[0]) if len(lengths) else 0
            bad = np.flatnonzero(lengths != length)
            if bad.size:
                i = int(bad[0])
                need = f"the declared shape {list(dec.shape)} needs {length}" if (
                    single_level and dec.shape is not None and not dims) else f"the first row holds {length}"
                raise LoaderError(
                    f"column {dec.name!r}: the array at {where(i // per_row)} holds {int(lengths[i])} values but "
                    f"{need}; every row must have the same length (pad or truncate it in the ETL, or fix "
                    "sparkdl.shape in the schema)"
                )
        dims.append(length)
        per_row *= length
        values = values.flatten()
    flat = _scalar_tensor(values, dec.name, where, row_scale=max(per_row, 1))
    shape = tuple(dims)
    if dec.shape is not None:
        if math.prod(dec.shape) != per_row:
            raise LoaderError(
                f"column {dec.name!r}: rows hold {per_row} values (shape {list(dims)}) but the declared "
                f"shape {list(dec.shape)} needs {math.prod(dec.shape)}; fix sparkdl.shape in the schema"
            )
        shape = dec.shape
    return flat.reshape(n, *shape)


def decode_block(table: pa.Table, decoders: list[ColumnDecoder], where: Where) -> dict[str, Any]:
    """Convert a block's columns once: tensors for tensor columns, Arrow arrays for the rest."""
    out: dict[str, Any] = {}
    for dec in decoders:
        col = table.column(dec.name)
        arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
        if dec.kind != "tensor":
            out[dec.name] = arr
            continue
        t = _list_tensor(arr, dec, where) if _is_list(arr.type) else _scalar_tensor(arr, dec.name, where)
        if dec.dtype is not None and t.dtype != dec.dtype:
            t = t.to(dec.dtype)
        out[dec.name] = t
    return out


# ---------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------
# Pillow modes with 8 bits per channel, and the mode each becomes when no channel count is declared.
_EIGHT_BIT_MODES = {
    "1": "L", "L": "L", "LA": "L", "P": "RGB", "PA": "RGBA", "RGB": "RGB", "RGBA": "RGBA", "RGBX": "RGB",
    "RGBa": "RGBA", "La": "L", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB",
}


def image_layout(name: str, shape: tuple[int, ...] | None) -> None:
    """Check that a declared image shape is [H, W], [H, W, C] or [C, H, W] with C in 1, 3, 4."""
    if shape is None:
        return
    if len(shape) == 2 or (len(shape) == 3 and (shape[-1] in _IMAGE_MODES or shape[0] in _IMAGE_MODES)):
        return
    raise ImageDecodeError(
        f"column {name!r}: images cannot take the declared shape {list(shape)}; declare [H, W] (grey), "
        "[H, W, C] (channels last) or [C, H, W] (channels first) with C = 1 (grey), 3 (RGB) or 4 (RGBA)"
    )


def _decode_image(data: bytes | None, dec: ColumnDecoder, where: Callable[[], str]) -> np.ndarray:
    """One image as uint8 pixels: [H, W] or [H, W, C] as stored, or laid out as the declared shape."""
    from PIL import Image, UnidentifiedImageError

    if data is None:
        raise ImageDecodeError(f"column {dec.name!r}: the {dec.codec} image at {where()} is null")
    shape = dec.shape
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.mode not in _EIGHT_BIT_MODES:
                raise ImageDecodeError(
                    f"column {dec.name!r}: the image at {where()} has Pillow mode {img.mode!r} (more than 8 bits "
                    "per channel), which would not fit uint8 without losing values; convert it to 8-bit "
                    "(L, RGB or RGBA) in the ETL"
                )
            w, h = img.size
            channels_first = False
            transparent_palette = img.mode == "P" and "transparency" in img.info
            if shape is None:
                mode = "RGBA" if transparent_palette else _EIGHT_BIT_MODES[img.mode]
            elif len(shape) == 2:
                mode = "L"
            else:
                # Which end of the declared shape holds the channels, by the image's size.
                last = shape[-1] in _IMAGE_MODES and tuple(shape[:2]) == (h, w)
                first = shape[0] in _IMAGE_MODES and tuple(shape[1:]) == (h, w)
                if last and first:
                    raise ImageDecodeError(
                        f"column {dec.name!r}: the declared shape {list(shape)} is ambiguous for the {h}x{w} image "
                        f"at {where()} (channels first or last); resize the images in the ETL"
                    )
                if not (last or first):
                    raise ImageDecodeError(
                        f"column {dec.name!r}: the image at {where()} is {h}x{w} ({img.mode}) but the schema "
                        f"declares shape {list(shape)}; resize it in the ETL or fix sparkdl.shape"
                    )
                channels_first = first
                mode = _IMAGE_MODES[shape[0] if first else shape[-1]]
            if transparent_palette:
                img = img.convert("RGBA")
            if img.mode != mode:
                img = img.convert(mode)
            pixels = np.asarray(img)
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"column {dec.name!r}: cannot decode the {dec.codec} image at {where()}: {e}") from e
    if pixels.dtype != np.uint8:
        raise ImageDecodeError(
            f"column {dec.name!r}: the image at {where()} decodes to {pixels.dtype}, not uint8; "
            "convert it to 8-bit in the ETL"
        )
    if shape is None:
        return pixels
    if len(shape) == 3:
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if channels_first:
            pixels = pixels.transpose(2, 0, 1)
    if pixels.shape != shape:
        raise ImageDecodeError(
            f"column {dec.name!r}: the image at {where()} is {list(pixels.shape)} but the schema "
            f"declares shape {list(shape)}; resize it in the ETL or fix sparkdl.shape"
        )
    return pixels


def _decode_images(
    arr: pa.Array, dec: ColumnDecoder, where: Where, pool: Executor | None, threads: int
) -> torch.Tensor:
    values = arr.to_pylist()
    n = len(values)
    first = _decode_image(values[0], dec, lambda: where(0))
    shape = tuple(first.shape)
    out = np.empty((n, *shape), dtype=np.uint8)
    out[0] = first

    def work(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            pixels = _decode_image(values[i], dec, lambda: where(i))
            if pixels.shape != shape:
                raise ImageDecodeError(
                    f"column {dec.name!r}: the image at {where(i)} is {list(pixels.shape)} but earlier ones are "
                    f"{list(shape)}; declare sparkdl.shape in the schema or resize the images in the ETL"
                )
            out[i] = pixels

    if pool is None or threads <= 1 or n < 2 * threads:
        work(1, n)
    else:
        step = -(-(n - 1) // threads)
        futures = [pool.submit(work, lo, min(lo + step, n)) for lo in range(1, n, step)]
        for f in futures:
            f.result()
    return torch.from_numpy(out)


def cut_batch(
    block: dict[str, Any],
    decoders: list[ColumnDecoder],
    lo: int,
    hi: int,
    where: Where,
    pool: Executor | None,
    threads: int,
    *,
    copy: bool = True,
) -> dict[str, Any]:
    """Rows ``[lo, hi)`` of a decoded block as a batch; ``where`` maps a block row to its origin,
    for error messages. Tensor columns are views of the block unless ``copy`` (then the batch
    owns its memory and a waiting batch does not keep its block alive)."""
    batch: dict[str, Any] = {}
    for dec in decoders:
        value = block[dec.name]
        if dec.kind == "tensor":
            batch[dec.name] = value[lo:hi].clone() if copy else value[lo:hi]
        elif dec.kind == "image":
            t = _decode_images(value.slice(lo, hi - lo), dec, lambda i: where(lo + i), pool, threads)
            batch[dec.name] = t.to(dec.dtype) if dec.dtype is not None else t
        else:
            batch[dec.name] = value.slice(lo, hi - lo).to_pylist()
    return batch


def cut_batches(
    block: dict[str, Any],
    decoders: list[ColumnDecoder],
    lo: int,
    hi: int,
    batch_size: int,
    where: Where,
    pool: Executor | None,
    threads: int,
    *,
    copy: bool = True,
) -> list[dict[str, Any]]:
    """Rows ``[lo, hi)`` of a decoded block as consecutive batches of ``batch_size`` rows (the
    last one shorter if they do not divide evenly); as :func:`cut_batch`, with one ``split`` per
    tensor column for all the batches, so a batch costs a dict, not a slice per column."""
    if hi <= lo:
        return []
    starts = range(lo, hi, batch_size)
    columns: list[tuple[str, Any]] = []
    for dec in decoders:
        value = block[dec.name]
        if dec.kind == "tensor":
            parts = value[lo:hi].split(batch_size)
            columns.append((dec.name, [x.clone() for x in parts] if copy else parts))
        else:
            columns.append((dec.name, [
                cut_batch(block, [dec], b, min(b + batch_size, hi), where, pool, threads)[dec.name] for b in starts
            ]))
    names = [n for n, _ in columns]
    return [dict(zip(names, parts)) for parts in zip(*(c for _, c in columns))]


def concat_batches(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One batch of the rows of ``parts`` in order (a batch that straddles two blocks)."""
    if len(parts) == 1:
        return parts[0]
    out: dict[str, Any] = {}
    for name, first in parts[0].items():
        if isinstance(first, torch.Tensor):
            out[name] = torch.cat([p[name] for p in parts])
        else:
            out[name] = [v for p in parts for v in p[name]]
    return out
