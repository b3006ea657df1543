"""DAM, the Time-Frequency Distributional Attention Module (docs/hdf_method.md).

Departures from the released `models/DAM.py` (docs/hdf_method.md §R3), each explained where
it happens and collected in docs/hdf_method.md:
- the layout is the backbone's own B x C x T x H x W (the released code is time-first, from SNNs);
- channels are pooled into G = min(C, T) groups with T and G decoupled, so any C and T work (the
  released code pools C into exactly T bins and needs C >= T for that to mean anything);
- the temporal difference ("Compensate") is taken along time, not along the pooled-channel axis;
- the DCT input is the channel *mean* (the released conv sums channels), so the learned
  perturbation has the same scale at every stage width;
- the channel-sum DCT conv is computed as one 1-channel conv, and the two residual gates are fused
  into one multiply, which is the same function at a fraction of the cost (as are the batched
  matmuls and the detached sign of the frequency branch, which only save copies and zero grads).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hdf.models.dct import DCT_NUM, DCT_SIZE, dct_bank

# The released DROAdversarialBranch's constant weight of its Wasserstein term (§R3).
_FREQ_WASSERSTEIN_REG = 0.05


class _Descriptors(torch.autograd.Function):
    """Spatial avg and max per (c, t) and the (C, T) mean per pixel, with one fused backward.

    Same values and gradients as ``x.mean((3, 4))``, ``x.amax((3, 4))`` (gradient to one arg-max
    per window instead of split among ties) and ``x.mean((1, 2))``; autograd's own backward of the
    three writes and accumulates three full-size gradients, which dominated DAM's cost on CPU.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[override]
        b, c, t, h, w = x.shape
        flat = x.reshape(b, c, t, h * w)
        avg = flat.mean(dim=3)
        mx, idx = flat.max(dim=3)
        xbar = x.mean(dim=(1, 2))
        ctx.save_for_backward(idx)
        ctx.shape = (b, c, t, h, w)
        return avg, mx, xbar

    @staticmethod
    def backward(ctx, g_avg: torch.Tensor, g_mx: torch.Tensor, g_bar: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (idx,) = ctx.saved_tensors
        b, c, t, h, w = ctx.shape
        grad = (g_avg / (h * w)).unsqueeze(3) + (g_bar / (c * t)).reshape(b, 1, 1, h * w)
        grad.scatter_add_(3, idx.unsqueeze(3), g_mx.unsqueeze(3).to(grad.dtype))
        return grad.reshape(b, c, t, h, w)


def _descriptors(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(spatial avg B x C x T, spatial max B x C x T, (C, T) mean B x H x W) of x.

    With gradients the fused `_Descriptors` runs; when no gradient is needed, or while
    `torch.jit.trace` / `torch.export` records the graph (a Python autograd Function cannot be
    serialised by TorchScript), the same values come from plain tensor ops.
    """
    if (
        torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.compiler.is_compiling()
        or not (torch.is_grad_enabled() and x.requires_grad)
    ):
        flat = x.flatten(3)
        return flat.mean(dim=3), flat.amax(dim=3), x.mean(dim=(1, 2))
    return _Descriptors.apply(x)


class RobustTemporalFusion(nn.Module):
    """Local-global robust fusion of pooled descriptors into a (0, 1) map (LocalGlobalRobustModule).

    G = sigmoid(gamma * (alpha A + beta M) + delta * Wd - D) per (t, group), with Wd the L2
    deviation of A from its group mean (the paper's "Wasserstein" term), D the temporal difference.
    """

    def __init__(self, frames: int, groups: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(frames, groups))
        self.delta = nn.Parameter(torch.zeros(frames, groups))
        self.alpha = nn.Parameter(torch.tensor(0.5))
        self.beta = nn.Parameter(torch.tensor(0.5))

    def forward(self, avg: torch.Tensor, mx: torch.Tensor) -> torch.Tensor:
        """avg, mx: B x T x G descriptors -> B x T x G map (§R3, temporal branch)."""
        dev = (avg - avg.mean(dim=2, keepdim=True)).norm(dim=2, keepdim=True)  # B x T x 1
        fused = self.alpha * avg + self.beta * mx
        # Fix: the released code differences along the pooled-channel axis (dim 2); the paper's
        # "Compensate" is a temporal difference, so we difference along time, D[:, 0] = 0.
        diff = F.pad(torch.diff(avg, dim=1).abs(), (0, 0, 1, 0))
        return torch.sigmoid(self.gamma * fused + self.delta * dev - diff)


class TemporalBranch(nn.Module):
    """Temporal attention branch: pooled descriptors, robust fusion, T x T map, self-attention."""

    def __init__(self, channels: int, frames: int) -> None:
        super().__init__()
        self.frames = frames
        # The released code pools C into exactly T bins (meaningless for C < T); we pool into
        # G = min(C, T) groups, which is the released behaviour whenever C >= T.
        self.groups = min(channels, frames)
        self.robust = RobustTemporalFusion(frames, self.groups)
        self.fc_t = nn.Linear(frames, frames, bias=False)
        self.q = nn.Linear(self.groups, self.groups)
        self.k = nn.Linear(self.groups, self.groups)
        self.v = nn.Linear(self.groups, self.groups)

    def _group(self, desc: torch.Tensor, pool: str) -> torch.Tensor:
        """B x C x T per-channel descriptor -> B x T x G per-group descriptor."""
        b, c, t = desc.shape
        if c == self.groups:
            return desc.transpose(1, 2)
        if c % self.groups == 0:
            # Equal contiguous bins: adaptive pooling over C is a reshape and a reduction (the
            # same values; max keeps a single arg-max per bin, as adaptive max pooling does).
            binned = desc.reshape(b, self.groups, c // self.groups, t)
            out = binned.mean(dim=2) if pool == "avg" else binned.max(dim=2).values
            return out.transpose(1, 2)
        desc = desc.transpose(1, 2)  # B x T x C
        if pool == "avg":
            return F.adaptive_avg_pool1d(desc, self.groups)
        return F.adaptive_max_pool1d(desc, self.groups)

    def forward(self, avg: torch.Tensor, mx: torch.Tensor) -> torch.Tensor:
        """Spatial avg and max (B x C x T) -> temporal gate B x 1 x T x 1 x 1 (paper Fig. (b))."""
        p = self.robust(self._group(avg, "avg"), self._group(mx, "max"))  # B x T x G
        # The T-by-T linear map over time: fc_t(p^T)^T = W p, one broadcast matmul, no copies.
        p = torch.matmul(self.fc_t.weight.to(p.dtype), p)
        # q, k, v in one matmul (the three Linear modules keep their own parameters and keys).
        weight = torch.cat((self.q.weight, self.k.weight, self.v.weight))
        bias = torch.cat((self.q.bias, self.k.bias, self.v.bias))
        q, k, v = F.linear(p, weight.to(p.dtype), bias.to(p.dtype)).chunk(3, dim=2)
        # single-head self-attention over the T tokens, scale 1/sqrt(G), no output projection
        p = F.scaled_dot_product_attention(q, k, v)
        return torch.sigmoid(p.mean(dim=2))[:, None, :, None, None]


class AdaptiveDynamicTanh(nn.Module):
    """Data-adaptive dynamic tanh over the frequency channels ("Fitting", §R3)."""

    def __init__(self, channels: int, init_alpha: float = 0.5, eps: float = 1e-6) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(init_alpha)))
        self.weight = nn.Parameter(torch.ones(1, channels, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1))
        self.eps = eps

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: B x K x P -> tanh(alpha / sigma * z) * weight + bias, sigma the std over K per P."""
        # (torch.var over dim 1 is several times slower than this on CPU)
        centred = z - z.mean(dim=1, keepdim=True)
        var = centred.square().sum(dim=1, keepdim=True) / max(z.shape[1] - 1, 1)  # unbiased
        sigma = torch.sqrt(var + self.eps)
        return torch.addcmul(
            self.bias, torch.tanh(self.alpha / (sigma + self.eps) * z), self.weight
        )


def conv_to_one_channel(
    z: torch.Tensor, weight: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """``F.conv2d(z, weight, padding=k // 2)`` for one output channel, z given as B x K x (H W).

    One matmul to the k x k kernel offsets, then ``fold`` adds each offset's contribution where it
    lands: the same function as the conv (FreConv, 49 -> 1, 7x7, pad 3), about 3x faster than a
    1-output-channel conv on CPU. weight: 1 x K x k x k (odd k); returns B x 1 x H x W.
    """
    k, channels = int(weight.shape[-1]), int(weight.shape[1])  # constants (TorchScript tracing)
    per_offset = weight.reshape(channels, k * k).flip(1).t()  # (k k) x K
    # bmm against the broadcast weight: `per_offset @ z` would transpose-copy z to one big mm
    # and return a transposed (strided) product that fold then reads slowly.
    offsets = torch.bmm(per_offset.to(z.dtype).expand(z.shape[0], -1, -1), z)
    return F.fold(offsets, size, k, padding=k // 2)


class FrequencyBranch(nn.Module):
    """Frequency attention branch: DCT bank, learned perturbation, ADyT, 7x7 conv to a gate."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("dct", dct_bank(DCT_SIZE).reshape(DCT_NUM, DCT_NUM))  # k x (i, j)
        # DROAdversarialBranch: a learned (loss-minimising) perturbation of the DCT responses.
        self.noise = nn.Parameter(torch.randn(1, DCT_NUM, 1) * 0.1)
        self.noise_scale = nn.Parameter(torch.ones(1, DCT_NUM, 1))
        self.dev_scale = nn.Parameter(torch.zeros(1, DCT_NUM, 1))
        self.alpha = nn.Parameter(torch.tensor(0.5))
        self.beta = nn.Parameter(torch.tensor(0.5))
        self.fit = AdaptiveDynamicTanh(DCT_NUM)
        self.attn = nn.Conv2d(DCT_NUM, 1, DCT_SIZE, padding=DCT_SIZE // 2, bias=False)

    def forward(self, xbar: torch.Tensor) -> torch.Tensor:
        """Mean over C and T (B x H x W) -> spatial gate B x 1 x 1 x H x W (paper Fig. (b))."""
        h, w = xbar.shape[1:]
        pad = DCT_SIZE // 2
        # The released conv has weight B_k for every input channel, i.e. it filters the channel
        # sum; we filter the channel mean (sum / C) so the perturbation's scale is width-free.
        # 7x7 DCT of every zero-padded patch: unfold + one matmul (the same as the 1->49 conv).
        patches = F.unfold(xbar.unsqueeze(1), DCT_SIZE, padding=pad)  # B x 49 x HW
        # bmm keeps the B x 49 x HW layout contiguous (see conv_to_one_channel)
        dct = torch.bmm(self.dct.to(patches.dtype).expand(patches.shape[0], -1, -1), patches)
        dev = (dct - dct.mean(dim=2, keepdim=True)).norm(dim=2, keepdim=True)  # B x 49 x 1
        delta = self.noise * self.noise_scale + _FREQ_WASSERSTEIN_REG * self.dev_scale * dev
        # (alpha Dct + beta (Dct + delta sign(Dct))) / 2, written with one fused multiply-add.
        # sign has zero gradient; taking it of the detached Dct spares autograd a full-size
        # zero gradient and its accumulation.
        z = torch.addcmul(
            (self.alpha + self.beta) / 2 * dct, self.beta / 2 * delta, dct.detach().sign()
        )
        z = self.fit(z)
        fmap = conv_to_one_channel(z, self.attn.weight, (h, w))  # FreConv: B x 1 x H x W
        return torch.sigmoid(fmap).unsqueeze(2)


class DAM(nn.Module):
    """Time-Frequency Distributional Attention Module on B x C x T x H x W (§R3, figure panel (b)).

    Y = (w_t (X + X g_t) + w_s (X + X g_s)) / 2 with learnable w_t = 0.8, w_s = 0.3 (released
    init). With one branch off the module returns that branch's residual output alone; with both
    off it is the identity and has no parameters.
    """

    def __init__(
        self, channels: int, frames: int, *, temporal: bool = True, frequency: bool = True
    ) -> None:
        super().__init__()
        if channels < 1 or frames < 1:
            raise ValueError(f"DAM needs channels >= 1 and frames >= 1, got {channels=} {frames=}")
        self.channels = int(channels)
        self.frames = int(frames)
        self.temporal = TemporalBranch(self.channels, self.frames) if temporal else None
        self.frequency = FrequencyBranch() if frequency else None
        if temporal and frequency:
            self.w_t = nn.Parameter(torch.tensor(0.8))
            self.w_s = nn.Parameter(torch.tensor(0.3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x C x T x H x W -> same shape (paper Fig. (b), "Adaptive Time-Frequency Fusion")."""
        if self.temporal is None and self.frequency is None:
            return x
        if x.dim() != 5 or x.shape[1] != self.channels or x.shape[2] != self.frames:
            raise ValueError(
                f"DAM({self.channels}, {self.frames}) expects B x {self.channels} x "
                f"{self.frames} x H x W, got {tuple(x.shape)}"
            )
        avg, mx, xbar = _descriptors(x)
        # Both residual gates act on the same X, so the fused output is X times one small gate
        # (B x 1 x T x H x W): one pass over X instead of three.
        if self.frequency is None:
            gate = 1 + self.temporal(avg, mx)
        elif self.temporal is None:
            gate = 1 + self.frequency(xbar)
        else:
            g_t, g_s = self.temporal(avg, mx), self.frequency(xbar)
            # (w_t (1 + g_t) + w_s (1 + g_s)) / 2, with one full-size (B x 1 x T x H x W) op
            half_t, half_s = self.w_t / 2, self.w_s / 2
            gate = torch.addcmul(torch.addcmul(half_t + half_s, half_t, g_t), half_s, g_s)
        return x * gate.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, frames={self.frames}, "
            f"temporal={self.temporal is not None}, frequency={self.frequency is not None}"
        )
