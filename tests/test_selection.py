"""Model selection without peeking: the choice reads training-source validation numbers only."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping

import pytest
import torch

from hdf.runfolder.folder import RunFolder
from hdf.runfolder.report import write_report
from hdf.runfolder.selection import BEST_INFO_FILE, BEST_MODEL_FILE, BestModel, select_round


class Tripwire(Mapping):
    """Held-out numbers that fail the test if anything reads them."""

    def __getitem__(self, key):
        raise AssertionError("model selection read a held-out metric")

    def __iter__(self) -> Iterator:
        raise AssertionError("model selection read a held-out metric")

    def __len__(self) -> int:
        raise AssertionError("model selection read a held-out metric")


def _row(r: int, train: dict[str, float], heldout: float | None = None) -> dict:
    row = {"round": r, "train": {n: {"uar": u} for n, u in train.items()}}
    row["heldout"] = {"phone": {"uar": heldout}} if heldout is not None else Tripwire()
    return row


def test_selection_never_reads_heldout_metrics() -> None:
    """Round 2 has the best worst training source; round 1's held-out score is far higher and
    would win if it were read. A tripwire in place of the held-out numbers is never touched."""
    rows = [
        _row(0, {"a": 0.14, "b": 0.14}, heldout=0.14),
        _row(1, {"a": 0.60, "b": 0.20}, heldout=0.90),
        _row(2, {"a": 0.30, "b": 0.25}, heldout=0.10),
        _row(3, {"a": 0.50, "b": 0.22}, heldout=0.80),
    ]
    chosen = select_round(rows)
    assert chosen is not None and chosen.round == 2
    assert chosen.worst_train_uar == 0.25 and chosen.mean_train_uar == pytest.approx(0.275)
    assert select_round([{**r, "heldout": Tripwire()} for r in rows]) == chosen


def test_ties_go_to_the_higher_mean_then_the_later_round() -> None:
    rows = [
        _row(0, {"a": 1 / 7, "b": 1 / 7}),
        _row(1, {"a": 0.40, "b": 1 / 7}),
        _row(2, {"a": 0.30, "b": 1 / 7}),
        _row(3, {"a": 0.40, "b": 1 / 7}),
    ]
    assert select_round(rows).round == 3
    assert select_round(rows[:3]).round == 1
    assert select_round([{"round": 0, "train": {}, "heldout": Tripwire()}]) is None


def test_equal_scores_in_another_order_tie_and_the_later_round_wins() -> None:
    """The same five validation UARs (a smoke run's rounds 0 and 1) listed in the order the
    replies came: summed in that order their means differ in the last bit (0.15904761904761902 vs
    ...905), which picked round 0 or 1 by reply order. Equal numbers must tie."""
    uars = {"webcam": 1 / 6, "night_ir": 0.2, "cctv": 1 / 7, "studio": 1 / 7, "movie": 1 / 7}
    shuffled = {n: uars[n] for n in ("webcam", "studio", "cctv", "movie", "night_ir")}
    assert select_round([_row(0, uars), _row(1, shuffled)]).round == 1
    assert select_round([_row(0, shuffled), _row(1, uars)]).round == 1


def test_best_model_keeps_the_selected_round_and_resumes(tmp_path) -> None:
    best = BestModel(tmp_path, "config: yaml")
    rows = [
        _row(0, {"a": 0.1, "b": 0.1}),
        _row(1, {"a": 0.5, "b": 0.3}),
        _row(2, {"a": 0.6, "b": 0.2}),
    ]
    written = [best.offer(r, lambda r=r: {"w": torch.tensor(float(r["round"]))}) for r in rows]
    assert written == [True, True, False]
    saved = torch.load(tmp_path / BEST_MODEL_FILE, weights_only=False)
    assert saved["round"] == 1 and float(saved["model"]["w"]) == 1.0
    assert saved["config"] == "config: yaml"
    info = json.loads((tmp_path / BEST_INFO_FILE).read_text())
    assert info["round"] == 1 and info["worst_train_uar"] == 0.3 and "held-out" in info["criterion"]
    # a run that died after its round-3 checkpoint, before best.pt: resume rewrites it
    rows.append(_row(3, {"a": 0.5, "b": 0.4}))
    again = BestModel(tmp_path, "config: yaml")
    again.resume(rows, 3, {"w": torch.tensor(3.0)})
    saved = torch.load(tmp_path / BEST_MODEL_FILE, weights_only=False)
    assert saved["round"] == 3 and float(saved["model"]["w"]) == 3.0
    assert not again.offer(_row(4, {"a": 0.9, "b": 0.35}), lambda: {"w": torch.tensor(4.0)})


def test_report_shows_heldout_at_the_selected_and_the_last_round(tmp_path) -> None:
    run = RunFolder(tmp_path)
    for r, (a, b, h) in enumerate([(0.1, 0.1, 0.1), (0.5, 0.4, 0.3), (0.6, 0.2, 0.45)]):
        row = _row(r, {"a": a, "b": b}, heldout=h)
        row["lambda"] = {"a": 0.5, "b": 0.5}
        for v in [*row["train"].values(), *row["heldout"].values()]:
            v.update({"war": v["uar"], "loss": 1.0})
        row["seconds"] = 1.0
        run.append_metrics(row)
    text = write_report(run).read_text()
    assert "best.pt holds the model of round 1" in text
    assert "| selected | 1 | 40.0 | 45.0 | 30.0 |" in text
    assert "| last | 2 | 20.0 | 40.0 | 45.0 |" in text
