"""Bad input to every command ends with one line on stderr and exit status 2, before anything runs.

Each case calls the command's `main` in process (no Ray is started: the checks run before the
simulation) and asserts the exit status, the one `error:` line naming the key or file, and that no
run folder was left behind.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hdf.runfolder.folder import RunFolder, discarded_unless_trained
from hdf.runfolder.report import format_row, write_report
from simulations import centralized, data, evaluate, export, loso, predict, prepare
from simulations import run as run_cli


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def _base(tmp_path: Path) -> list[str]:
    return ["experiment=tiny", f"data.root={tmp_path}/cache", f"output.root={tmp_path}/runs"]


def _no_run_folder(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())


@pytest.mark.parametrize(
    ("override", "expect"),
    [
        ("rounds=-1", "rounds=-1: must be a whole number >= 1"),
        ("rounds=0", "rounds=0: must be a whole number >= 1"),
        ("rounds=abc", "rounds: Value 'abc' of type 'str' could not be converted to Integer"),
        ("rounds=2.5", "rounds: Value '2.5' of type 'float' could not be converted"),
        ("train.local_epochs=0", "train.local_epochs=0.0: must be a positive number"),
        ("train.local_epochs=nan", "train.local_epochs=nan: must be a positive number"),
        ("train.lr=-1", "train.lr=-1.0: must be a positive number"),
        ("data.heldout=[mars]", "unknown source 'mars'"),
        ("data.train=[phone]", "no training source left"),
        ("server.heldout_eval=clients", "server.heldout_eval=clients"),
        ("nosuchkey=1", "unknown config key nosuchkey; known keys here: model, data,"),
        ("dsm.alhpa=1", "unknown config key dsm.alhpa; did you mean dsm.alpha?"),
        ("+model.foo=1", "unknown config key model.foo; known keys here: backbone, width"),
        ("sam.enabled=maybe", "sam.enabled: Value 'maybe' is not a valid bool"),
        ("model.norm=group", "model.norm=group has no BatchNorm statistics"),
    ],
)
def test_run_config_errors(tmp_path: Path, capsys, override: str, expect: str) -> None:
    assert run_cli.main([*_base(tmp_path), override]) == 2
    assert expect in _error(capsys)
    _no_run_folder(tmp_path)


def _manifest(tmp_path: Path, *, exist: bool) -> Path:
    """A manifest of 12 clips over two sources; the clip folders exist only when `exist`."""
    lines = ["path,label,source"]
    for i in range(12):
        lines.append(f"clips/c{i},{['happy', 'sad'][i % 2]},{['a', 'b'][i % 2]}")
        if exist:
            (tmp_path / "clips" / f"c{i}").mkdir(parents=True)
    path = tmp_path / "manifest.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_manifest_whose_clips_are_all_missing_fails_before_round_1(tmp_path: Path, capsys):
    m = _manifest(tmp_path, exist=False)
    argv = ["data=manifest", f"data.manifest={m}", "data.heldout=[b]"]
    argv.append(f"output.root={tmp_path}/runs")
    assert run_cli.main(argv) == 2
    err = _error(capsys)
    assert "source 'a' has no clips in its 'train' split: all" in err
    assert f"missing on disk (first: {tmp_path / 'clips'}" in err
    _no_run_folder(tmp_path)
    assert centralized.main(argv) == 2
    assert "missing on disk" in _error(capsys)
    _no_run_folder(tmp_path)


def test_every_command_reports_bad_files_in_one_line(tmp_path: Path, capsys) -> None:
    nowhere = tmp_path / "nowhere"
    cases = [
        (evaluate.main, [str(nowhere)], "nowhere: no such checkpoint file or run folder"),
        (export.main, [str(nowhere)], "nowhere: no such checkpoint file or run folder"),
        (predict.main, [str(nowhere), str(nowhere)], "no such video file or frame folder"),
        (prepare.main, [str(nowhere), str(tmp_path / "out")], "raw video folder"),
        (data.main, ["stats", "data=manifest", f"data.manifest={nowhere}.csv"], "nowhere.csv"),
        (data.main, ["frobnicate"], "unknown command 'frobnicate'"),
        (loso.main, [*_base(tmp_path), "rounds=0"], "rounds=0"),
        (run_cli.main, [f"resume={nowhere}"], "is not a run folder"),
        (centralized.main, [*_base(tmp_path), "rounds=-1"], "rounds=-1"),
    ]
    for main, argv, expect in cases:
        assert main(argv) == 2, (main.__module__, argv)
        assert expect in _error(capsys), (main.__module__, argv)
    _no_run_folder(tmp_path)


def test_debug_switch_shows_the_traceback(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HDF_DEBUG", "1")
    with pytest.raises(ValueError, match="rounds=0"):
        run_cli.main([*_base(tmp_path), "rounds=0"])


def test_resume_cannot_shrink_a_run(tmp_path: Path, capsys) -> None:
    run = RunFolder.create(tmp_path / "runs", "r")
    run.write_config("rounds: 5\n")
    run.save_checkpoint({"round": 1})
    assert run_cli.main([f"resume={run.path}", "rounds=3"]) == 2
    assert "resume can only extend" in _error(capsys)


def test_a_failed_fresh_run_leaves_no_folder(tmp_path: Path) -> None:
    """Removed when fresh and untrained; kept once a round finished or when resumed."""
    for fresh, rows, kept in [(True, [0], False), (True, [0, 1], True), (False, [0], True)]:
        run = RunFolder.create(tmp_path, "x")
        for r in rows:
            run.append_metrics({"round": r})
        with pytest.raises(RuntimeError), discarded_unless_trained(run, fresh=fresh):
            raise RuntimeError("boom")
        assert run.path.exists() == kept, (fresh, rows)


def test_report_survives_nan_in_the_series(tmp_path: Path) -> None:
    """NaN is stored as null (and may be read back as NaN): tables show '-', no crash."""
    nan = math.nan
    run = RunFolder.create(tmp_path, "nan")
    for r, uar in enumerate([0.5, nan, 0.6]):
        run.append_metrics(
            {
                "round": r,
                "lambda": {"a": nan, "b": 0.5},
                "train": {"a": {"uar": uar, "war": nan, "loss": nan}, "b": {"uar": 0.4}},
                "heldout": {"c": {"uar": nan, "war": 0.3}},
                "seconds": 1.0,
            }
        )
    rows = run.read_metrics()
    assert rows[1]["train"]["a"]["uar"] is None  # NaN became null
    text = write_report(run).read_text()
    assert "| a | - | 50.0 | 60.0 | - | - |" in text
    assert "Mean UAR 50.0, worst 40.0." in text
    clients = {"a": {"loss_before": nan}}
    row = {**rows[1], "replied": 2, "sent": 2, "rejected": [], "clients": clients}
    line = format_row(row, 2)
    assert "val UAR mean 0.400 worst 0.400 (b)" in line and "held-out c UAR -" in line
    assert "loss-before mean - max -" in line and "λmax 0.50 (b)" in line
    json.dumps(rows)  # still plain JSON


def test_a_training_source_without_a_node_is_an_error(tmp_path: Path, monkeypatch) -> None:
    """Simulation (nodes report their partitions): a training source nobody serves fails the run
    before round 1; in deployment a partial federation only warns, none at all fails."""
    from hdf.config import compose
    from server import federation as F

    cfg = compose([*_base(tmp_path), "data.sources=[studio,webcam,phone]", "data.heldout=[phone]"])

    class Grid:  # what Federation asks of Flower's Grid once discovery is patched
        def __init__(self) -> None:
            self.online: list[int] = []

        def get_node_ids(self) -> list[int]:
            return self.online

    grid = Grid()

    def nodes(partitions: int, sources: list[int]):
        found = {
            10 + s: {"source": s, "heldout": 0, "clips": 5, "partitions": partitions}
            for s in sources
        }
        grid.online = list(found)
        monkeypatch.setattr(F, "discover_nodes", lambda *a: (found, {}))

    run = RunFolder.create(tmp_path / "runs", "x")
    nodes(2, [0])
    with pytest.raises(ValueError, match=r"no node serves training source\(s\) \['webcam'\]"):
        F.Federation(grid, cfg, run)
    nodes(0, [])
    with pytest.raises(ValueError, match=r"\['studio', 'webcam'\], so the run cannot train"):
        F.Federation(grid, cfg, run)
    nodes(0, [0])  # deployment, one of two sites connected: it trains, the other may join later
    assert F.Federation(grid, cfg, run).strategy.node_source == {10: 0}
