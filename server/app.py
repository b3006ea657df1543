"""The ServerApp: compose the run's config, then run (or resume) the federation.

Under `flwr run .` the config comes from the run-config key `overrides` (Hydra overrides, the same
ones `python -m simulations.run` takes), so both entry points reach the same composed config.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig, OmegaConf

from hdf.config import load
from hdf.runfolder.folder import RunFolder, discarded_unless_trained
from hdf.runfolder.report import write_report
from server.federation import run_federation

app = ServerApp()


def open_run(cfg: DictConfig, run_dir: str = "") -> RunFolder:
    """The run folder: `cfg.resume` continues an existing one, else a new one is created."""
    if cfg.resume:
        run = RunFolder(cfg.resume)
        run.read_config()  # fails clearly if it is not a run folder
        return run
    if run_dir:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        return RunFolder(run_dir)
    return RunFolder.create(cfg.output.root, str(cfg.name))


def rounds_given(overrides: Sequence[str]) -> bool:
    """Whether the command line sets `rounds` itself (``rounds=N``, ``+rounds=N``, ...)."""
    return any(o.split("=", 1)[0].lstrip("+~") == "rounds" for o in overrides)


def resolve_resume(cfg: DictConfig, overrides: Sequence[str] = ()) -> DictConfig:
    """A resumed run uses its saved config, its own `rounds` included.

    Only an explicit ``rounds=N`` among `overrides` changes it, and only upwards (extending the run;
    its lr schedule then follows the new length); config.yaml is rewritten to match by `serve`.
    """
    if not cfg.resume:
        return cfg
    folder = RunFolder(cfg.resume)
    saved = load(folder.read_config(), f"{folder.path}/config.yaml")
    folder.load_checkpoint()  # a refused or unreadable checkpoint fails now, before anything starts
    if rounds_given(overrides):
        given = cfg.rounds
        if isinstance(given, bool) or not isinstance(given, int) or given < int(saved.rounds):
            raise ValueError(
                f"rounds={given!r}: resume can only extend {cfg.resume}, which has "
                f"rounds={saved.rounds}; give rounds>={saved.rounds} or drop rounds= to finish it"
            )
        saved.rounds = given
    saved.resume = str(cfg.resume)
    return saved


def run_config_yaml(cfg: DictConfig) -> str:
    """config.yaml: the resolved config; `resume` is not part of it (the folder is the run)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    plain["resume"] = None
    return OmegaConf.to_yaml(OmegaConf.create(plain))


def serve(grid: Grid, cfg: DictConfig, run: RunFolder) -> Path:
    """Run the federation into `run`, write its report, and return the folder."""
    run.write_config(run_config_yaml(cfg))  # a resumed run's too: it may have been extended
    run_federation(grid, cfg, run)
    write_report(run)
    return run.path


def make_server_app(cfg: DictConfig, run: RunFolder) -> ServerApp:
    """A ServerApp bound to an already composed config (the in-process simulation)."""
    bound = ServerApp()

    @bound.main()
    def _main(grid: Grid, context: Context) -> None:
        serve(grid, cfg, run)

    return bound


@app.main()
def main(grid: Grid, context: Context) -> None:
    """`flwr run .` entry: compose from the `overrides` run-config key and serve."""
    from hdf.config import compose, split_overrides
    from hdf.config.preflight import check_config

    overrides = split_overrides(str(context.run_config.get("overrides", "")))
    cfg = resolve_resume(compose(overrides), overrides)
    check_config(cfg)
    run_dir = str(context.run_config.get("run-dir", ""))
    run = open_run(cfg, run_dir)
    print(f"run folder: {run.path.resolve()}", flush=True)
    with discarded_unless_trained(run, fresh=not cfg.resume and not run_dir):
        serve(grid, cfg, run)
    print(run.path.resolve(), flush=True)
