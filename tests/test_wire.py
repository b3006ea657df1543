"""Packed transfer through the strategy and the ClientApp's wire code (issue 16 item 1).

Mock sites answer each train message with client/wire.py, as the ClientApp does, after a fake
training step; the strategy packs, unpacks, validates and mixes as in a run.
"""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from client.wire import received, reply_records
from hdf import contract as K
from hdf.packing import layout_record, pack
from server.arrays import WireFormat
from server.strategy import DRO, DROSettings
from tests.fedmock import FakeGrid, arrays_record

NAMES = {0: "a", 1: "b", 2: "c"}


def _global() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "w": rng.standard_normal((8, 5)).astype(np.float32),
        "bn.running_var": rng.uniform(0.5, 2.0, 5).astype(np.float32),
        "bn.num_batches_tracked": np.array(12, np.int64),
        "dam.gate": np.array(0.75, np.float32),  # a 0-d float parameter (DAM's fusion weights)
    }


def _strategy(wire: WireFormat) -> DRO:
    s = DRO(
        train_sources=[0, 1, 2],
        source_names=NAMES,
        settings=DROSettings(eta=1.0, eps=0.1, cap=0.6),
        wire=wire,
    )
    for node, src in [(10, 0), (11, 1), (12, 2)]:
        s.register_node(node, src, heldout=False, clips=10 * (src + 1))
    return s


def _metrics(src: int, loss_before: float) -> MetricRecord:
    return MetricRecord(
        {
            K.NUM_EXAMPLES: 10 * (src + 1),
            K.SOURCE_INDEX: src,
            K.LOSS_BEFORE: loss_before,
            K.TRAIN_LOSS: 1.0,
        }
    )


def site_reply(msg: Message, server_round: int, scale: float = 1e-2) -> Message:
    """A site's train reply: the received model plus a seeded step (integers + 1), sent back
    by client.wire in the format the message came in."""
    src = msg.metadata.dst_node_id - 10
    got = received(msg.content)
    g = torch.Generator().manual_seed(100 * server_round + src)
    trained = {
        k: v + 1 if not v.is_floating_point() else v + scale * torch.randn(v.shape, generator=g)
        for k, v in got.state.items()
    }
    content = RecordDict({**reply_records(trained, got), K.METRICS: _metrics(src, 0.5 + src)})
    return Message(content=content, reply_to=msg)


def _run(wire: WireFormat, rounds: int = 3, scale: float = 1e-2):
    s = _strategy(wire)
    arrays = arrays_record(_global())
    grid = FakeGrid([10, 11, 12])
    for r in range(1, rounds + 1):
        msgs = list(s.configure_train(r, arrays, ConfigRecord({}), grid))
        kinds = {k for m in msgs for k in m.content.config_records}
        assert (K.LAYOUT in kinds) == wire.pack
        out = s.train_round(r, [site_reply(m, r, scale) for m in msgs])
        assert out.rejected == ()
        arrays = out.arrays
    return {k: a.numpy() for k, a in arrays.items()}, s.lam.copy()


@pytest.mark.parametrize("wire", ["float32", "bfloat16"])
def test_the_site_reads_a_packed_model_in_place_into_writable_tensors(wire, monkeypatch) -> None:
    """The packed buffer is read without `Array.numpy()` (np.load: 0.29 CPU s for r3d_18's
    133 MB); the tensors are the packed arrays (as 16-bit rounds them) and can be written."""
    state = _global()
    buffer, entries = pack(state, wire)
    content = RecordDict(
        {
            K.ARRAYS: ArrayRecord({K.PACKED: Array(buffer)}),
            K.LAYOUT: ConfigRecord(layout_record(entries)),
        }
    )
    monkeypatch.setattr(Array, "numpy", lambda self: pytest.fail("Array.numpy() was called"))
    got = received(content)
    for k, v in state.items():
        t = got.state[k]
        rounded = wire == "bfloat16" and v.dtype == np.float32
        want = torch.from_numpy(v).to(torch.bfloat16).float() if rounded else v
        assert t.dtype == torch.from_numpy(v).dtype and t.shape == v.shape
        assert t.numpy().tobytes() == np.asarray(want).tobytes(), k
        t.add_(1)  # a writable tensor of its own: the message's bytes stay as they came
    assert content[K.ARRAYS][K.PACKED].data[-len(buffer) :] == buffer.tobytes()


def test_packed_and_unpacked_transfer_give_the_same_model_bit_for_bit_and_lambdas() -> None:
    packed, lam_packed = _run(WireFormat(pack=True))
    plain, lam_plain = _run(WireFormat(pack=False))
    for k in plain:
        assert packed[k].dtype == plain[k].dtype and packed[k].tobytes() == plain[k].tobytes()
    assert lam_packed.tobytes() == lam_plain.tobytes()
    assert int(packed["bn.num_batches_tracked"]) == 12 + 3


@pytest.mark.parametrize("wire, rel", [("bfloat16", 2.0**-8), ("float16", 2.0**-11)])
def test_16_bit_transfer_keeps_small_updates_within_its_precision(wire, rel) -> None:
    """Steps of 1e-4 on weights near 1: a whole bfloat16 weight would round them away (spacing
    2^-7 at 1); 16-bit deltas keep each within its precision of the float32 transfer's."""
    exact, lam_exact = _run(WireFormat(), rounds=1, scale=1e-4)
    low, lam_low = _run(WireFormat(dtype=wire), rounds=1, scale=1e-4)
    g = _global()
    moved = np.abs(exact["w"] - g["w"])
    assert moved.max() > 1e-5
    assert np.abs(low["w"] - exact["w"]).max() <= rel * moved.max() * 2
    assert low["w"].dtype == np.float32
    assert int(low["bn.num_batches_tracked"]) == 13
    np.testing.assert_array_equal(lam_low, lam_exact)


def _packed_reply(node: int, arrays: dict[str, np.ndarray], edit=None) -> Message:
    buffer, entries = pack(arrays)
    layout = layout_record(entries)
    if edit is not None:
        buffer = edit(layout, buffer)
    msgs = list(
        _strategy(WireFormat()).messages(
            [node], arrays_record(_global()), ConfigRecord({}), "train"
        )
    )
    content = RecordDict(
        {
            K.ARRAYS: ArrayRecord({K.PACKED: Array(buffer)}),
            K.LAYOUT: ConfigRecord(layout),
            K.METRICS: _metrics(node - 10, 1.0),
        }
    )
    return Message(content=content, reply_to=msgs[0])


def _renamed(layout, buffer):
    layout[K.LAYOUT_NAMES][0] = "v"
    return buffer


def _reshaped(layout, buffer):
    layout[K.LAYOUT_DIMS][:2] = [5, 8]
    return buffer


def _unknown_dtype(layout, buffer):
    layout[K.LAYOUT_DTYPES][0] = "complex64"
    layout[K.LAYOUT_WIRE][0] = "complex64"
    return buffer


def _bigger(arrays):
    return {**arrays, "extra": np.zeros(10_000, np.float32)}


@pytest.mark.parametrize(
    "arrays_edit, edit, reason",
    [
        (None, lambda lay, b: b[:-8], "malformed packed arrays: array 'bn.num_batches_tracked'"),
        (None, lambda lay, b: np.concatenate([b, b[:8]]), "layout describes"),
        (None, _unknown_dtype, "unknown dtype 'complex64'"),
        (_bigger, None, "larger than the model sent"),
        (None, _renamed, "array keys differ from the global model's"),
        (None, _reshaped, "array 'w' has shape (5, 8), expected (8, 5)"),
    ],
)
def test_a_bad_packed_update_is_rejected_and_the_round_goes_on(arrays_edit, edit, reason) -> None:
    s = _strategy(WireFormat())
    s.current_arrays = arrays_record(_global())
    good = _global()
    bad = arrays_edit(good) if arrays_edit else good
    replies = [_packed_reply(10, bad, edit), _packed_reply(11, good)]
    out = s.train_round(1, replies)
    assert out.arrays is not None  # the good reply made the round
    assert [(r.node, r.kind) for r in out.rejected] == [(10, "train")]
    assert reason in out.rejected[0].reason
