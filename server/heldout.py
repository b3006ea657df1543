"""Server-side evaluation of the global model on held-out sources (simulation, or a server that
can read the held-out data); deployed runs use evaluation-only SuperNodes instead."""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord
from omegaconf import DictConfig

from hdf.data import Source
from hdf.device import resolve_device
from hdf.evaluate import evaluate
from hdf.models import build_model


class HeldoutEvaluator:
    """Scores arrays on every held-out source's test split; the model is built once."""

    def __init__(self, cfg: DictConfig, sources: list[Source]) -> None:
        self.sources = sources
        self.device = resolve_device(cfg.device)
        self.batch_size = int(cfg.eval.batch_size)
        self.precision = str(cfg.precision)
        self.model = build_model(cfg.model, cfg.data.num_frames, cfg.data.size).to(self.device)

    def __call__(self, arrays: ArrayRecord) -> dict[str, dict[str, Any]]:
        if not self.sources:
            return {}
        self.model.load_state_dict(arrays.to_torch_state_dict())
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
