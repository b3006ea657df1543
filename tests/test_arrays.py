"""Reads of Flower Arrays without `Array.numpy()` (`hdf.npy`) and the server's blocked
arithmetic built on them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from hdf.npy import array_view, torch_state
from server.arrays import BLOCK
from server.strategy.base import weighted_average
from server.validation import update_norms

CASES = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.array(2.5),  # 0-d
    np.arange(7, dtype=np.int64),
    np.arange(6, dtype=np.float16).reshape(1, 2, 3),
    np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),  # header says Fortran
    np.arange(5, dtype=">f4"),  # big-endian
    np.zeros((0, 3), dtype=np.float32),
    np.array([True, False]),
]


@pytest.mark.parametrize("value", CASES, ids=lambda v: f"{v.dtype.str}{v.shape}")
def test_view_equals_flowers_own_copy_and_shares_the_bytes(value: np.ndarray) -> None:
    arr = Array(value)
    view = array_view(arr)
    expected = arr.numpy()
    assert view.dtype == expected.dtype and view.shape == expected.shape
    np.testing.assert_array_equal(view, expected)
    if view.size:
        assert not view.flags.writeable  # a view of the message's bytes, not a copy


@pytest.mark.parametrize("value", CASES, ids=lambda v: f"{v.dtype.str}{v.shape}")
def test_torch_state_is_flowers_state_dict_bit_for_bit_in_writable_copies(value) -> None:
    """Same dtype, shape, strides' order and bytes as `to_torch_state_dict()`; writing to a
    tensor leaves the record's bytes as they were."""
    record = ArrayRecord({"a": Array(value)})
    before = bytes(bytearray(record["a"].data))  # a copy: bytes(b) would be b itself
    if not value.dtype.isnative:  # torch has no big-endian tensors: both refuse
        with pytest.raises(ValueError, match="byte order"):
            record.to_torch_state_dict()
        with pytest.raises(ValueError, match="byte order"):
            torch_state(record)
        return
    theirs = record.to_torch_state_dict()["a"]
    mine = torch_state(record)["a"]
    assert mine.dtype == theirs.dtype and mine.shape == theirs.shape
    assert mine.is_contiguous() == theirs.is_contiguous()
    assert mine.numpy().tobytes(order="A") == theirs.numpy().tobytes(order="A")
    if mine.numel():
        mine[(0,) * mine.dim()] = 1 if mine.dtype != torch.bool else False
    assert record["a"].data == before


def test_a_header_that_disagrees_with_the_array_fields_is_parsed() -> None:
    """Fields and bytes disagree (a hand-made Array): the bytes' own header decides."""
    arr = Array(np.arange(6, dtype=np.float32).reshape(2, 3))
    arr.shape = (3, 2)
    np.testing.assert_array_equal(array_view(arr), np.arange(6, dtype=np.float32).reshape(2, 3))


def _record(value: float, n: int, *, count: int = 0) -> ArrayRecord:
    return ArrayRecord(
        {
            "w": Array(np.full(n, value, dtype=np.float32)),
            "steps": Array(np.array(count, dtype=np.int64)),
        }
    )


def test_weighted_average_across_block_boundaries() -> None:
    """2 blocks and 5 elements: weights (1, 3) over values (1 + i/n, 5 - i/n) give
    (1 + i/n) / 4 + 3 (5 - i/n) / 4 = 4 - i / (2n) elementwise; integers round:
    (1 * 2 + 3 * 7) / 4 = 5.75 -> 6."""
    n = 2 * BLOCK + 5
    ramp = np.arange(n, dtype=np.float64) / n
    a = ArrayRecord({"w": Array((1 + ramp).astype(np.float32)), "k": Array(np.array(2))})
    b = ArrayRecord({"w": Array((5 - ramp).astype(np.float32)), "k": Array(np.array(7))})
    out = weighted_average([a, b], [1.0, 3.0])
    np.testing.assert_allclose(out["w"].numpy(), 4 - ramp / 2, rtol=1e-6)
    assert out["w"].numpy().dtype == np.float32 and int(out["k"].numpy()) == 6


def test_update_norms_across_blocks_and_non_finite() -> None:
    """||u - g|| over the float arrays only: 0.5 and 2 on 2 * BLOCK + 5 elements (int arrays
    ignored); a NaN in the second block makes that record's norm NaN and no other's."""
    n = 2 * BLOCK + 5
    bad = np.ones(n, dtype=np.float32)
    bad[BLOCK + 3] = np.nan
    records = [
        _record(1.5, n, count=9),
        ArrayRecord({"w": Array(bad), "steps": Array(np.array(0))}),
        _record(3.0, n),
    ]
    norms = update_norms(records, _record(1.0, n))
    assert norms[0] == pytest.approx(0.5 * math.sqrt(n), rel=1e-6)
    assert math.isnan(norms[1])
    assert norms[2] == pytest.approx(2 * math.sqrt(n), rel=1e-6)
    assert update_norms([_record(0.5, 4), _record(1.5, n)], None) == pytest.approx(
        [1.0, 1.5 * math.sqrt(n)]
    )
    assert update_norms([], None) == []
