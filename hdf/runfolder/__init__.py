"""A run's folder and what is made from it: files (`folder`), best-round selection (`selection`),
report.md and plots (`report`), wandb tracking (`tracking`).

Below the federation on purpose: the ServerApp, the pooled baseline, the sweeps and the command
lines all write or read run folders, and none of this needs Flower.
"""
