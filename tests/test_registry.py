"""The one registry helper behind backbones, datasets, strategies and DRO modes."""

import pytest

from hdf.config import CONF_DIR, compose
from hdf.data import list_datasets
from hdf.models import list_backbones
from hdf.registry import Registry
from server.strategy import list_strategies
from server.strategy.dro_math import DRO_MODES


def _one() -> int:
    return 1


def _two() -> int:
    return 2


def test_register_lookup_and_names() -> None:
    reg: Registry = Registry("widget", "set widget.name=<name>")
    assert reg.register("b")(_one) is _one  # the decorator hands back what it decorates
    reg.add("a", _two)
    assert reg.names() == ["a", "b"]
    assert reg.lookup("b") is _one and reg["a"] is _two
    assert "a" in reg and "c" not in reg and len(reg) == 2


def test_a_taken_name_is_refused_and_the_first_kept() -> None:
    reg: Registry = Registry("widget", "")
    reg.add("a", _one)
    reg.add("a", _one)  # the same object again (a module imported twice) is no change
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.add("a", _two)
    assert reg.lookup("a") is _one


def test_an_unknown_name_lists_the_known_and_the_fix() -> None:
    reg: Registry = Registry("widget", "set widget.name=<name>")
    reg.add("b", _one)
    reg.add("a", _two)
    with pytest.raises(ValueError) as err:
        reg.lookup("c")
    assert str(err.value) == "unknown widget 'c'; known: a, b (set widget.name=<name>)"


def test_every_registry_is_filled() -> None:
    assert "tiny3d" in list_backbones() and "synthetic" in list_datasets()
    assert {"fedavg", "dro"} <= set(list_strategies())
    assert {"eg", "kl", "cvar", "afl", "drfa", "regret"} <= set(DRO_MODES)


def test_every_dro_mode_has_a_preset() -> None:
    """A mode is one function plus one preset (simulations/conf/strategy/): each registered
    mode is reachable by `strategy=<file>`, and each DRO preset names a registered mode."""
    files = sorted(p.stem for p in (CONF_DIR / "strategy").glob("*.yaml"))
    strategies = [compose([f"strategy={f}"]).strategy for f in files]
    modes = {s.dro.mode for s in strategies if s.name == "dro"}
    assert modes == set(DRO_MODES)
