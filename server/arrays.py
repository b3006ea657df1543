"""A model record packed into one Array plus its layout for the wire (`hdf.packing`), and
back; arrays are read in place (`hdf.npy.array_view`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from hdf import contract as K
from hdf.npy import array_view
from hdf.packing import (
    ALIGN,
    WIRE_DTYPES,
    PackingError,
    layout_record,
    pack,
    read_layout,
    unpack,
)

# Elements per block when streaming over views (128 KiB of float32): a block of a running sum
# or a difference stays in cache while the replies are read.
BLOCK = 1 << 15


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
