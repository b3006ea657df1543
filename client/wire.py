"""The model as a message carries it, for the ClientApp: packed (one array plus a layout,
`hdf.packing`) or one Array per key; a reply goes back in the format its message came in.

A 16-bit message is answered with 16-bit `delta`s (trained - received): the server adds them to
its own float32 model, so the site's training survives the rounding (docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from hdf import contract as K
from hdf.npy import array_view, torch_state
from hdf.packing import float_delta, layout_record, pack, read_layout, unpack


@dataclass
class Received:
    """A message's model: the state to load, and how to answer (None: unpacked)."""

    state: dict[str, torch.Tensor]
    wire: str | None = None
    arrays: dict[str, np.ndarray] | None = None  # the received values (16-bit deltas need them)


def received(content: RecordDict) -> Received:
    """The model in `content`; a malformed packed one raises PackingError (an error reply).

    The packed buffer is read in place (`array_view`); each array is copied once into its
    tensor (a 16-bit one only when widened, which already makes a new array)."""
    if K.LAYOUT not in content.config_records:
        return Received(torch_state(content[K.ARRAYS]))
    buffer = array_view(content[K.ARRAYS][K.PACKED])
    entries, _ = read_layout(dict(content[K.LAYOUT]), buffer.nbytes)
    arrays = unpack(buffer, entries)
    wire = next((e.wire for e in entries if e.dtype == "float32"), "float32")
    state = {
        k: torch.from_numpy(v if v.flags.writeable else np.array(v)) for k, v in arrays.items()
    }
    return Received(state, wire, arrays)


def reply_records(state: dict[str, torch.Tensor], got: Received) -> dict[str, object]:
    """The records a reply carries `state` in: as `got` came (packed, same wire), or plain."""
    if got.wire is None:
        return {K.ARRAYS: ArrayRecord(state)}
    arrays = {k: v.detach().cpu().numpy() for k, v in state.items()}
    delta = got.wire != "float32"
    if delta:
        assert got.arrays is not None
        arrays = float_delta(arrays, got.arrays)
    buffer, entries = pack(arrays, got.wire)
    return {
        K.ARRAYS: ArrayRecord({K.PACKED: Array(buffer)}),
        K.LAYOUT: ConfigRecord(layout_record(entries, delta)),
    }
