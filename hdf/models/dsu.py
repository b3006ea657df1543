"""Feature-statistics uncertainty (DSU): a site that holds one source sees other plausible styles.

A federated site trains on a single source, so its batches never show the model how another
camera or lighting shifts the features; a pooled model sees every source in every batch. DSU
(Li et al., "Uncertainty Modeling for Out-of-Distribution Generalization", ICLR 2022) stands in
for the missing sources without sharing anything: each clip's per-channel feature mean and std,
the "style" of early layers, are re-drawn from a Gaussian whose spread is the batch's own
variation of those statistics, and the features are re-styled with the draw. Training only, with
probability ``p`` per forward; no parameters or buffers, so the state dict, the wire and
checkpoints are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

EPS = 1e-6


def resample_feature_stats(
    x: torch.Tensor, noise_mu: torch.Tensor, noise_sig: torch.Tensor
) -> torch.Tensor:
    """Re-style ``x`` (B x C x ...) with its per-clip channel statistics perturbed by the noises.

    ``noise_mu`` and ``noise_sig`` are standard-normal draws of shape B x C; each clip's mean
    becomes ``mu + noise_mu * std_b(mu)`` and its std ``sig + noise_sig * std_b(sig)``, where
    ``std_b`` is the standard deviation over the batch (DSU's eq. 3-8).
    """
    dims = tuple(range(2, x.dim()))
    xf = x.float()
    mu = xf.mean(dim=dims, keepdim=True)
    sig = (xf.var(dim=dims, keepdim=True) + EPS).sqrt()
    spread_mu = (mu.var(dim=0, keepdim=True) + EPS).sqrt()
    spread_sig = (sig.var(dim=0, keepdim=True) + EPS).sqrt()
    shape = mu.shape
    beta = mu + noise_mu.view(shape) * spread_mu
    gamma = sig + noise_sig.view(shape) * spread_sig
    return ((xf - mu) / sig * gamma + beta).to(x.dtype)


class FeatureStatsNoise(nn.Module):
    """DSU after an early layer: identity in eval mode, with ``p`` = 0, or for a single clip."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(
                f"model.dsu must be a probability in [0, 1] (0: off; DSU uses 0.5), got {p}"
            )
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One clip has no batch spread to draw from; the coin is drawn only when it can apply.
        if not self.training or self.p == 0.0 or x.shape[0] < 2:
            return x
        if torch.rand(()).item() >= self.p:
            return x
        b, c = x.shape[:2]
        noise = torch.randn(2, b, c, device=x.device)
        return resample_feature_stats(x, noise[0], noise[1])

    def extra_repr(self) -> str:
        return f"p={self.p}"
