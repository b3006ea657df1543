"""One federated simulation on this machine: one virtual SuperNode per training source.

    python -m simulations.run                       # the default run (make run)
    python -m simulations.run experiment=smoke      # a 2-minute check
    python -m simulations.run strategy=fedavg rounds=20 data.heldout=[studio]
    python -m simulations.run resume=runs/<folder>  # continue a run from its checkpoint

A resumed run keeps its own `rounds` unless `rounds=N` is given (extending it). The config is
checked before the run folder is created: a run that cannot train fails at once, one line on
stderr and exit status 2 (`simulations.cli`). The last line printed is the run folder.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from deploy.flower_env import apply_flower_env

apply_flower_env()  # before Flower and Ray are imported
for _k, _v in {"RAY_DEDUP_LOGS": "0", "WANDB_SILENT": "true"}.items():
    os.environ.setdefault(_k, _v)

from omegaconf import DictConfig  # noqa: E402

from hdf.config import compose  # noqa: E402
from hdf.config.preflight import check_run  # noqa: E402
from hdf.data import build_sources, split_sources  # noqa: E402
from hdf.runfolder.folder import RunFolder, discarded_unless_trained  # noqa: E402
from server.app import make_server_app, open_run, resolve_resume  # noqa: E402
from simulations.cli import command  # noqa: E402
from simulations.ray_cluster import address_env, backend_config, cluster_address  # noqa: E402


def check_simulation(cfg: DictConfig) -> None:
    """What only the in-process simulation needs, on top of `check_run`."""
    if str(cfg.server.heldout_eval) != "server":
        raise ValueError(
            f"server.heldout_eval={cfg.server.heldout_eval}: in simulation the server scores "
            "held-out sources; keep server.heldout_eval=server"
        )
    cluster_address(cfg)  # a cluster that is not there stops the run here, not in Ray's wait


if TYPE_CHECKING:
    from flwr.clientapp import ClientApp


def simulate(cfg: DictConfig, run: RunFolder, client_app: ClientApp | None = None) -> None:
    """Run the federation of `cfg` in-process with Flower's simulation engine (`client_app`:
    the project's ClientApp unless another is given, e.g. a misbehaving one in tests)."""
    import warnings

    from flwr.simulation import run_simulation

    if client_app is None:
        from client.app import app as client_app

    check_simulation(cfg)
    train, _ = split_sources(build_sources(cfg.data), list(cfg.data.heldout), cfg.data.train)
    address = cluster_address(cfg)
    if address is not None:
        print(f"joining the Ray cluster at {address}", flush=True)
    with warnings.catch_warnings(), address_env(address):
        warnings.filterwarnings("ignore", message=".*run_simulation.*deprecated.*")
        run_simulation(
            server_app=make_server_app(cfg, run),
            client_app=client_app,
            num_supernodes=len(train),
            backend_config=backend_config(cfg, address),
        )
    if not run.done:
        raise RuntimeError(f"the federation did not finish; see the log above and {run.path}")


@command
def main(argv: list[str] | None = None) -> int:
    overrides = sys.argv[1:] if argv is None else argv
    cfg = resolve_resume(compose(overrides), overrides)
    check_run(cfg)
    check_simulation(cfg)
    run = open_run(cfg)
    print(f"run folder: {run.path}", flush=True)
    with discarded_unless_trained(run, fresh=not cfg.resume):
        simulate(cfg, run)
    print(run.path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
