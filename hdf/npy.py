"""Reads of the .npy bytes a Flower `Array` carries (its `data`) without `Array.numpy()`.

`Array.numpy()` goes through `np.load`, which copies the bytes, and slowly: 0.29 CPU s for one
r3d_18 model (133 MB) against 0.01 s for a copy of a view. `array_view` reads an array in
place (the ServerApp aggregates and validates over such views); `torch_state` gives a state
dict of writable tensors with one plain copy (what a model or a checkpoint loads).
Duck-typed over Flower's `Array` (`data`, `dtype`, `shape`, `numpy()`), so `hdf` never imports
Flower.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import Protocol

import numpy as np
import torch


class NpyArray(Protocol):
    """What is read of a Flower `Array`."""

    data: bytes
    dtype: str
    shape: tuple[int, ...]

    def numpy(self) -> np.ndarray: ...


_MAGIC = b"\x93NUMPY"


def _expected_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The header dict `np.save` writes for a C-ordered array (numpy's own `repr` layout)."""
    return f"{{'descr': {dtype.str!r}, 'fortran_order': False, 'shape': {shape!r}, }}".encode()


def array_view(arr: NpyArray) -> np.ndarray:
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


def _parsed_view(arr: NpyArray) -> np.ndarray:
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


def torch_state(record: Mapping[str, NpyArray]) -> dict[str, torch.Tensor]:
    """The record as a state dict, equal to Flower's `ArrayRecord.to_torch_state_dict()`
    bit for bit; each tensor is its own writable copy (the record's bytes stay untouched)."""
    return {k: torch.from_numpy(np.array(array_view(a))) for k, a in record.items()}
