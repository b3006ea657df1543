"""Score a model on one split: loss, UAR, WAR, per-class recall and the confusion matrix."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from hdf.device import autocast_context
from hdf.metrics import balanced_cross_entropy, confusion_matrix, per_class_recall, uar, war


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    dataset: Dataset,
    device: torch.device,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    precision: str = "auto",
) -> tuple[np.ndarray, np.ndarray, float]:
    """(labels, predicted probabilities N x 7, mean cross-entropy) of `model` on `dataset`."""
    was_training = model.training
    model.eval()
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    labels, probs, loss_sum = [], [], 0.0
    for clips, y, _ in loader:
        clips, y = clips.to(device, non_blocking=True), y.to(device)
        with autocast_context(device, precision):
            logits, _ = model(model.preprocess(clips))
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        labels.append(y.cpu())
        probs.append(logits.softmax(dim=1).cpu())
    model.train(was_training)
    n = sum(len(y) for y in labels)
    if n == 0:
        raise ValueError("cannot evaluate on an empty split")
    return torch.cat(labels).numpy(), torch.cat(probs).numpy(), loss_sum / n


def evaluate(
    model: torch.nn.Module,
    dataset: Dataset,
    device: torch.device,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    precision: str = "auto",
) -> dict[str, Any]:
    """Loss (plain and class-balanced), UAR, WAR, per-class recall (NaN where a class is absent),
    confusion, count."""
    y, p, loss = predict(
        model, dataset, device, batch_size=batch_size, num_workers=num_workers, precision=precision
    )
    pred = p.argmax(axis=1)
    cm = confusion_matrix(y, pred)
    return {
        "loss": loss,
        "loss_balanced": balanced_cross_entropy(y, p),
        "uar": uar(y, pred),
        "war": war(y, pred),
        "recall": per_class_recall(cm).tolist(),
        "confusion": cm,
        "num_examples": len(y),
    }


def summarize(stats: dict[str, Any]) -> dict[str, Any]:
    """The JSON-ready part of `evaluate`'s result, as metrics.jsonl stores it."""
    return {
        "loss": stats["loss"],
        "uar": stats["uar"],
        "war": stats["war"],
        "recall": stats["recall"],
        "confusion": np.asarray(stats["confusion"]).tolist(),
    }
