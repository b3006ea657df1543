"""The config schema (hdf/config): every preset checked against its kind, one place per default,
typos and wrong types refused in one line before anything is built, old checkpoints still load."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

import hdf.config.tree as tree
from hdf.checkpoint import load_model
from hdf.config import ConfigError, compose, load, model_settings, settings, to_yaml
from hdf.config.schema import (
    DATA_KINDS,
    MODEL_KINDS,
    STRATEGY_KINDS,
    DROSettingsConfig,
    DSMConfig,
    LosoConfig,
    RunConfig,
    ServerOptConfig,
    SyntheticData,
    Tiny3DModel,
    TrainConfig,
)
from hdf.data import list_datasets
from hdf.losses.dsm import DSMLoss
from hdf.models import build_model
from server.strategy import list_strategies
from server.strategy.dro_math import DROSettings
from server.strategy.server_opt import ServerOptSettings
from simulations import run as run_cli
from simulations.loso import LOSO_DEFAULTS

CONF = tree.CONF_DIR
GROUPS = {"model": MODEL_KINDS, "data": DATA_KINDS, "strategy": STRATEGY_KINDS}
# What a preset that points at the user's files cannot compose without.
REQUIRED = {
    "data/dfew": ["data.root=/nowhere"],
    "data/ferv39k": ["data.root=/nowhere"],
    "data/manifest": ["data.manifest=/nowhere.csv"],
}
PRESETS = sorted(
    f"{p.parent.name}/{p.stem}" for g in (*GROUPS, "experiment") for p in (CONF / g).glob("*.yaml")
)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_against_its_schema(preset: str) -> None:
    """Each file of conf/ composes, and a group file is typed by its kind's schema class."""
    group, name = preset.split("/")
    cfg = compose([f"{group}={name}", *REQUIRED.get(preset, [])])
    assert OmegaConf.get_type(cfg) is RunConfig
    for g, kinds in GROUPS.items():
        node = cfg[g]
        kind = node.backbone if g == "model" else node.name
        assert OmegaConf.get_type(node) is kinds[kind], (preset, g)
    if group in GROUPS:  # the file names its kind (the DRO variants are the dro strategy)
        kind = cfg.model.backbone if group == "model" else cfg[group].name
        assert kind == name or (group == "strategy" and kind == "dro"), (preset, kind)


@pytest.mark.parametrize("preset", [p for p in PRESETS if not p.startswith("experiment/")])
def test_group_presets_restate_no_default(preset: str) -> None:
    """A model, data or strategy file sets only what differs from its schema class: every
    default lives in hdf/config/schema.py alone."""
    group, _ = preset.split("/")
    cfg = compose([f"{group}={preset.split('/')[1]}", *REQUIRED.get(preset, [])])
    default = OmegaConf.to_container(OmegaConf.structured(OmegaConf.get_type(cfg[group])))
    raw = yaml.safe_load((CONF / f"{preset}.yaml").read_text()) or {}
    raw.pop("defaults", None)

    def same(given: object, schema: object, key: str) -> list[str]:
        if isinstance(given, dict) and isinstance(schema, dict):
            return [k for sub, v in given.items() for k in same(v, schema.get(sub), f"{key}.{sub}")]
        return [key] if given == schema else []

    assert same(raw, default, group) == []


def test_registries_and_schemas_name_the_same_kinds() -> None:
    """A dataset or strategy without a schema cannot be configured; a schema without one is dead."""
    assert set(list_datasets()) == set(DATA_KINDS)
    assert set(list_strategies()) == set(STRATEGY_KINDS)


def test_defaults_are_single_sourced() -> None:
    """The code's settings objects take their defaults from the schema, and config.yaml adds none:
    the default run's dsm, train and server_opt sections are the schema's defaults."""
    loss = DSMLoss()
    assert {f.name: getattr(loss, f.name) for f in dataclasses.fields(DSMConfig)} == (
        dataclasses.asdict(DSMConfig())
    )
    assert (loss.alpha, loss.beta) == (10.0, 0.1)  # the values config.yaml documented
    assert dataclasses.asdict(ServerOptSettings()) == dataclasses.asdict(ServerOptConfig())
    common = {f.name for f in dataclasses.fields(DROSettings)}
    dro = dataclasses.asdict(DROSettingsConfig())
    assert dataclasses.asdict(DROSettings()) == {k: dro[k] for k in common}
    assert DROSettings().max_step == 0.1  # was 1.0 in the maths, 0.1 in the run config
    assert dataclasses.asdict(LosoConfig()) == LOSO_DEFAULTS
    run = settings(compose([]))
    assert run.dsm == DSMConfig() and run.train == TrainConfig()
    assert (run.train.warmup_frac, run.train.min_lr_ratio) == (0.0, 1.0)  # one lr per round
    assert isinstance(run.model, Tiny3DModel) and isinstance(run.data, SyntheticData)


@pytest.mark.parametrize(
    ("overrides", "expect"),
    [
        (["dsm.alhpa=1"], "unknown config key dsm.alhpa; did you mean dsm.alpha?"),
        (["+dsm.alhpa=1"], "unknown config key dsm.alhpa; did you mean dsm.alpha?"),
        (["+model.foo=1"], "unknown config key model.foo; known keys here: backbone, width"),
        (["model.dam.enabeld=false"], "did you mean model.dam.enabled?"),
        (["strategy=fedavg", "strategy.dro.eta=2"], "unknown config key strategy.dro;"),
        (["model=x3d_s", "model.depth=2"], "unknown config key model.depth; did you mean"),
        (["data.sclae=0.1"], "unknown config key data.sclae; did you mean data.scale?"),
        (["rounds=abc"], "rounds: Value 'abc' of type 'str' could not be converted to Integer"),
        (["sam.enabled=maybe"], "sam.enabled: Value 'maybe' is not a valid bool"),
        (["data.heldout=5"], "data.heldout: Invalid value assigned: int is not a ListConfig"),
        (["+strategy.dro.server_lr=0.5"], "strategy.dro.server_lr was replaced by server_opt.lr"),
        (["experiment=smok"], "Could not find 'experiment/smok'"),
    ],
)
def test_bad_key_or_type_is_one_line_and_exit_2(
    tmp_path: Path, capsys, overrides: list[str], expect: str
) -> None:
    """Refused by `compose`, before any data, model or run folder exists."""
    argv = ["experiment=tiny", f"output.root={tmp_path}/runs", *overrides]
    assert run_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expect in err, err
    assert not (tmp_path / "runs").exists()


def test_typo_inside_an_experiment_file_names_the_file_and_the_key(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "experiment" / "typo.yaml").write_text("# @package _global_\ndsm:\n  alhpa: 2.0\n")
    monkeypatch.setattr(tree, "CONF_DIR", conf)
    assert run_cli.main(["experiment=typo", f"output.root={tmp_path}/runs"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: unknown config key dsm.alhpa (in conf/experiment/typo.yaml); did you mean "
        "dsm.alpha?"
    )


def test_the_command_line_exits_2_with_one_line() -> None:
    """`python -m simulations.run dsm.alhpa=1` as a person types it."""
    env = {**os.environ, "HDF_DEBUG": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.run", "dsm.alhpa=1"],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "error: unknown config key dsm.alhpa; did you mean dsm.alpha?\n"


def test_a_received_run_config_is_checked() -> None:
    """A client checks the run config it receives like a person's: an unknown key names where."""
    text = to_yaml(compose(["experiment=tiny"])).replace("  rho: 0.05", "  rho: 0.05\n  rhoo: 1")
    with pytest.raises(ConfigError, match=r"sam\.rhoo \(the run config\); did you mean sam\.rho"):
        load(text, "the run config")


# ---- old checkpoints --------------------------------------------------------------------------
# The config a checkpoint carried before the schema existed (commit 66baab2, experiment=tiny):
# no train.threads, output.wandb_project or loso, and strategy.dro.server_lr from before server_opt.
OLD_CONFIG = {
    "model": {
        "backbone": "tiny3d",
        "width": 4,
        "depth": 1,
        "norm": "batch",
        "dropout": 0.1,
        "channels_last": False,
        "weights": "/gone/pretrained.pt",
        "dam": {"enabled": True, "temporal": True, "frequency": True, "stages": None},
    },
    "data": {
        "name": "synthetic",
        "root": ".cache/synthetic",
        "seed": 0,
        "num_frames": 4,
        "size": 32,
        "scale": 0.08,
        "sources": None,
        "heldout": ["phone"],
        "train": None,
    },
    "strategy": {
        "name": "dro",
        "fraction_train": 1.0,
        "min_train_replies": 1,
        "proximal_mu": 0.0,
        "local_norm": "stats",
        "dro": {"mode": "eg", "eta": 1.0, "eps": 0.1, "cap": 0.5, "server_lr": 1.0},
    },
    "name": "tiny",
    "seed": 0,
    "rounds": 2,
    "deterministic": False,
    "train": {"local_epochs": 2, "batch_size": 8, "lr": 0.004, "warmup_frac": 0.0},
    "dsm": {"alpha": 10.0, "beta": 0.1},
    "output": {"root": "runs", "wandb": "disabled"},
}


def test_an_old_checkpoint_still_loads(tmp_path: Path, caplog) -> None:
    """load_model rebuilds the model from the old config (its model keys are unchanged; the
    missing pretrained file is not needed); scoring it reads the config with the keys this
    version dropped left out and named, while a resumed run refuses them."""
    torch.manual_seed(0)
    src = build_model(model_settings({**OLD_CONFIG["model"], "weights": None}), 4, 32).eval()
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": src.state_dict(), "config": yaml.safe_dump(OLD_CONFIG), "round": 2}, path)
    model, cfg = load_model(path)
    x = torch.randn(2, 3, 4, 32, 32)
    torch.testing.assert_close(model(x)[0], src(x)[0], rtol=0, atol=0)
    assert cfg == OLD_CONFIG
    with caplog.at_level(logging.WARNING):
        read = load(cfg, str(path), drop_unknown=True)
    assert "strategy.dro.server_lr (now server_opt.lr)" in caplog.text
    assert read.train.threads is None and read.train.lr == 0.004  # missing: default; kept: kept
    with pytest.raises(ConfigError, match=r"strategy\.dro\.server_lr .*replaced by server_opt"):
        load(cfg, str(path))


def test_deterministic_switches_torch_to_deterministic_algorithms(tmp_path: Path) -> None:
    """`deterministic=true` reaches the process that trains (a site); false leaves torch alone."""
    from client import site
    from hdf.device import set_deterministic

    cfg = compose(["experiment=tiny", f"data.root={tmp_path}", "deterministic=true"])
    set_deterministic(False)  # an in-process deterministic run earlier in the session leaves it on
    torch.backends.cudnn.benchmark = False
    assert not torch.are_deterministic_algorithms_enabled()
    try:
        weights = build_model(model_settings(cfg.model), cfg.data.num_frames, cfg.data.size)
        site.get_site(to_yaml(cfg), {"partition-id": 0}, weights.state_dict())
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic
    finally:
        set_deterministic(False)
        torch.backends.cudnn.benchmark = False
        site._SITES.clear()


@pytest.mark.parametrize(
    ("overrides", "warned"),
    [
        (["train.keep_optimizer_state=true"], True),  # the default server step is 2
        (["train.keep_optimizer_state=true", "server_opt.lr=1.0"], False),
        (["train.keep_optimizer_state=true", "server_opt.name=adam", "server_opt.lr=0.01"], False),
        ([], False),
    ],
)
def test_kept_optimizer_state_with_a_long_server_step_is_warned(
    caplog, overrides: list[str], warned: bool
) -> None:
    """The one combination measured to collapse (kept AdamW moments, server step > 1) is named."""
    from hdf.config.preflight import check_config

    with caplog.at_level(logging.WARNING, logger="hdf.config.preflight"):
        check_config(compose(overrides))
    assert ("keep_optimizer_state=true with server_opt.lr" in caplog.text) is warned


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        (["train.fixed_norm_after=0.5"], None),
        (["train.fixed_norm_after=0"], None),
        (["train.fixed_norm_after=1.5"], "train.fixed_norm_after=1.5: must be a fraction"),
        (["train.fixed_norm_after=-0.1"], "must be a fraction of the rounds in [0, 1]"),
        (["train.fixed_norm_after=0.5", "strategy=fedbn"], "strategy.local_norm=all keeps"),
        (
            ["train.fixed_norm_after=0.5", "strategy.local_norm=stats"],
            "strategy.local_norm=stats keeps each site's own",
        ),
    ],
)
def test_fixed_norm_after_is_a_fraction_and_excludes_local_statistics(overrides, error) -> None:
    """FixBN trains every site with the mixed statistics: a fraction of the rounds, and not with
    a strategy that keeps each site's own statistics (the error names the key and the fix)."""
    from hdf.config.preflight import check_config

    if error is None:
        check_config(compose(overrides))
    else:
        with pytest.raises(ValueError, match=re.escape(error)):
            check_config(compose(overrides))


@pytest.mark.parametrize(
    ("value", "error"),
    [("0.5", None), ("0", None), ("1", "must be a fraction of the rounds in [0, 1)"),
     ("-0.1", "server.average_after=-0.1: must be a fraction")],
)  # fmt: skip
def test_average_after_is_a_fraction_that_leaves_a_round(value, error) -> None:
    """1 would average no round at all: refused, with the key and what the value means."""
    from hdf.config.preflight import check_config

    cfg = compose([f"server.average_after={value}"])
    if error is None:
        check_config(cfg)
    else:
        with pytest.raises(ValueError, match=re.escape(error)):
            check_config(cfg)
