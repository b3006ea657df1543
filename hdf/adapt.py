"""Test-time adaptation: a site adapts a received model on its own unlabeled clips before scoring.

- ``bn``, AdaBN (Li et al., "Revisiting Batch Normalization For Practical Domain Adaptation",
  ICLR-W 2017): every BatchNorm layer's running statistics are recomputed on the site's clips,
  a cumulative average over one pass (momentum None); no weight changes.
- ``tent``, TENT (Wang et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization",
  ICLR 2021): the normalisation layers' affine parameters (and nothing else) take `steps` Adam
  steps on the mean prediction entropy, BatchNorm normalising with each target batch's own
  statistics; the running statistics are then recomputed as in ``bn`` so that scoring (eval mode)
  uses target statistics of the adapted model.

Labels are never seen: `adapt` takes batches of uint8 clips only, and `unlabeled_batches` builds
them from a clip dataset by dropping each item's label before anything reads it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from hdf.config.schema import AdaptConfig
from hdf.device import autocast_context
from hdf.models.hdf_net import NORM_TYPES

METHODS = ("none", "bn", "tent")


def check_adapt(settings: AdaptConfig) -> AdaptConfig:
    """`settings` (the run's `adapt` section) if every count is >= 1 and the lr positive."""
    s = settings
    if s.batch_size < 1 or s.tent_steps < 1 or s.tent_lr <= 0 or s.stats_clips < 0:
        raise ValueError(
            f"adapt.batch_size={s.batch_size}, adapt.tent_steps={s.tent_steps}, "
            f"adapt.tent_lr={s.tent_lr}, adapt.stats_clips={s.stats_clips}: give a batch size "
            "and steps >= 1, a lr > 0 and a clip count >= 0 (0 = all)"
        )
    return s


def check_methods(methods: Iterable[str]) -> list[str]:
    """The adaptation methods named, each known; "none" (the plain score) is left out."""
    out = []
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown adaptation method {m!r}; use one of {list(METHODS)}")
        if m != "none" and m not in out:
            out.append(m)
    return out


class ClipsOnly(Dataset):
    """A clip dataset's clips, without their labels: item i is `dataset[i][0]`."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.dataset[i][0]


def unlabeled_batches(dataset: Dataset, batch_size: int) -> DataLoader:
    """Batches of uint8 clips B x T x C x H x W in dataset order (re-iterable, no labels)."""
    return DataLoader(ClipsOnly(dataset), batch_size=int(batch_size), shuffle=False)


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _affine_params(model: nn.Module) -> list[nn.Parameter]:
    """Weights and biases of every normalisation layer (BatchNorm, GroupNorm, LayerNorm)."""
    out = []
    for m in model.modules():
        if isinstance(m, NORM_TYPES):
            out += [
                p for p in (getattr(m, "weight", None), getattr(m, "bias", None)) if p is not None
            ]
    return out


def _logits(model: nn.Module, clips: torch.Tensor, device: torch.device, precision: str):
    with autocast_context(device, precision):
        logits, _ = model(model.preprocess(clips.to(device, non_blocking=True)))
    return logits.float()


@torch.no_grad()
def recompute_bn_stats(
    model: nn.Module, clips: Iterable[torch.Tensor], device: torch.device, precision: str = "auto"
) -> int:
    """AdaBN: reset every BatchNorm's running statistics and re-estimate them on `clips`.

    One pass with momentum None (PyTorch's cumulative average): the running mean and variance
    become the mean over batches of each batch's mean and unbiased variance. Only BatchNorm
    layers run in training mode (dropout stays off); parameters are not touched. Returns the
    number of clips seen.
    """
    norms = _batchnorms(model)
    if not norms:
        raise ValueError("the model has no BatchNorm layers: AdaBN has no statistics to recompute")
    was_training = model.training
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    seen = 0
    try:
        for batch in clips:
            _logits(model, batch, device, precision)
            seen += len(batch)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    if seen == 0:
        raise ValueError("no clips to adapt on: the site's split is empty")
    return seen


def tent(
    model: nn.Module,
    clips: Iterable[torch.Tensor],
    device: torch.device,
    *,
    steps: int,
    lr: float,
    precision: str = "auto",
) -> list[float]:
    """TENT: `steps` Adam steps on the mean prediction entropy, normalisation affine parameters
    only, BatchNorm on each batch's own statistics (running statistics frozen meanwhile, then
    recomputed on `clips`). Returns the entropy of each step's batch, before its update."""
    params = _affine_params(model)
    if not params:
        raise ValueError("the model has no normalisation layer with affine parameters: no TENT")
    norms = _batchnorms(model)
    grads = {p: p.requires_grad for p in model.parameters()}
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    model.eval()
    for m in norms:
        m.train()  # normalise with the batch's statistics ...
        m.momentum = 0.0  # ... and leave the running ones alone until the final pass
    opt = torch.optim.Adam(params, lr=lr)
    entropies: list[float] = []
    try:
        with torch.enable_grad():
            while len(entropies) < steps:
                before = len(entropies)
                for batch in clips:
                    logp = _logits(model, batch, device, precision).log_softmax(dim=1)
                    entropy = -(logp.exp() * logp).sum(dim=1).mean()
                    opt.zero_grad(set_to_none=True)
                    entropy.backward()
                    opt.step()
                    entropies.append(float(entropy.detach()))
                    if len(entropies) >= steps:
                        break
                if len(entropies) == before:
                    raise ValueError("no clips to adapt on: the site's split is empty")
    finally:
        for p, g in grads.items():
            p.requires_grad_(g)
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    if norms:
        recompute_bn_stats(model, clips, device, precision)
    return entropies


def adapt(
    model: nn.Module,
    clips: Iterable[torch.Tensor],
    method: str,
    device: torch.device,
    settings: AdaptConfig | None = None,
    *,
    precision: str = "auto",
) -> dict[str, Any]:
    """Adapt `model` in place on unlabeled `clips` (re-iterable uint8 batches, e.g.
    `unlabeled_batches`) with `method` ("none", "bn" or "tent"); returns what it did."""
    s = check_adapt(settings or AdaptConfig())
    device = torch.device(device)
    if method not in METHODS:
        raise ValueError(f"unknown adaptation method {method!r}; use one of {list(METHODS)}")
    if method == "none":
        return {"method": method}
    if method == "bn":
        return {"method": method, "clips": recompute_bn_stats(model, clips, device, precision)}
    entropies = tent(model, clips, device, steps=s.tent_steps, lr=s.tent_lr, precision=precision)
    return {
        "method": method,
        "steps": len(entropies),
        "entropy_first": entropies[0],
        "entropy_last": entropies[-1],
    }


def stats_sample(dataset: Dataset, clips: int, seed: int) -> Dataset:
    """A fixed sample of at most `clips` items of `dataset` (0: all of it), in dataset order:
    the same clips every round, so a site's re-estimated statistics change only with the
    weights."""
    n = len(dataset)  # type: ignore[arg-type]
    if clips == 0 or clips >= n:
        return dataset
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, sorted(order[:clips].tolist()))


def recompute_site_stats(
    model: nn.Module,
    train: Dataset,
    device: torch.device,
    settings: AdaptConfig,
    *,
    seed: int,
    precision: str = "auto",
) -> int:
    """Re-estimate `model`'s BatchNorm statistics on a site's own training clips (no labels):
    `strategy.local_norm=recompute`. The statistics a site kept from its last local model do
    not match the averaged weights it receives (averaging shifts every layer's activations), so
    it scores the received weights with statistics estimated for them. Returns the clips seen."""
    s = check_adapt(settings)
    sample = stats_sample(train, s.stats_clips, seed)
    return recompute_bn_stats(model, unlabeled_batches(sample, s.batch_size), device, precision)


def evaluate_adapted(
    model: nn.Module,
    dataset: Dataset,
    method: str,
    device: torch.device,
    settings: AdaptConfig | None = None,
    *,
    batch_size: int = 64,
    precision: str = "auto",
) -> dict[str, Any]:
    """`hdf.evaluate.evaluate` of `model` after adapting it with `method` on `dataset`'s clips.

    The adaptation sees only `unlabeled_batches(dataset)`; the labels are read afterwards, by the
    scoring. `model` is left as it was given (its state is restored after scoring), so a caller
    can score several methods from the same received weights.
    """
    from hdf.evaluate import evaluate

    s = check_adapt(settings or AdaptConfig())
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        adapt(
            model, unlabeled_batches(dataset, s.batch_size), method, device, s, precision=precision
        )
        return evaluate(model, dataset, device, batch_size=batch_size, precision=precision)
    finally:
        model.load_state_dict(saved)


__all__ = [
    "METHODS",
    "ClipsOnly",
    "adapt",
    "check_adapt",
    "check_methods",
    "evaluate_adapted",
    "recompute_bn_stats",
    "recompute_site_stats",
    "stats_sample",
    "tent",
    "unlabeled_batches",
]
