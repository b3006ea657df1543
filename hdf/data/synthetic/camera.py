"""Camera styles: what a source's sensor, optics and codec do to the rendered faces.

The pipeline runs at the camera's native resolution (a source with `res` < 1 is rendered small
and upsampled, losing fine detail such as wrinkles), in this order: exposure and colour cast,
IR or grayscale response, contrast and gamma, vignetting, lens blur, sensor noise, 8-bit
quantisation, JPEG (emulated with 8x8 DCT quantisation in torch, which is much faster than
encoding every frame with PIL and gives the same blocking and ringing), resize to the output size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Camera:
    """One source's capture chain; every field is applied identically to each of its clips."""

    res: float = 1.0  # native resolution as a fraction of the output size (<1: render low)
    gain: tuple[float, float, float] = (1.0, 1.0, 1.0)  # colour cast (per channel gain)
    cast_jitter: float = 0.03  # per clip white-balance error
    exposure: float = 1.0  # mean brightness gain
    exposure_jitter: float = 0.1  # per clip exposure spread
    flicker: float = 0.0  # per frame brightness jitter (lights, auto exposure)
    mode: str = "rgb"  # rgb | gray | ir
    contrast: float = 1.0
    gamma: float = 1.0
    vignette: float = 0.0  # darkening at the corners
    blur: float = 0.0  # gaussian lens blur, sigma in native pixels
    noise: float = 0.0  # sensor noise std on the [0, 1] scale
    jpeg: int = 0  # JPEG quality 1..100; 0 = uncompressed
    light: float = 0.15  # strength of directional face lighting in this setting


def native_res(cam: Camera, size: int) -> int:
    """Rendering resolution: `res * size`, a multiple of 8 (JPEG blocks), at least 16."""
    return max(16, round(cam.res * size / 8) * 8)


def _blur_matrix(n: int, sigma: float) -> torch.Tensor:
    """n x n gaussian blur along one axis with reflected borders, as a matrix (a BLAS matmul is
    far faster on CPU than a depthwise convolution over thousands of tiny planes)."""
    r = max(1, math.ceil(2.5 * sigma))
    offsets = torch.arange(-r, r + 1)
    k = torch.exp(-0.5 * (offsets.float() / sigma) ** 2)
    k = k / k.sum()
    m = torch.zeros(n, n)
    rows = torch.arange(n)
    for o, w in zip(offsets.tolist(), k.tolist(), strict=True):
        cols = rows + o
        cols = torch.where(cols < 0, -cols, cols)
        cols = torch.where(cols >= n, 2 * (n - 1) - cols, cols).clamp(0, n - 1)
        m.index_put_((rows, cols), torch.full((n,), w), accumulate=True)
    return m


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable gaussian blur of ... x H x W (square)."""
    if sigma <= 0:
        return x
    m = _blur_matrix(x.shape[-1], sigma)
    return m @ x @ m.T


_LUMA_Q = torch.tensor(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=torch.float32,
)
_CHROMA_Q = torch.full((8, 8), 99.0)
_CHROMA_Q[:4, :4] = torch.tensor(
    [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]], dtype=torch.float32
)


def _dct_matrix() -> torch.Tensor:
    n = torch.arange(8, dtype=torch.float64)
    d = torch.cos(math.pi * (2 * n[None, :] + 1) * n[:, None] / 16) * math.sqrt(2 / 8)
    d[0] /= math.sqrt(2)
    return d.float()


_DCT = _dct_matrix()
_DCT2 = torch.kron(_DCT, _DCT)  # 64 x 64: the 2-D DCT of a flattened 8x8 block as one matmul


def _quant_table(base: torch.Tensor, quality: int) -> torch.Tensor:
    """The IJG scaling of a base table for `quality` (1..100)."""
    q = min(max(quality, 1), 100)
    s = 5000 / q if q < 50 else 200 - 2 * q
    return ((base * s + 50) / 100).floor().clamp(min=1)


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Emulated JPEG of N x 3 x H x W in [0, 255] (H, W multiples of 8): YCbCr, 4:2:0, DCT."""
    n, _, h, w = x.shape
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b
    # 4:2:0 chroma subsampling (2x2 average, then nearest upsampling back)
    ch = torch.stack([cb, cr], 1)
    ch = F.interpolate(F.avg_pool2d(ch, 2), scale_factor=2, mode="nearest")
    planes = torch.cat([y[:, None], ch], 1) - 128  # N,3,H,W
    blocks = planes.reshape(n, 3, h // 8, 8, w // 8, 8).permute(0, 1, 2, 4, 3, 5)
    blocks = blocks.reshape(n, 3, -1, 64)
    coef = blocks @ _DCT2.T
    qt = torch.stack([_quant_table(_LUMA_Q, quality), *[_quant_table(_CHROMA_Q, quality)] * 2])
    qt = qt.view(1, 3, 1, 64)
    coef = torch.round(coef / qt) * qt
    blocks = (coef @ _DCT2).view(n, 3, h // 8, w // 8, 8, 8)
    planes = blocks.permute(0, 1, 2, 4, 3, 5).reshape(n, 3, h, w) + 128
    y, cb, cr = planes[:, 0], planes[:, 1] - 128, planes[:, 2] - 128
    out = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], 1)
    return out.clamp(0, 255)


def capture(
    img: torch.Tensor, head: torch.Tensor, cam: Camera, size: int, g: torch.Generator
) -> torch.Tensor:
    """Rendered B x T x 3 x R x R in [0, 1] (and the head mask) to uint8 B x T x 3 x size x size."""
    b, t, _, res, _ = img.shape
    gain = torch.tensor(cam.gain) * (1 + cam.cast_jitter * torch.randn(b, 3, generator=g))
    expo = cam.exposure * torch.exp(cam.exposure_jitter * torch.randn(b, 1, generator=g))
    flick = 1 + cam.flicker * torch.randn(b, t, 1, generator=g)
    scale = (gain * expo)[:, None, :] * flick  # B,T,3
    x = img * scale[..., None, None]
    if cam.mode == "ir":
        # near infrared: skin glows and is flat, the illuminator lights the person, not the room
        y = 0.55 * x[:, :, 0:1] + 0.35 * x[:, :, 1:2] + 0.10 * x[:, :, 2:3]
        y = y.clamp(0, 1).pow(0.7) * (0.3 + 0.8 * head)
        x = y.expand(b, t, 3, res, res)
    elif cam.mode == "gray":
        y = 0.299 * x[:, :, 0:1] + 0.587 * x[:, :, 1:2] + 0.114 * x[:, :, 2:3]
        x = y.expand(b, t, 3, res, res)
    x = ((x - 0.5) * cam.contrast + 0.5).clamp(0, 1)
    if cam.gamma != 1.0:
        x = x.pow(cam.gamma)
    if cam.vignette > 0:
        r = torch.linspace(-1, 1, res)
        rr = r.view(1, -1).square() + r.view(-1, 1).square()
        x = x * (1 - cam.vignette * rr / 2)
    x = x.reshape(b * t, 3, res, res)
    x = _gaussian_blur(x, cam.blur)
    if cam.noise > 0:
        shot = cam.noise * (0.4 + x.clamp(min=0).sqrt())
        if cam.mode == "rgb":
            noise = torch.randn(x.shape, generator=g)
        else:  # one sensor channel
            noise = torch.randn(b * t, 1, res, res, generator=g).expand_as(x)
        x = x + shot * noise
    x = (x.clamp(0, 1) * 255).round()
    if cam.jpeg:
        x = jpeg(x, cam.jpeg)
    if res != size:
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=res > size
        )
    return x.round().clamp(0, 255).to(torch.uint8).view(b, t, 3, size, size)
