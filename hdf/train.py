"""Local training with DSM and SAM (docs/hdf_method.md §R4-R5) and the DRO `loss-before` probe.

One call of `train_local` is one client's work in one federated round (or one epoch block of the
centralized baseline): AdamW (or SGD + momentum) wrapped in SAM, a per-step warm-up + cosine
schedule, DSM with g from SAM's first pass, optional FedProx term, training-batch augmentation,
mixed precision. The optimiser is built each call; with `train.keep_optimizer_state` its
per-parameter state is returned and may be passed to the next call (`hdf.optim.base`).
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from collections.abc import Mapping
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from hdf.config.schema import RunConfig
from hdf.data.source import ConcatClipDataset, PartBatchSampler
from hdf.device import autocast_context, autocast_dtype
from hdf.evaluate import predict
from hdf.host_memory import keep_freed_memory
from hdf.losses.dsm import DSMLoss
from hdf.metrics import balanced_cross_entropy, uar, war
from hdf.optim.base import build_optimizer, export_state, import_state
from hdf.optim.sam import SAM
from hdf.optim.schedule import cosine_with_warmup


def augment_batch(x: torch.Tensor, generator: torch.Generator, max_shift: int) -> torch.Tensor:
    """Random horizontal flip and a +-max_shift pixel translation per clip of x (B x C x T x H x W).

    The same flip and shift apply to every frame of a clip; borders are filled by replication.
    Shift, replicate padding and flip are all one re-indexing of each clip's pixels (row
    clamp(i + dy), column clamp(j + dx), the column mirrored for a flipped clip), so they are
    applied as a single gather: one pass over x instead of pad, crop, stack and a masked flip.
    """
    b, c, t, h, w = x.shape
    flip = torch.rand(b, generator=generator) < 0.5
    shifts = torch.randint(-max_shift, max_shift + 1, (b, 2), generator=generator)
    if not bool(flip.any()) and not bool(shifts.any()):
        return x
    cols = torch.arange(w)
    cols = torch.where(flip[:, None], w - 1 - cols, cols)  # B x W: output column -> shifted one
    cols = (cols + shifts[:, 1:]).clamp_(0, w - 1)
    rows = (torch.arange(h) + shifts[:, :1]).clamp_(0, h - 1)  # B x H
    index = (rows[:, :, None] * w + cols[:, None, :]).reshape(b, 1, h * w).to(x.device)
    out = x.reshape(b, c * t, h * w).gather(2, index.expand(b, c * t, h * w))
    fmt = (
        torch.channels_last_3d
        if x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
        else torch.contiguous_format
    )
    return out.reshape(b, c, t, h, w).contiguous(memory_format=fmt)


class _FrozenNormStats:
    """Context: BatchNorm running statistics are not updated (SAM's second, perturbed pass)."""

    def __init__(self, model: nn.Module) -> None:
        self.norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.saved: list[float | None] = []

    def __enter__(self) -> None:
        self.saved = [m.momentum for m in self.norms]
        for m in self.norms:
            m.momentum = 0.0

    def __exit__(self, *exc: object) -> None:
        for m, momentum in zip(self.norms, self.saved, strict=True):
            m.momentum = momentum


class _Objective:
    """The training loss of one batch: forward pass, DSM, and the FedProx term if mu > 0.

    Both SAM passes evaluate it: the first at the current weights (its loss and predictions are
    the ones reported), the second at the perturbed weights with this batch's g and the
    BatchNorm statistics frozen.
    """

    def __init__(
        self, model: nn.Module, loss_fn: DSMLoss, device: torch.device, precision: str, mu: float
    ) -> None:
        self.model, self.loss_fn, self.device, self.precision = model, loss_fn, device, precision
        self.mu = float(mu)
        # FedProx anchor: the received weights
        self.anchor = [p.detach().float().clone() for p in model.parameters() if p.requires_grad]
        self.norm_frozen = _FrozenNormStats(model)

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, grad_norm: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """(logits, loss, parts) at the current weights; ``parts["total"]`` is DSM's alone."""
        with autocast_context(self.device, self.precision):
            logits, features = self.model(x)
        loss, parts = self.loss_fn(logits, features, y, grad_norm=grad_norm)
        if self.mu > 0:
            params = [p for p in self.model.parameters() if p.requires_grad]
            sq = sum(
                (p.float() - a).square().sum() for p, a in zip(params, self.anchor, strict=True)
            )
            prox = 0.5 * self.mu * sq  # (mu / 2) ||w - w_global||^2
            loss = loss + prox
            parts["prox"] = float(prox.detach())
        return logits, loss, parts

    def perturbed(self, x: torch.Tensor, y: torch.Tensor, grad_norm: float) -> torch.Tensor:
        """SAM's second-pass loss: running statistics untouched, DSM balanced by this g."""
        with self.norm_frozen:
            return self(x, y, grad_norm)[1]


def train_local(
    model: nn.Module,
    dataset: Dataset,
    cfg: RunConfig,
    device: torch.device,
    *,
    epochs: float,
    lr: float,
    seed: int,
    proximal_mu: float = 0.0,
    progress: bool = False,
    optimizer_state: Mapping[str, torch.Tensor] | None = None,
    fixed_norm: bool = False,
) -> dict[str, Any]:
    """Train ``model`` in place for ``epochs`` passes over ``dataset`` with DSM + SAM(AdamW).

    A fractional ``epochs`` takes ``round(epochs * batches per pass)`` steps (at least one); the
    last pass stops early, on a prefix of that pass's shuffled order (a fresh order per ``seed``).

    `cfg` gives the run's ``train``, ``dsm`` and ``sam`` settings and ``precision``.

    Returns means over the training steps of the first-pass (unperturbed) loss and its parts,
    UAR/WAR of the first-pass training predictions, the mean SAM gradient norm g, the number of
    examples and of steps, and the steps skipped for a non-finite loss or gradient. With
    ``train.keep_optimizer_state`` it also returns ``optimizer_state``: the base optimiser's
    per-parameter state after the last step (SAM keeps none of its own), which a later call
    continues from when given as ``optimizer_state`` (`OptimizerStateError`, before any step,
    if it does not fit the model).

    ``fixed_norm`` (FixBN): every BatchNorm layer normalises with its running statistics, which
    stay as they are; its affine parameters still train.
    """
    device = torch.device(device)
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("cannot train on an empty dataset")
    keep_freed_memory()  # no page faults for re-allocating each step's tensors (hdf/host_memory.py)
    if not (math.isfinite(epochs) and epochs > 0):
        raise ValueError(f"epochs must be a positive number (0.5 is half a pass), got {epochs}")
    train = cfg.train
    precision = cfg.precision
    amp_dtype = autocast_dtype(device, precision)
    rho = cfg.sam.rho if cfg.sam.enabled else 0.0

    gen = torch.Generator().manual_seed(int(seed))
    common = {"num_workers": train.num_workers, "pin_memory": device.type == "cuda"}
    if train.source_batches and isinstance(dataset, ConcatClipDataset):
        batches = PartBatchSampler(dataset, train.batch_size, gen)
        loader = DataLoader(dataset, batch_sampler=batches, **common)
    else:
        loader = DataLoader(
            dataset,
            batch_size=train.batch_size,
            shuffle=True,
            generator=gen,
            drop_last=False,
            **common,
        )
    steps_total = max(1, round(epochs * len(loader)))
    passes = math.ceil(steps_total / len(loader))
    base = build_optimizer(
        model,
        train.optimizer,
        lr,
        weight_decay=train.weight_decay,
        momentum=train.momentum,
    )
    if optimizer_state:
        import_state(base, model, optimizer_state)
    sam = SAM(model.parameters(), base, rho)
    sched = cosine_with_warmup(
        base,
        warmup_steps=round(train.warmup_frac * steps_total),
        total_steps=steps_total,
        min_lr_ratio=train.min_lr_ratio,
    )
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    loss_fn = DSMLoss(cfg.dsm)
    objective = _Objective(model, loss_fn, device, precision, proximal_mu)

    sums: dict[str, float] = {}
    grad_norms: list[float] = []
    labels_all: list[np.ndarray] = []
    preds_all: list[np.ndarray] = []
    steps = skipped = 0
    t0 = time.perf_counter()
    model.train()
    if fixed_norm:  # FixBN: normalise with the running statistics, and leave them as they are
        for m in objective.norm_frozen.norms:
            m.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(seed))  # dropout and anything else drawing from the global RNG
        for epoch in range(passes):
            batches = min(len(loader), steps_total - epoch * len(loader))
            # A whole pass runs the loader out (its sampler's last draw from `gen` included),
            # so whole-epoch runs are the same bit for bit as before fractions existed.
            part = loader if batches == len(loader) else itertools.islice(loader, batches)
            for clips, y, _ in part:
                clips = clips.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                x = model.preprocess(clips)
                if train.augment:
                    x = augment_batch(x, gen, max_shift=max(1, x.shape[-1] // 16))
                logits, loss, parts = objective(x, y)
                if not math.isfinite(parts["total"]):
                    skipped += 1
                    sam.zero_grad()
                    continue
                g = sam.step(loss, partial(objective.perturbed, x, y), scaler)
                loss_fn.observe_grad_norm(g)  # with SAM off, the next step's balance uses it
                sched.step()

                steps += 1
                if math.isfinite(g):
                    grad_norms.append(g)
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
                labels_all.append(y.cpu().numpy())
                preds_all.append(logits.detach().argmax(dim=1).cpu().numpy())
            if progress:
                mean_loss = sums.get("total", float("nan")) / max(steps, 1)
                print(
                    f"  pass {epoch + 1}/{passes} ({batches} batches): loss {mean_loss:.4f}, "
                    f"{steps} steps, {time.perf_counter() - t0:.1f}s",
                    file=sys.stderr,
                    flush=True,
                )

    y_true = np.concatenate(labels_all) if labels_all else np.zeros(0, dtype=np.int64)
    y_pred = np.concatenate(preds_all) if preds_all else np.zeros(0, dtype=np.int64)
    means = {k: v / max(steps, 1) for k, v in sums.items()}
    out: dict[str, Any] = {
        "loss": means.get("total", float("nan")),
        **{k: v for k, v in means.items() if k != "total"},
        "uar": uar(y_true, y_pred),
        "war": war(y_true, y_pred),
        "num_examples": n,
        "steps": steps - sam.skipped,
        "skipped_steps": skipped + sam.skipped,
        "grad_norm": float(np.mean(grad_norms)) if grad_norms else float("nan"),
        "seconds": time.perf_counter() - t0,
    }
    if train.keep_optimizer_state:
        out["optimizer_state"] = export_state(base, model)
    return out


class SampleLoss(NamedTuple):
    """Losses of one model on one fixed sample (the DRO server's loss estimates)."""

    plain: float  # mean cross-entropy over the clips
    balanced: float  # mean over the classes present of each class's mean cross-entropy


def loss_on_sample(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device,
    num_clips: int,
    seed: int,
    batch_size: int,
) -> SampleLoss:
    """Cross-entropy of ``model`` on a fixed, seed-chosen subset of ``num_clips`` clips.

    The DRO server's ``loss-before``: the received global model is scored in eval mode, before
    local training, on the same clips for the same seed (docs/design.md §3). The class-balanced
    mean weighs every class alike, as UAR does: on a source dominated by easy classes the plain
    mean is low while its UAR is not.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("cannot score a model on an empty dataset")
    k = min(max(int(num_clips), 1), n)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[:k]
    subset = Subset(dataset, sorted(idx.tolist()))
    labels, probs, loss = predict(model, subset, torch.device(device), batch_size=int(batch_size))
    return SampleLoss(float(loss), balanced_cross_entropy(labels, probs))
