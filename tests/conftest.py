"""Session-wide test settings.

A test run stopped with SIGTERM (`timeout`, a CI limit, `kill`) would otherwise die without
running any fixture's teardown, leaving the deployment tests' SuperLinks, SuperNodes, network
namespaces and podman containers running, and loading every later run on the machine. SIGTERM is
turned into KeyboardInterrupt, which pytest answers by finalising every fixture before it exits.
"""

from __future__ import annotations

import signal
from types import FrameType


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}: tearing down fixtures before exiting")


def pytest_configure() -> None:
    signal.signal(signal.SIGTERM, _interrupt)
