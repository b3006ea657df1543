"""Entry points (Hydra) and the config tree: runs, sweeps, baselines, reports."""
