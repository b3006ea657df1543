"""deploy/flower_env.py is the one source of the Flower environment: the Makefile, the deployment
scripts and the SuperExec image must set the same values in their own syntax."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from deploy.flower_env import FLOWER_ENV, SUPERLINK_ENV, apply_flower_env

ROOT = Path(__file__).resolve().parents[1]
# Ray runs only in simulation (make run, make test); deployed processes never start it.
FLOWER_ONLY = {k: v for k, v in FLOWER_ENV.items() if k.startswith("FLWR_")}
SUPERLINK_ONLY = {k: v for k, v in SUPERLINK_ENV.items() if k.startswith("FLWR_")}


def _assignments(text: str) -> dict[str, str]:
    """Every KEY=value, KEY := value and KEY="${OTHER:-value}" the file makes (last one wins)."""
    out: dict[str, str] = {}
    pattern = r'\b([A-Z][A-Z0-9_]+)\s*:?=\s*"?(?:\$\{[A-Z][A-Z0-9_]*:-)?([^"\s}\\]+)'
    for key, value in re.findall(pattern, text):
        out[key] = value
    return out


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("Makefile", FLOWER_ENV),
        ("deploy/superlink.sh", SUPERLINK_ONLY),
        ("deploy/supernode.sh", FLOWER_ONLY),
        ("deploy/Dockerfile", FLOWER_ONLY),
    ],
)
def test_every_launcher_sets_the_flower_env(path: str, expected: dict[str, str]) -> None:
    found = _assignments((ROOT / path).read_text())
    assert {k: found.get(k) for k in expected} == expected, path


def test_apply_keeps_a_users_value() -> None:
    env = {"FLWR_TELEMETRY_ENABLED": "1"}
    apply_flower_env(env)
    assert env == {**FLOWER_ENV, "FLWR_TELEMETRY_ENABLED": "1"}
