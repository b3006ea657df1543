"""The pooled baseline scores its held-out sources after test-time adaptation as the federation
does, so federated and pooled models are compared with the same adaptation."""

import json

import pytest
import torch

from hdf.adapt import evaluate_adapted
from hdf.checkpoint import load_model
from hdf.config import compose, settings
from hdf.data import build_sources
from hdf.runfolder.folder import RunFolder
from simulations.centralized import train_centralized


def test_pooled_baseline_records_adapted_heldout_scores(tmp_path) -> None:
    """Round 0 (no training): the row's AdaBN score of phone equals evaluate_adapted of the
    round's model (best.pt holds it) on phone's test clips; the plain score is kept apart."""
    cfg = compose(
        [
            "experiment=tiny",
            "data.sources=[studio,webcam,phone]",
            "data.heldout=[phone]",
            f"data.root={tmp_path / 'cache'}",
            "rounds=0",
            "server.heldout_adapt=[none,bn]",
        ]
    )
    run = train_centralized(cfg, RunFolder.create(tmp_path / "runs", "c"))
    row = json.loads((run.path / "metrics.jsonl").read_text().splitlines()[0])
    assert set(row["heldout_adapted"]) == {"bn"}  # "none" is the plain `heldout` score
    logged = row["heldout_adapted"]["bn"]["phone"]
    model, _ = load_model(run.path / "best.pt")
    phone = next(s for s in build_sources(cfg.data) if s.name == "phone")
    stats = evaluate_adapted(
        model,
        phone.split("test"),
        "bn",
        torch.device("cpu"),
        settings(cfg).adapt,
        batch_size=int(cfg.eval.batch_size),
    )
    assert logged["loss"] == pytest.approx(stats["loss"], rel=1e-5)
    assert logged["uar"] == pytest.approx(stats["uar"])
    assert logged["loss"] != pytest.approx(row["heldout"]["phone"]["loss"], rel=1e-4)


def test_pooled_average_of_one_round_scores_as_that_round(tmp_path) -> None:
    """server.average_after=0.5 of 2 rounds averages round 2 alone: average.pt is round 2's
    model and average.json's scores are round 2's row, bit for bit (the same model scored the
    same way); with average_after=0 it averages rounds 1 and 2 and scores differently."""
    base = [
        "experiment=tiny",
        "data.sources=[studio,webcam,phone]",
        "data.heldout=[phone]",
        f"data.root={tmp_path / 'cache'}",
        "rounds=2",
        "server.heldout_adapt=[none]",
    ]
    one = train_centralized(
        compose([*base, "server.average_after=0.5"]), RunFolder.create(tmp_path / "runs", "one")
    )
    rows = [json.loads(x) for x in (one.path / "metrics.jsonl").read_text().splitlines()]
    avg = json.loads((one.path / "average.json").read_text())
    assert avg["average"] == {"first_round": 2, "last_round": 2, "models": 1}
    assert avg["train"] == rows[2]["train"] and avg["heldout"] == rows[2]["heldout"]
    two = train_centralized(
        compose([*base, "server.average_after=0"]), RunFolder.create(tmp_path / "runs", "two")
    )
    avg2 = json.loads((two.path / "average.json").read_text())
    assert avg2["average"] == {"first_round": 1, "last_round": 2, "models": 2}
    assert avg2["train"] != avg["train"]
    model, _ = load_model(two.path / "average.pt")
    assert isinstance(model, torch.nn.Module)
