"""The average of a run's late models (hdf/runfolder/averaging.py): its arithmetic, the rounds
that enter it, and its checkpoint state."""

import pytest
import torch

from hdf.runfolder.averaging import ModelAverage, averaged_in_round


def _state(w: list[float], mean: float, batches: int) -> dict[str, torch.Tensor]:
    return {
        "conv.weight": torch.tensor(w, dtype=torch.float32),
        "bn.running_mean": torch.tensor([mean], dtype=torch.float32),
        "bn.num_batches_tracked": torch.tensor(batches),
    }


def test_running_mean_by_hand_and_integer_buffers_from_the_last_model() -> None:
    """Weights (1, 2), (3, 6), (8, 1) average to (4, 3); statistics 0, 3, 9 to 4; the batch
    counter is the last model's (30), not a mean; the caller's tensors stay as they were."""
    states = [_state([1, 2], 0, 10), _state([3, 6], 3, 20), _state([8, 1], 9, 30)]
    avg = ModelAverage()
    for r, s in zip((5, 6, 7), states, strict=True):
        avg.update(s, r)
    out = avg.state()
    torch.testing.assert_close(out["conv.weight"], torch.tensor([4.0, 3.0]))
    torch.testing.assert_close(out["bn.running_mean"], torch.tensor([4.0]))
    assert out["bn.num_batches_tracked"].item() == 30
    assert out["bn.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(states[0]["conv.weight"], torch.tensor([1.0, 2.0]))
    assert avg.info() == {"first_round": 5, "last_round": 7, "models": 3}
    out["conv.weight"] += 1  # a copy: the average itself is unchanged
    torch.testing.assert_close(avg.state()["conv.weight"], torch.tensor([4.0, 3.0]))


def test_state_dict_resumes_the_same_average_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(5, generator=g)} for _ in range(4)]
    full, part = ModelAverage(), ModelAverage()
    for r, s in enumerate(states[:2], start=1):
        full.update(s, r)
        part.update(s, r)
    resumed = ModelAverage()
    resumed.load_state_dict(part.state_dict())
    for r, s in enumerate(states[2:], start=3):
        full.update(s, r)
        resumed.update(s, r)
    assert torch.equal(full.state()["w"], resumed.state()["w"])
    assert resumed.info() == full.info() == {"first_round": 1, "last_round": 4, "models": 4}
    torch.testing.assert_close(full.state()["w"], torch.stack([s["w"] for s in states]).mean(0))


def test_a_model_with_other_tensors_is_refused() -> None:
    avg = ModelAverage()
    avg.update({"a": torch.zeros(2)}, 1)
    with pytest.raises(ValueError, match="round 2's model has other tensors"):
        avg.update({"b": torch.zeros(2)}, 2)


@pytest.mark.parametrize(
    ("after", "server_round", "rounds", "expected"),
    [(None, 10, 10, False), (0.5, 5, 10, False), (0.5, 6, 10, True), (0.0, 1, 2, True),
     (0.0, 0, 2, False), (0.75, 60, 80, False), (0.75, 61, 80, True)],
)  # fmt: skip
def test_rounds_after_the_fraction_enter_the_average(after, server_round, rounds, expected):
    assert averaged_in_round(after, server_round, rounds) is expected


def _resumed(after: float | None, rounds: int, state: dict | None, last: int) -> ModelAverage:
    """A Federation's average after `_restore_average` (nothing else of it is built)."""
    from omegaconf import OmegaConf

    from server.federation import Federation

    fed = object.__new__(Federation)
    fed.cfg = OmegaConf.create({"rounds": rounds, "server": {"average_after": after}})
    fed.average = ModelAverage()
    fed._restore_average(state, last)
    return fed.average


def test_a_resumed_run_continues_its_average_only_inside_its_window(caplog) -> None:
    """The checkpoint averaged rounds 3-4 of a 4-round run at 0.5. Resumed with the same window
    it continues; extended to 6 rounds (window 4-6, without round 3) or with averaging off, it
    starts again, with a warning naming the rounds it lacks."""
    saved = ModelAverage()
    for r in (3, 4):
        saved.update({"w": torch.full((2,), float(r))}, r)
    state = saved.state_dict()
    assert _resumed(0.5, 4, state, 4).info() == {"first_round": 3, "last_round": 4, "models": 2}
    assert not caplog.records
    extended = _resumed(0.5, 6, state, 4)  # window: rounds 4-6
    assert extended.count == 0
    assert "average starts again after round 4 and lacks rounds 4-4" in caplog.text
    caplog.clear()
    assert _resumed(None, 4, state, 4).count == 0  # averaging switched off
    assert "does not fit this run's window" in caplog.text
