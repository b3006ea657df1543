"""Server-side evaluation of the global model on held-out sources (simulation, or a server that
can read the held-out data); deployed runs use evaluation-only SuperNodes instead."""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord
from omegaconf import DictConfig

from hdf.adapt import check_methods, evaluate_adapted
from hdf.config import settings
from hdf.data import Source
from hdf.device import resolve_device
from hdf.evaluate import evaluate
from hdf.models import build_model
from hdf.npy import torch_state


class HeldoutEvaluator:
    """Scores arrays on every held-out source's test split; the model is built once.

    With `server.heldout_adapt` naming adaptation methods, `score` also scores each source after
    adapting the model on that source's own unlabeled test clips (`hdf.adapt`), as an
    evaluation-only site would.
    """

    def __init__(self, cfg: DictConfig, sources: list[Source]) -> None:
        self.sources = sources
        run = settings(cfg)
        self.device = resolve_device(run.device)
        self.batch_size = run.eval.batch_size
        self.precision = run.precision
        self.model = build_model(run.model, run.data.num_frames, run.data.size).to(self.device)
        self.methods = check_methods(run.server.heldout_adapt)
        self.adapt_settings = run.adapt

    def __call__(self, arrays: ArrayRecord) -> dict[str, dict[str, Any]]:
        if not self.sources:
            return {}
        self.model.load_state_dict(torch_state(arrays))
        out = {}
        for s in self.sources:
            stats = evaluate(
                self.model,
                s.split("test"),
                self.device,
                batch_size=self.batch_size,
                precision=self.precision,
            )
            out[s.name] = stats
        return out

    def adapted(self, arrays: ArrayRecord) -> dict[str, dict[str, dict[str, Any]]]:
        """{method: {source: stats}}: each source scored after adapting on its test clips."""
        if not self.sources or not self.methods:
            return {}
        self.model.load_state_dict(torch_state(arrays))
        return {
            m: {
                s.name: evaluate_adapted(
                    self.model,
                    s.split("test"),
                    m,
                    self.device,
                    self.adapt_settings,
                    batch_size=self.batch_size,
                    precision=self.precision,
                )
                for s in self.sources
            }
            for m in self.methods
        }

    def score(self, arrays: ArrayRecord) -> tuple[dict[str, Any], dict[str, Any]]:
        """(plain scores, adapted scores) of `arrays`: what one evaluation round records."""
        return self(arrays), self.adapted(arrays)
