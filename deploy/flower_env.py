"""The environment every Flower process of this project runs with: the one Python source of it.

Used by the simulation command (`simulations.run`), the test rig (`testbed.cluster`), the
benchmarks and the tests. The Makefile, deploy/superlink.sh, deploy/supernode.sh and
deploy/Dockerfile set the same values in their own syntax; tests/test_flower_env.py holds them to
this table.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

FLOWER_ENV: dict[str, str] = {
    # the app's dependencies come with the project: Flower never pip-installs at run time
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # no usage reports and no update check: sites and CI machines may have no internet
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    # the SuperExec looks for a new ServerApp/ClientApp task every 0.1 s instead of Flower's 1 s
    # (flwr/supercore/superexec/run_superexec.py): up to 0.9 s less per deployed message
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
    # a ServerApp/ClientApp sends an array in chunks of this many bytes, one request per chunk at
    # every hop (flwr/app/message/array.py; Flower's default 5 MiB): 64 MiB carries an r3d_18
    # model (133 MB) in 2 chunks instead of 26. Safe: the HTTP APIs set no body limit, gRPC
    # allows 2 GiB, SQLite blobs 1 GB; a chunk costs up to ~3x its size in memory per request
    # (docs/deploy.md, "How fast a deployed round is")
    "FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE": "67108864",
    # Ray keeps today's behaviour for actors given 0 GPUs and stops warning about it on every start
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}

# The SuperLink's own SuperExec polls the SuperLink (over HTTPS, through its request handling) for
# a new run's ServerApp task, which then lives for the whole run: at 0.1 s these polls were 1,026
# of the SuperLink's 1,028 requests per r3d_18 round (bench_deploy, 3 sites). Flower's 1 s costs
# a run at most 0.9 s once, at its start. (The SuperNodes' SuperExecs poll their own SuperNode.)
SUPERLINK_ENV: dict[str, str] = {**FLOWER_ENV, "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "1.0"}


def apply_flower_env(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set every FLOWER_ENV variable the environment does not set already (a user's value wins)."""
    for key, value in FLOWER_ENV.items():
        environ.setdefault(key, value)
