"""A test run stopped with SIGTERM still tears its fixtures down (tests/conftest.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

HANGING_TEST = """
import time
import pytest

@pytest.fixture
def resource(tmp_path_factory):
    marker = {marker!r}
    yield
    open(marker, "w").write("torn down")

def test_hangs(resource):
    open({started!r}, "w").write("started")
    time.sleep(60)
"""


@pytest.mark.parametrize("with_conftest", [False, True])
def test_sigterm_runs_fixture_teardown(tmp_path: Path, with_conftest: bool) -> None:
    marker, started = tmp_path / "torn_down", tmp_path / "started"
    case = tmp_path / "case"
    case.mkdir()
    (case / "test_hang.py").write_text(
        HANGING_TEST.format(marker=str(marker), started=str(started))
    )
    if with_conftest:
        (case / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(case)],
        cwd=case,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    deadline = time.monotonic() + 60
    while not started.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert started.exists(), "the hanging test never started"
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    assert marker.exists() == with_conftest
