"""The Flower ServerApp: source-aware strategies (DRO family, baselines), held-out evaluation,
update validation, checkpoint and resume."""
