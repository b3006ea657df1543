"""hdf.packing: one buffer plus a layout, checked by hand; 16-bit rounding; malformed layouts."""

import numpy as np
import pytest
import torch

from hdf import contract as K
from hdf.packing import (
    PackingError,
    from_bfloat16,
    layout_record,
    pack,
    read_layout,
    to_bfloat16,
    unpack,
)


def _state() -> dict[str, np.ndarray]:
    return {
        "w": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32),  # 16 bytes at 0
        "steps": np.array(7, np.int64),  # 8 bytes at 16
        "b": np.array([0.5], np.float32),  # 4 bytes at 24 -> 28 in all
    }


def test_pack_layout_by_hand_and_bit_exact_round_trip() -> None:
    buffer, entries = pack(_state())
    assert buffer.dtype == np.uint8 and buffer.shape == (28,)
    assert [(e.name, e.dtype, e.wire, e.shape, e.offset) for e in entries] == [
        ("w", "float32", "float32", (2, 2), 0),
        ("steps", "int64", "int64", (), 16),
        ("b", "float32", "float32", (1,), 24),
    ]
    assert buffer[16:24].view(np.int64)[0] == 7
    assert buffer[24:28].view(np.float32)[0] == 0.5
    record = layout_record(entries)
    assert record[K.LAYOUT_DIMS] == [2, 2, 1] and record[K.LAYOUT_NDIMS] == [2, 0, 1]
    read, delta = read_layout(record, buffer.nbytes)
    assert read == entries and delta is False
    out = unpack(buffer, read)
    for k, v in _state().items():
        assert out[k].dtype == v.dtype and out[k].tobytes() == v.tobytes()


def test_alignment_pads_after_a_two_byte_array() -> None:
    """A 3-element float16 array is 6 bytes; the next array starts at byte 8."""
    buffer, entries = pack({"h": np.ones(3, np.float16), "x": np.ones(1, np.float64)})
    assert [e.offset for e in entries] == [0, 8] and buffer.nbytes == 16


def test_bfloat16_rounds_to_nearest_even_by_hand() -> None:
    """bfloat16 keeps 7 mantissa bits: 1 + 2^-8 is halfway between 1 (0x3F80) and 1 + 2^-7
    (0x3F81) and rounds to the even 0x3F80; 1 + 3 * 2^-8 is halfway between 0x3F81 and 0x3F82
    and rounds to 0x3F82; NaN stays NaN; 65504 (float16's largest) rounds up to 65536."""
    x = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, -2.0, np.nan, np.inf, 65504.0], np.float32)
    bits = to_bfloat16(x)
    assert bits[:4].tolist() == [0x3F80, 0x3F80, 0x3F82, 0xC000]
    back = from_bfloat16(bits)
    assert np.isnan(back[4]) and back[5] == np.inf and back[6] == 65536.0


def test_bfloat16_matches_torch() -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(10_000) * 10.0 ** rng.integers(-8, 8, 10_000)).astype(np.float32)
    ours = from_bfloat16(to_bfloat16(x))
    theirs = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
    assert ours.tobytes() == theirs.tobytes()


@pytest.mark.parametrize("wire, rel", [("bfloat16", 2.0**-8), ("float16", 2.0**-11)])
def test_16_bit_round_trip_within_its_precision_and_integers_exact(wire, rel) -> None:
    rng = np.random.default_rng(1)
    state = {
        "w": rng.uniform(-4, 4, (64, 33)).astype(np.float32),
        "num_batches_tracked": np.array(123456789, np.int64),
    }
    buffer, entries = pack(state, wire)
    assert [e.wire for e in entries] == [wire, "int64"]
    assert buffer.nbytes == _aligned16(64 * 33 * 2) + 8
    out = unpack(buffer, read_layout(layout_record(entries), buffer.nbytes)[0])
    assert out["w"].dtype == np.float32
    err = np.abs(out["w"] - state["w"]) / np.abs(state["w"])
    assert err.max() <= rel and err.max() > rel / 8  # rounded, and not exact
    assert out["num_batches_tracked"].dtype == np.int64
    assert int(out["num_batches_tracked"]) == 123456789


def _aligned16(n: int) -> int:
    return -(-n // 8) * 8


def _bad(edit) -> str:
    buffer, entries = pack(_state())
    record = layout_record(entries)
    size = edit(record)
    with pytest.raises(PackingError) as err:
        read_layout(record, buffer.nbytes if size is None else size)
    return str(err.value)


def test_malformed_layouts_are_refused_with_the_reason() -> None:
    assert "buffer holds 36" in _bad(lambda r: 36)  # a buffer longer than the layout
    assert "past the 20-byte buffer" in _bad(lambda r: 20)  # shorter
    assert "unknown dtype 'object'" in _bad(lambda r: r[K.LAYOUT_DTYPES].__setitem__(0, "object"))
    assert "cannot travel as 'bfloat16'" in _bad(
        lambda r: r[K.LAYOUT_WIRE].__setitem__(1, "bfloat16")
    )
    assert "differ in length" in _bad(lambda r: r[K.LAYOUT_NAMES].pop())
    assert "repeats an array name" in _bad(lambda r: r[K.LAYOUT_NAMES].__setitem__(2, "w"))
    assert "negative dimension" in _bad(lambda r: r[K.LAYOUT_DIMS].__setitem__(0, -2))
    assert "not a list of integers" in _bad(lambda r: r.__setitem__(K.LAYOUT_DIMS, "2,2"))
    assert "do not sum to" in _bad(lambda r: r[K.LAYOUT_NDIMS].__setitem__(0, 3))
    assert "is not 0 or 1" in _bad(lambda r: r.__setitem__(K.LAYOUT_DELTA, 2))


def test_pack_refuses_an_unknown_wire_dtype() -> None:
    with pytest.raises(ValueError, match="wire dtype 'int8'"):
        pack(_state(), "int8")
