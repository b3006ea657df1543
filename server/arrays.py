"""Zero-copy reads of Flower `Array`s (`Array.numpy()` copies every array through `np.load`,
which dominated aggregation and validation time for a 33M-parameter model), and a model record
packed into one Array plus its layout for the wire (`hdf.packing`), and back."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from hdf import contract as K
from hdf.packing import (
    ALIGN,
    WIRE_DTYPES,
    PackingError,
    layout_record,
    pack,
    read_layout,
    unpack,
)

_MAGIC = b"\x93NUMPY"
# Elements per block when streaming over views (128 KiB of float32): a block of a running sum
# or a difference stays in cache while the replies are read.
BLOCK = 1 << 15


def _expected_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The header dict `np.save` writes for a C-ordered array (numpy's own `repr` layout)."""
    return f"{{'descr': {dtype.str!r}, 'fortran_order': False, 'shape': {shape!r}, }}".encode()


def array_view(arr: Array) -> np.ndarray:
    """A read-only view of an Array's .npy bytes (a copy via `Array.numpy()` if not .npy).

    Fast path: the Array already carries dtype and shape, so the .npy header is only compared
    with the one `np.save` writes for them (parsing it with numpy's reader costs an `ast` parse
    per array: ~0.2 s per round for ten r3d_18 updates). Anything else (Fortran order, another
    header layout, a header that disagrees with the Array's fields) takes numpy's reader.
    """
    data = arr.data
    if not (isinstance(data, bytes | bytearray | memoryview) and bytes(data[:6]) == _MAGIC):
        return arr.numpy()
    try:
        dtype, shape = np.dtype(arr.dtype), tuple(int(s) for s in arr.shape)
    except TypeError:
        dtype, shape = None, ()
    if dtype is not None and not dtype.hasobject:
        major = data[6]
        size, start = (2, 10) if major == 1 else (4, 12)
        hlen = int.from_bytes(bytes(data[8 : 8 + size]), "little")
        count = math.prod(shape)
        expected = _expected_header(dtype, shape)
        if (
            start + hlen + count * dtype.itemsize == len(data)
            and bytes(data[start : start + len(expected)]) == expected
        ):
            return np.frombuffer(data, dtype=dtype, count=count, offset=start + hlen).reshape(shape)
    return _parsed_view(arr)


def _parsed_view(arr: Array) -> np.ndarray:
    """numpy's header reader, still without copying the data."""
    data = arr.data
    header = io.BytesIO(bytes(data[:4096]))
    version = np.lib.format.read_magic(header)
    if version in ((1, 0), (2, 0)):
        read = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        try:
            shape, fortran, dtype = read(header)
        except ValueError:  # header longer than the peeked bytes
            return arr.numpy()
        if not dtype.hasobject:
            count = int(np.prod(shape, dtype=np.int64))
            flat = np.frombuffer(data, dtype=dtype, count=count, offset=header.tell())
            return flat.reshape(shape, order="F" if fortran else "C")
    return arr.numpy()


# ---- packed transfer (hdf/packing.py) ---------------------------------------------------------
@dataclass(frozen=True)
class WireFormat:
    """How models travel: packed into one array (`pack`) and in which float precision
    (`dtype`, config `server.wire_pack`, `server.wire_dtype`)."""

    pack: bool = True
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in WIRE_DTYPES:
            raise ValueError(
                f"server.wire_dtype={self.dtype!r}; choose one of {', '.join(WIRE_DTYPES)}"
            )
        if self.dtype != "float32" and not self.pack:
            raise ValueError(
                f"server.wire_dtype={self.dtype} needs server.wire_pack=true (16-bit transfer "
                "is a packing option)"
            )


def pack_record(record: ArrayRecord, wire_dtype: str) -> tuple[ArrayRecord, ConfigRecord]:
    """(ARRAYS with the one packed array, LAYOUT) for a model record."""
    buffer, entries = pack({k: array_view(a) for k, a in record.items()}, wire_dtype)
    return ArrayRecord({K.PACKED: Array(buffer)}), ConfigRecord(layout_record(entries))


def unpack_record(
    arrays: ArrayRecord, layout: ConfigRecord, base: ArrayRecord | None
) -> ArrayRecord:
    """The model a packed reply carries, one Array per key. Float arrays of a `delta` reply
    are added to `base` (the model sent to that node). Raises PackingError with the reason;
    nothing larger than `base` (plus alignment) is read."""
    if list(arrays.keys()) != [K.PACKED]:
        raise PackingError(f"a packed {K.ARRAYS!r} record holds exactly one array {K.PACKED!r}")
    packed = arrays[K.PACKED]
    if packed.dtype != "uint8" or len(packed.shape) != 1:
        raise PackingError(f"packed array is {packed.dtype} {packed.shape}, not a 1-D uint8 one")
    if base is not None:
        limit = sum(array_view(a).nbytes + ALIGN for a in base.values())
        if packed.shape[0] > limit:
            raise PackingError(
                f"packed array of {packed.shape[0]} bytes is larger than the model sent "
                f"({limit} bytes with alignment)"
            )
    buffer = array_view(packed)
    entries, delta = read_layout(dict(layout), buffer.nbytes)
    values = unpack(buffer, entries)
    if delta:
        if base is None:
            raise PackingError("a delta reply needs the model it was trained from")
        for e in entries:
            if e.dtype != "float32":
                continue
            if e.name not in base:
                raise PackingError(f"delta for array {e.name!r}, which the model sent lacks")
            ref = array_view(base[e.name])
            if ref.shape != e.shape or ref.dtype != np.float32:
                raise PackingError(
                    f"delta for array {e.name!r} has shape {e.shape}, the model sent "
                    f"{ref.dtype} {ref.shape}"
                )
            values[e.name] = np.asarray(ref + values[e.name])  # 0-d: a scalar otherwise
    return ArrayRecord({k: Array(v) for k, v in values.items()})
