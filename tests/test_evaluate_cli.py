"""`python -m simulations.evaluate` and `hdf.checkpoint`: a checkpoint reproduces the run's numbers.

The checkpoint and its metrics.jsonl row are written the way the server writes them
(`RunFolder.save_checkpoint`, `HeldoutEvaluator` + `summarize`), without a federated run; the
slow test compares with a real `simulations.run experiment=tiny`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from omegaconf import OmegaConf

from hdf.checkpoint import CheckpointError, CheckpointMismatchError, load_model
from hdf.config import compose, model_settings
from hdf.data import build_sources, split_sources
from hdf.evaluate import evaluate, summarize
from hdf.metrics import uar, war
from hdf.models import build_model
from hdf.runfolder.folder import RunFolder, rng_state
from server.heldout import HeldoutEvaluator
from simulations import evaluate as E

ROUND = 3


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache: Path) -> Path:
    """A run folder as the server leaves it after round 3: config, checkpoint, metrics row."""
    cfg = compose(
        [
            "experiment=tiny",
            f"data.root={cache}",
            "device=cpu",
            "server.heldout_adapt=[none,bn,tent]",
            "adapt.tent_steps=2",
        ]
    )
    torch.manual_seed(1)
    model = build_model(model_settings(cfg.model), cfg.data.num_frames, cfg.data.size)
    with torch.no_grad():  # a sharper head, so predictions differ between clips
        model.head.weight.mul_(30)
    run = RunFolder.create(tmp_path_factory.mktemp("runs"), "tiny")
    text = OmegaConf.to_yaml(cfg, resolve=True)
    run.write_config(text)
    state = {"round": ROUND, "model": model.state_dict(), "strategy": {}, "rng": rng_state()}
    run.save_checkpoint({**state, "config": text})
    _, held = split_sources(build_sources(cfg.data), list(cfg.data.heldout), cfg.data.get("train"))
    scored, adapted = HeldoutEvaluator(cfg, held).score(ArrayRecord(model.state_dict()))
    run.append_metrics(
        {
            "round": ROUND,
            "lambda": {},
            "train": {},
            "heldout": {n: summarize(s) for n, s in scored.items()},
            "heldout_adapted": {
                m: {n: summarize(s) for n, s in by.items()} for m, by in adapted.items()
            },
            "seconds": 0.0,
        }
    )
    return run.path


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_default_reproduces_the_runs_heldout_numbers(run_dir: Path, tmp_path: Path, capsys):
    """Prepare: a run folder. Execute: evaluate it. Assert: metrics.jsonl's held-out numbers."""
    out = tmp_path / "eval"
    assert E.main([str(run_dir), "--out", str(out)]) == 0
    summary = _last_json(capsys.readouterr().out)
    logged = RunFolder(run_dir).read_metrics()[-1]["heldout"]
    assert set(summary["per_source"]) == set(logged) == {"phone"}
    for name, v in logged.items():
        assert summary["per_source"][name]["uar"] == pytest.approx(v["uar"], abs=1e-12)
        assert summary["per_source"][name]["war"] == pytest.approx(v["war"], abs=1e-12)
    details = json.loads((out / "results.json").read_text())
    assert details["sources"]["phone"]["confusion"] == logged["phone"]["confusion"]
    assert details["round"] == ROUND
    report = (out / "report.md").read_text()
    assert "run's UAR" in report and (out / "confusion_phone.png").stat().st_size > 0


@pytest.mark.parametrize("method", ["bn", "tent"])
def test_adapt_reproduces_the_runs_adapted_heldout_numbers(
    method: str, run_dir: Path, tmp_path: Path, capsys
) -> None:
    """`--adapt bn|tent` on the run folder gives the numbers the server recorded for that method
    (`heldout_adapted`), which differ from the plain ones (the loss at least)."""
    out = tmp_path / "eval"
    assert E.main([str(run_dir), "--adapt", method, "--out", str(out)]) == 0
    summary = _last_json(capsys.readouterr().out)
    assert summary["adapt"] == method
    row = RunFolder(run_dir).read_metrics()[-1]
    logged, plain = row["heldout_adapted"][method], row["heldout"]
    assert set(summary["per_source"]) == set(logged) == {"phone"}
    details = json.loads((out / "results.json").read_text())
    for name, v in logged.items():
        assert summary["per_source"][name]["uar"] == pytest.approx(v["uar"], abs=1e-12)
        assert summary["per_source"][name]["war"] == pytest.approx(v["war"], abs=1e-12)
        assert details["sources"][name]["loss"] == pytest.approx(v["loss"], rel=1e-9)
        assert details["sources"][name]["confusion"] == v["confusion"]
        assert v["loss"] != pytest.approx(plain[name]["loss"], rel=1e-6)
    assert details["adapt_settings"]["tent_steps"] == 2
    assert "adapted on its unlabeled clips" in (out / "report.md").read_text()


def test_data_override_scores_every_listed_source(run_dir: Path, cache: Path, capsys) -> None:
    """`data.sources=[...]` on top of the checkpoint's data config, val split: equals
    hdf.evaluate.evaluate on the same splits; the top level pools all clips."""
    argv = [str(run_dir), "data.sources=[cctv,phone]", "--split", "val"]
    assert E.main(argv) == 0
    summary = _last_json(capsys.readouterr().out)
    assert list(summary["per_source"]) == ["cctv", "phone"]

    cfg = compose(["experiment=tiny", f"data.root={cache}", "data.sources=[cctv,phone]"])
    model, _ = load_model(run_dir)
    ys, preds = [], []
    for s in build_sources(cfg.data):
        stats = evaluate(model, s.split("val"), torch.device("cpu"))
        assert summary["per_source"][s.name]["uar"] == pytest.approx(stats["uar"], abs=1e-12)
        assert summary["per_source"][s.name]["war"] == pytest.approx(stats["war"], abs=1e-12)
        cm = np.asarray(stats["confusion"])
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ys += [i] * int(cm[i, j])
                preds += [j] * int(cm[i, j])
    assert summary["uar"] == pytest.approx(uar(np.array(ys), np.array(preds)), abs=1e-12)
    assert summary["war"] == pytest.approx(war(np.array(ys), np.array(preds)), abs=1e-12)
    assert (run_dir / next(p.name for p in run_dir.glob("eval-synthetic-val-*"))).is_dir()


def test_sources_flag_and_unknown_source(run_dir: Path, capsys) -> None:
    assert E.main([str(run_dir), "--sources", "studio", "--split", "val"]) == 0
    assert list(_last_json(capsys.readouterr().out)["per_source"]) == ["studio"]
    assert E.main([str(run_dir), "--sources", "mars"]) == 2
    assert "mars" in capsys.readouterr().err


def test_other_model_config_fails_naming_the_keys(run_dir: Path, capsys) -> None:
    """A model override that does not fit the weights names the differing config keys."""
    assert E.main([str(run_dir), "model.width=8"]) == 2
    out = capsys.readouterr().err
    assert out.count("\n") == 1
    assert "model.width: checkpoint 4, given 8" in out and "of another shape" in out
    with pytest.raises(CheckpointMismatchError, match=r"model\.dam\.enabled: checkpoint True"):
        cfg = dict(OmegaConf.to_container(compose(["experiment=tiny"]).model))
        load_model(run_dir, model_cfg={**cfg, "dam": {**cfg["dam"], "enabled": False}})


def test_bad_checkpoints_are_named(run_dir: Path, tmp_path: Path, capsys) -> None:
    bare = tmp_path / "bare.pt"
    torch.save(load_model(run_dir)[0].state_dict(), bare)
    with pytest.raises(CheckpointError, match=r"bare\.pt: not a run checkpoint"):
        load_model(bare)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 10)
    assert E.main([str(junk)]) == 2
    assert "junk.pt" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match=r"without checkpoint\.pt"):
        load_model(tmp_path)


@pytest.mark.slow
def test_reproduces_a_real_tiny_run(tmp_path: Path) -> None:
    """A real `simulations.run experiment=tiny` with AdaBN held-out scoring: evaluate gives its
    last held-out numbers, plain and with `--adapt bn`."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    common = [f"data.root={tmp_path}/cache", "device=cpu"]
    run = subprocess.run(
        [sys.executable, "-m", "simulations.run", "experiment=tiny", *common,
         f"output.root={tmp_path}/runs", "server.heldout_adapt=[none,bn]"],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    folder = Path(run.stdout.strip().splitlines()[-1])
    row = RunFolder(folder).read_metrics()[-1]
    for adapt, logged in [("none", row["heldout"]), ("bn", row["heldout_adapted"]["bn"])]:
        ev = subprocess.run(
            [sys.executable, "-m", "simulations.evaluate", str(folder), "device=cpu",
             "--adapt", adapt],
            capture_output=True, text=True, env=env, timeout=600,
        )  # fmt: skip
        assert ev.returncode == 0, ev.stdout[-3000:] + ev.stderr[-3000:]
        summary = _last_json(ev.stdout)
        assert logged and set(summary["per_source"]) == set(logged)
        for name, v in logged.items():
            assert summary["per_source"][name]["uar"] == pytest.approx(v["uar"], abs=1e-9)
            assert summary["per_source"][name]["war"] == pytest.approx(v["war"], abs=1e-9)
