"""Where a simulation's Ray runs: a fresh local Ray, or an existing Ray cluster it joins.

`simulation.ray_address` (else the `RAY_ADDRESS` environment variable) names the head node of a
running cluster as `host:port`, the address `ray start --head` prints. The engine then joins that
cluster and its virtual clients are spread over every node's CPUs and GPUs; without one it starts
Ray on this machine with all its cores. Ray refuses `num_cpus` when joining (a cluster's resources
are the nodes' own), so it is passed only to a local Ray. Per-client resources
(`simulation.num_cpus_per_client`, `num_gpus_per_client`) apply either way.

Ray waits without end for a head that is not there, so the address is checked first: a TCP
connection to it must open within a few seconds, else the run stops with one line naming the
address and the fix.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from omegaconf import DictConfig

ENV = "RAY_ADDRESS"
CONFIG_KEY = "simulation.ray_address"
LOCAL = ("", "local")  # Ray's own spellings of "start a new local Ray"
CONNECT_TIMEOUT_S = 5.0


def given_address(cfg: DictConfig) -> tuple[str | None, str]:
    """(the cluster address asked for, unchecked, or None for a local Ray; where it came from):
    the config key wins over the environment."""
    given = cfg.simulation.ray_address
    origin = CONFIG_KEY
    if given is None:
        given, origin = os.environ.get(ENV), ENV
    if given is None or str(given).strip() in LOCAL:
        return None, origin
    return str(given).strip(), origin


def cluster_address(cfg: DictConfig) -> str | None:
    """The checked `host:port` of the cluster to join, or None for a local Ray."""
    address, origin = given_address(cfg)
    if address is None:
        return None
    host, port = _split(address, origin)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        raise ValueError(
            f"{origin}={address}: no Ray cluster answers there ({err}); start its head with "
            f"`ray start --head --port={port}` on {host} (and `ray start --address={address}` on "
            f"each other machine), or unset {ENV} and {CONFIG_KEY} to run on this machine alone"
        ) from None
    return address


def _split(address: str, origin: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in address:
        raise ValueError(
            f"{origin}={address}: give the head node's host:port as `ray start --head` prints it "
            "(e.g. 10.0.0.5:6379); `auto` and ray:// client addresses are not supported"
        )
    return host.strip("[]"), int(port)


def backend_config(cfg: DictConfig, address: str | None) -> dict[str, Any]:
    """Flower's Ray backend config: per-client resources, and how Ray starts or is joined."""
    init_args: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": True}
    if address is None:
        init_args["num_cpus"] = os.cpu_count() or 1
    else:
        init_args["address"] = address
    return {
        "client_resources": {
            "num_cpus": float(cfg.simulation.num_cpus_per_client),
            "num_gpus": float(cfg.simulation.num_gpus_per_client),
        },
        "init_args": init_args,
    }


@contextmanager
def address_env(address: str | None) -> Iterator[None]:
    """`RAY_ADDRESS` set for the run only to the cluster joined (or to `local` if it named one
    but the config key says local): `ray.init` prefers the environment to its arguments."""
    before = os.environ.get(ENV)
    if address is not None or before:
        os.environ[ENV] = address or "local"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before
