"""A model state as one byte buffer plus a small layout: how models cross the wire (issue 16).

Flower moves every array of a record as its own object (one request per array and hop), so a
139-tensor model cost ~140 requests per message. Packing the whole state into one contiguous
buffer makes it one object (Flower splits objects over 5 MiB into chunks on its own).

The layout lists, per array in order: name, dtype (what the array is), wire (how it travels)
and shape; offsets follow from them (each array starts at the next multiple of `ALIGN`), so a
layout that disagrees with its buffer is caught. Only float32 arrays may travel in 16 bits
(`WIRE_DTYPES`); integer buffers (BatchNorm's `num_batches_tracked`) and other dtypes always
travel exactly. With a 16-bit wire a reply carries `delta`s (trained - received): the
difference survives 16-bit rounding, whereas a whole weight near 1 rounds away any update below
bfloat16's spacing (2^-7). Pure numpy: shared by the ClientApp (torch) and the ServerApp.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from hdf import contract as K

WIRE_DTYPES = ("float32", "bfloat16", "float16")
# dtypes a packed array may have (numpy names); anything else is refused, never interpreted
DTYPES = ("float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")
ALIGN = 8  # every array starts at a multiple of this (aligned reads of float64 / int64)
MAX_ARRAYS = 100_000  # far above any model here (r3d_18 + DAM: a few hundred)
MAX_DIMS = 8


class PackingError(ValueError):
    """A packed message that cannot be read: its layout or buffer is malformed."""


@dataclass(frozen=True)
class Entry:
    """One array of a packed state."""

    name: str
    dtype: str
    wire: str
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        """Bytes on the wire."""
        return math.prod(self.shape) * _itemsize(self.wire)


def _itemsize(wire: str) -> int:
    return 2 if wire == "bfloat16" else np.dtype(wire).itemsize


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def wire_of(dtype: np.dtype, wire_dtype: str) -> str:
    """How an array of `dtype` travels: float32 in `wire_dtype`, anything else as it is."""
    return wire_dtype if dtype == np.float32 else dtype.name


def to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even, as torch does;
    NaN stays NaN (the plain rounding could carry a NaN's low payload into Inf)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    out = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(
        np.uint16
    )
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def from_bfloat16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 (exact)."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _encode(x: np.ndarray, wire: str) -> np.ndarray:
    if wire == "bfloat16":
        return to_bfloat16(x)
    return np.ascontiguousarray(x, dtype=np.dtype(wire))


def pack(
    arrays: Mapping[str, np.ndarray], wire_dtype: str = "float32"
) -> tuple[np.ndarray, list[Entry]]:
    """(one uint8 buffer, its layout) for `arrays`, float32 ones cast to `wire_dtype`."""
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"wire dtype {wire_dtype!r} is not one of {', '.join(WIRE_DTYPES)}")
    entries: list[Entry] = []
    offset = 0
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.dtype.name not in DTYPES:
            raise ValueError(f"array {name!r} has dtype {a.dtype}; packable: {', '.join(DTYPES)}")
        e = Entry(name, a.dtype.name, wire_of(a.dtype, wire_dtype), tuple(a.shape), offset)
        entries.append(e)
        offset = _aligned(offset + e.nbytes)
    size = entries[-1].offset + entries[-1].nbytes if entries else 0
    buffer = np.zeros(size, dtype=np.uint8)
    for e, a in zip(entries, arrays.values(), strict=True):
        buffer[e.offset : e.offset + e.nbytes] = (
            _encode(np.asarray(a), e.wire).reshape(-1).view(np.uint8)
        )
    return buffer, entries


def unpack(buffer: np.ndarray, entries: list[Entry]) -> dict[str, np.ndarray]:
    """The arrays of a packed state, each in its own dtype. Arrays that travel as they are
    come back as read-only views of `buffer` (no copy); 16-bit ones are widened to float32."""
    flat = np.asarray(buffer).reshape(-1).view(np.uint8)
    out: dict[str, np.ndarray] = {}
    for e in entries:
        raw = flat[e.offset : e.offset + e.nbytes]
        if e.wire == "bfloat16":
            a = from_bfloat16(raw.view(np.uint16))
        else:
            a = raw.view(np.dtype(e.wire)).astype(np.dtype(e.dtype), copy=False)
        out[e.name] = a.reshape(e.shape)
    return out


def float_delta(
    trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """trained - received for float arrays (what a 16-bit reply carries); others as trained."""
    return {
        k: (v - received[k] if np.asarray(v).dtype.kind == "f" else v) for k, v in trained.items()
    }


# ---- the layout as a record of flat lists (Flower's ConfigRecord holds no nested lists) ------
def layout_record(entries: list[Entry], delta: bool = False) -> dict[str, Any]:
    """The layout as contract keys -> flat lists (shapes flattened, `ndims` splits them)."""
    return {
        K.LAYOUT_NAMES: [e.name for e in entries],
        K.LAYOUT_DTYPES: [e.dtype for e in entries],
        K.LAYOUT_WIRE: [e.wire for e in entries],
        K.LAYOUT_NDIMS: [len(e.shape) for e in entries],
        K.LAYOUT_DIMS: [d for e in entries for d in e.shape],
        K.LAYOUT_DELTA: int(delta),
    }


def _int_list(record: Mapping[str, Any], key: str) -> list[int]:
    value = record.get(key)
    if not isinstance(value, list) or not all(
        isinstance(x, int) and not isinstance(x, bool) for x in value
    ):
        raise PackingError(f"layout {key!r} is not a list of integers")
    return value


def _str_list(record: Mapping[str, Any], key: str) -> list[str]:
    value = record.get(key)
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise PackingError(f"layout {key!r} is not a list of strings")
    return value


def read_layout(record: Mapping[str, Any], buffer_bytes: int) -> tuple[list[Entry], bool]:
    """(entries, delta) of an untrusted layout record for a buffer of `buffer_bytes`.

    Raises PackingError naming what is wrong: a missing or mistyped list, lists of different
    lengths, a repeated name, an unknown dtype or wire dtype, a 16-bit wire on a non-float32
    array, a negative dimension, or arrays whose total size is not the buffer's.
    """
    names = _str_list(record, K.LAYOUT_NAMES)
    dtypes = _str_list(record, K.LAYOUT_DTYPES)
    wires = _str_list(record, K.LAYOUT_WIRE)
    ndims = _int_list(record, K.LAYOUT_NDIMS)
    dims = _int_list(record, K.LAYOUT_DIMS)
    delta = record.get(K.LAYOUT_DELTA, 0)
    if delta not in (0, 1) or isinstance(delta, bool | float):
        raise PackingError(f"layout {K.LAYOUT_DELTA!r} = {delta!r} is not 0 or 1")
    if not len(names) == len(dtypes) == len(wires) == len(ndims):
        raise PackingError(
            f"layout lists differ in length: {len(names)} names, {len(dtypes)} dtypes, "
            f"{len(wires)} wire dtypes, {len(ndims)} ndims"
        )
    if len(names) > MAX_ARRAYS:
        raise PackingError(f"layout lists {len(names)} arrays (at most {MAX_ARRAYS})")
    if len(set(names)) != len(names):
        raise PackingError("layout repeats an array name")
    if any(not 0 <= n <= MAX_DIMS for n in ndims) or sum(ndims) != len(dims):
        raise PackingError(f"layout ndims (0..{MAX_DIMS} each) do not sum to its {len(dims)} dims")
    if any(d < 0 for d in dims):
        raise PackingError("layout has a negative dimension")
    entries: list[Entry] = []
    offset, at = 0, 0
    for name, dtype, wire, n in zip(names, dtypes, wires, ndims, strict=True):
        if dtype not in DTYPES:
            raise PackingError(f"array {name!r}: unknown dtype {dtype!r}")
        if wire != dtype and not (dtype == "float32" and wire in WIRE_DTYPES):
            raise PackingError(f"array {name!r}: dtype {dtype} cannot travel as {wire!r}")
        e = Entry(name, dtype, wire, tuple(dims[at : at + n]), offset)
        at += n
        if e.offset + e.nbytes > buffer_bytes:
            raise PackingError(
                f"array {name!r} ends at byte {e.offset + e.nbytes}, past the "
                f"{buffer_bytes}-byte buffer"
            )
        entries.append(e)
        offset = _aligned(e.offset + e.nbytes)
    end = entries[-1].offset + entries[-1].nbytes if entries else 0
    if end != buffer_bytes:
        raise PackingError(f"layout describes {end} bytes but the buffer holds {buffer_bytes}")
    return entries, bool(delta)
