"""The ServerApp: compose the run's config, then run (or resume) the federation.

Under `flwr run .` the config comes from the run-config key `overrides` (Hydra overrides, the same
ones `python -m simulations.run` takes), so both entry points reach the same composed config.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig, OmegaConf

from server.federation import run_federation
from server.outputs import RunFolder
from server.report import write_report

app = ServerApp()


def open_run(cfg: DictConfig, run_dir: str = "") -> RunFolder:
    """The run folder: `cfg.resume` continues an existing one, else a new one is created."""
    if cfg.get("resume"):
        run = RunFolder(cfg.resume)
        run.read_config()  # fails clearly if it is not a run folder
        return run
    if run_dir:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        return RunFolder(run_dir)
    return RunFolder.create(cfg.output.root, str(cfg.name))


def resolve_resume(cfg: DictConfig) -> DictConfig:
    """A resumed run uses its saved config; only `rounds` may be raised to extend it."""
    if not cfg.get("resume"):
        return cfg
    saved = OmegaConf.create(RunFolder(cfg.resume).read_config())
    assert isinstance(saved, DictConfig)
    saved.rounds = max(int(saved.rounds), int(cfg.rounds))
    saved.resume = str(cfg.resume)
    return saved


def serve(grid: Grid, cfg: DictConfig, run: RunFolder) -> Path:
    """Run the federation into `run`, write its report, and return the folder."""
    if not cfg.get("resume"):
        run.write_config(OmegaConf.to_yaml(cfg, resolve=True))
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
    from simulations.config import compose, split_overrides

    cfg = resolve_resume(compose(split_overrides(str(context.run_config.get("overrides", "")))))
    run = open_run(cfg, str(context.run_config.get("run-dir", "")))
    print(f"run folder: {run.path.resolve()}", flush=True)
    serve(grid, cfg, run)
    print(run.path.resolve(), flush=True)
