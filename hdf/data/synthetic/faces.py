"""Procedural faces: identities drawn from a source's population, rendered frame by frame.

Every part is a soft (one-pixel anti-aliased) shape in face coordinates (u right, v down, the
face about 1.3 wide and 1.6 tall), so a whole batch of clips renders as a few dozen tensor
operations over B x T x R x R grids. Head pose maps image pixels to face coordinates per frame;
facial actions (see `expressions.ACTIONS`) move brows, lids, cheeks, nose and mouth.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hdf.data.synthetic.expressions import A

SKIN = torch.tensor(
    [
        [0.95, 0.80, 0.74],
        [0.90, 0.72, 0.60],
        [0.78, 0.58, 0.44],
        [0.70, 0.52, 0.36],
        [0.55, 0.38, 0.26],
        [0.36, 0.24, 0.17],
    ]
)
HAIR = torch.tensor(
    [
        [0.08, 0.06, 0.05],
        [0.22, 0.14, 0.09],
        [0.40, 0.27, 0.16],
        [0.80, 0.66, 0.40],
        [0.55, 0.25, 0.12],
        [0.66, 0.66, 0.64],
    ]
)
IRIS = torch.tensor(
    [[0.25, 0.15, 0.08], [0.12, 0.08, 0.05], [0.25, 0.40, 0.60], [0.30, 0.42, 0.25]]
)

_Get = Callable[[str], torch.Tensor]  # a named per-clip or per-frame value, shaped to broadcast


@dataclass(frozen=True)
class Population:
    """Who appears in a source and how they behave on camera."""

    skin: tuple[float, ...] = (1, 1, 1, 1, 1, 1)  # weights over the SKIN palette (light to dark)
    hair: tuple[float, ...] = (3, 3, 2, 1, 1, 1)  # weights over the HAIR palette (last is grey)
    intensity: float = 1.0  # mean expression intensity at the apex
    intensity_spread: float = 0.25  # log-normal spread of intensity across clips
    motion: float = 1.0  # head translation / rotation / scale, relative to a calm sitter
    talk: float = 0.2  # share of clips in which the person talks
    blink_rate: float = 0.35  # blinks per second
    glasses: float = 0.15  # share of people with glasses
    beard: float = 0.15  # share of people with a beard
    bald: float = 0.1  # share of people with no hair
    rest: float = 0.15  # spread of resting expression (natural smile, frown, brow height)
    clips_per_id: float = 4.0  # clips per person within a split


def _pick(weights: tuple[float, ...], n: int, g: torch.Generator) -> torch.Tensor:
    return torch.multinomial(torch.tensor(weights, dtype=torch.float32), n, True, generator=g)


def sample_identities(pop: Population, n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """`n` people: shape, colouring and resting expression, each a tensor of leading size n."""

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g)

    skin = SKIN[_pick(pop.skin, n, g)] * (1 + 0.08 * torch.randn(n, 1, generator=g))
    skin = skin * (1 + 0.025 * torch.randn(n, 3, generator=g))
    hair = HAIR[_pick(pop.hair, n, g)] * (1 + 0.15 * torch.randn(n, 1, generator=g))
    lips = skin * torch.tensor([0.78, 0.52, 0.52]) * u(0.85, 1.1)[:, None]
    return {
        "face_w": u(0.52, 0.66),
        "face_h": u(0.76, 0.88),
        "taper": u(0.15, 0.4),
        "skin": skin.clamp(0, 1),
        "hair": hair.clamp(0, 1),
        "lips": lips.clamp(0, 1),
        "iris": IRIS[torch.randint(0, len(IRIS), (n,), generator=g)],
        "hairline": u(-0.62, -0.42),
        "hair_len": u(-0.2, 0.9),
        "has_hair": (torch.rand(n, generator=g) >= pop.bald).float(),
        "eye_dx": u(0.19, 0.27),
        "eye_y": u(-0.14, -0.04),
        "eye_w": u(0.095, 0.13),
        "eye_h": u(0.04, 0.06),
        "brow_gap": u(0.09, 0.14),
        "brow_thick": u(0.035, 0.06),
        "brow_len": u(0.12, 0.17),
        "brow_arch": u(0.0, 0.035),
        "nose_len": u(0.2, 0.3),
        "nose_w": u(0.05, 0.075),
        "mouth_y": u(0.36, 0.46),
        "mouth_w": u(0.16, 0.21),
        "lip_t": u(0.018, 0.035),
        "rest_corner": pop.rest * torch.randn(n, generator=g),
        "rest_brow": pop.rest * torch.randn(n, generator=g),
        "glasses": (torch.rand(n, generator=g) < pop.glasses).float(),
        "beard": (torch.rand(n, generator=g) < pop.beard).float() * u(0.4, 0.9),
    }


def _soft(d: torch.Tensor, inv_ew: torch.Tensor) -> torch.Tensor:
    """Coverage of a shape whose signed distance (inside > 0) is `d`, with a one-pixel edge."""
    return (d * inv_ew).add_(0.5).clamp_(0.0, 1.0)


def _paint(img: torch.Tensor, colour: torch.Tensor, alpha: torch.Tensor) -> None:
    """Composite in place: img B,T,3,H,W (may be a view); colour B,3; alpha B,T,H,W."""
    img.lerp_(colour[:, None, :, None, None].expand_as(img), alpha.unsqueeze(2))


@dataclass
class _Patch:
    """Face coordinates and the image view of one rectangle of the frame (all frames)."""

    u: torch.Tensor
    v: torch.Tensor
    uf: torch.Tensor  # u of the inner features (shifted by yaw)
    vf: torch.Tensor  # v of the inner features (shifted by pitch)
    img: torch.Tensor

    @property
    def au(self) -> torch.Tensor:
        return self.uf.abs()


def _bounds(
    pose: dict[str, torch.Tensor], res: int, box: tuple[float, float, float, float]
) -> tuple[slice, slice]:
    """Pixel rows and columns that can contain the feature box (uf0, uf1, vf0, vf1) in any frame,
    so the detailed features are computed on a small patch instead of the whole frame."""
    u0, u1, v0, v1 = box
    us = torch.tensor([u0, u1, u0, u1]) + 0.09 * pose["yaw"][..., None]
    vs = torch.tensor([v0, v0, v1, v1]) + 0.05 * pose["pitch"][..., None]
    cos, sin = torch.cos(pose["rot"])[..., None], torch.sin(pose["rot"])[..., None]
    sc = pose["scale"][..., None]
    x = pose["cx"][..., None] + sc * (cos * us - sin * vs)
    y = pose["cy"][..., None] + sc * (sin * us + cos * vs)

    def span(z: torch.Tensor) -> slice:
        lo = math.floor(((z.min().item() + 1) * res - 1) / 2) - 1
        hi = math.ceil(((z.max().item() + 1) * res - 1) / 2) + 2
        return slice(min(max(lo, 0), res), min(max(hi, 0), res))

    return span(y), span(x)


def render(
    ident: dict[str, torch.Tensor],
    acts: torch.Tensor,
    pose: dict[str, torch.Tensor],
    scene: dict[str, torch.Tensor],
    res: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render B clips of T frames at res x res.

    Returns (RGB float B x T x 3 x R x R in [0, 1], head mask B x T x 1 x R x R); the mask lets a
    camera light the person and the background differently (e.g. an IR illuminator).
    """
    b, t, _ = acts.shape

    def c(name: str) -> torch.Tensor:  # per-clip scalar as B,1,1,1
        return ident[name].view(b, 1, 1, 1)

    def f(x: torch.Tensor) -> torch.Tensor:  # per-frame scalar B,T -> B,T,1,1
        return x.reshape(b, t, 1, 1)

    def act(name: str) -> torch.Tensor:
        return f(acts[:, :, A[name]])

    # --- pixel grid to face coordinates (pose per frame) ---
    x = torch.linspace(-1 + 1 / res, 1 - 1 / res, res)
    dx = x.view(1, 1, 1, res) - f(pose["cx"])
    dy = x.view(1, 1, res, 1) - f(pose["cy"])
    cos, sin, sc = f(torch.cos(pose["rot"])), f(torch.sin(pose["rot"])), f(pose["scale"])
    u = (cos * dx + sin * dy) / sc
    v = (cos * dy - sin * dx) / sc
    ie = sc * (res / 2.0)  # 1 / (one pixel in face units)

    img = scene["bg"][:, None].expand(b, t, 3, res, res).clone()

    # --- body, hair behind the head, face (whole frame) ---
    shoulders = _soft(v - (0.92 + 0.35 * u * u), ie)
    _paint(img, scene["shirt"], shoulders)
    _paint(img, ident["skin"] * 0.8, _soft(0.22 - u.abs(), ie) * _soft(v - 0.4, ie))
    fw, fh = c("face_w"), c("face_h")
    width_v = fw * (1 - c("taper") * v.clamp(min=0) / fh)
    rf2 = (u / width_v).square() + (v / fh).square()
    face = _soft((1 - rf2.sqrt()) * fw, ie)
    hb = ((u / (fw + 0.08)).square() + ((v + 0.07) / (fh + 0.07)).square()).sqrt()
    hair_back = _soft((1 - hb) * fw, ie) * _soft(c("hair_len") - v, ie) * c("has_hair")
    _paint(img, ident["hair"], hair_back)
    _paint(img, ident["skin"], face)
    head = torch.maximum(face, hair_back)
    beard = face * _soft(v - (c("mouth_y") - 0.09 + 0.1 * u.abs()), ie) * c("beard")
    _paint(img, ident["hair"] * 0.9 + 0.05, beard)
    fringe = face * _soft(c("hairline") + 0.35 * u * u - v, ie) * c("has_hair")
    _paint(img, ident["hair"], fringe)

    def patch(box: tuple[float, float, float, float]) -> _Patch:
        rows, cols = _bounds(pose, res, box)
        pu, pv = u[:, :, rows, cols], v[:, :, rows, cols]
        return _Patch(
            pu,
            pv,
            pu - 0.09 * f(pose["yaw"]),
            pv - 0.05 * f(pose["pitch"]),
            img[:, :, :, rows, cols],
        )

    shade = ident["skin"] * 0.62  # wrinkles, folds and creases
    _upper_face(
        patch((-0.52, 0.52, -0.62, 0.14)), c, act, f, ident, {**scene, **pose}, shade, ie, b
    )
    _lower_face(patch((-0.38, 0.38, -0.16, 0.8)), c, act, ident, shade, ie, b)

    # --- light: a directional gradient and darker rim across the head ---
    lx, ly = scene["light"][:, 0].view(b, 1, 1, 1), scene["light"][:, 1].view(b, 1, 1, 1)
    shading = 1 + head * (lx * u + ly * v - 0.3 * rf2.clamp(max=1.5).square())
    img.mul_(shading.unsqueeze(2)).clamp_(0, 1)
    return img, head.unsqueeze(2)


def _upper_face(
    p: _Patch,
    c: _Get,
    act: _Get,
    f: Callable[[torch.Tensor], torch.Tensor],
    ident: dict[str, torch.Tensor],
    scene: dict[str, torch.Tensor],
    shade: torch.Tensor,
    ie: torch.Tensor,
    b: int,
) -> None:
    """Forehead lines, brows, frown lines, eyes, lids, crow's feet and glasses."""
    if p.u.numel() == 0:
        return
    uf, vf, au, img = p.uf, p.vf, p.au, p.img
    eye_dx, eye_y = c("eye_dx"), c("eye_y")
    brow_raise, brow_inner, brow_lower = act("brow_raise"), act("brow_inner"), act("brow_lower")

    # forehead lines: across the forehead for a brow raise, centred for an inner raise
    fl_w = brow_raise + brow_inner * _soft(0.12 - au, ie / 6)
    band = _soft(vf - (c("hairline") + 0.08), ie) * _soft(eye_y - c("brow_gap") - 0.08 - vf, ie)
    stripes = (0.5 + 0.5 * torch.cos(vf * (2 * torch.pi / 0.05))).pow(4)
    _paint(img, shade, (0.6 * fl_w).clamp(max=0.8) * stripes * band * _soft(0.3 - au, ie))

    # brows: a quadratic curve per side (symmetric through |u|)
    brow_dx = eye_dx - 0.035 * brow_lower - 0.015 * brow_inner
    pp = (au - brow_dx) / c("brow_len")  # -1 inner end, +1 outer end
    inner = (1 - pp) * 0.5
    arch = c("brow_arch") + 0.04 * brow_raise - 0.03 * brow_inner
    vb = (
        eye_y
        - c("brow_gap")
        - 0.02 * c("rest_brow")
        - 0.13 * brow_raise
        - 0.13 * brow_inner * inner
        + 0.07 * brow_lower
        + 0.04 * brow_lower * inner
        - arch * (1 - pp * pp)
    )
    half = c("brow_thick") * (0.6 + 0.4 * inner)
    brow = _soft(half - (vf - vb).abs(), ie) * _soft((1 - pp.abs()) * c("brow_len"), ie)
    _paint(img, ident["hair"] * 0.8, brow)
    # vertical frown lines between the brows (brow lowering)
    glab = _soft(0.012 - (au - 0.035).abs(), ie) * _soft(0.08 - (vf - (eye_y - 0.1)).abs(), ie)
    _paint(img, shade, (0.8 * brow_lower).clamp(max=0.8) * glab)

    # eyes: lids open with lid_raise, close with tightening, cheek raise and blinks
    lid_raise, lid_tight, cheek = act("lid_raise"), act("lid_tighten"), act("cheek_raise")
    blink = f(scene["blink"])
    q = (au - eye_dx) / c("eye_w")
    q2 = (1 - q * q).clamp(min=0)
    h_up = c("eye_h") * (1 + 1.3 * lid_raise - 0.45 * lid_tight - 0.25 * cheek) * (1 - blink)
    h_lo = c("eye_h") * (0.8 + 0.1 * lid_raise - 0.35 * lid_tight - 0.45 * cheek) * (1 - blink)
    v_top = eye_y - h_up.clamp(min=0) * q2
    v_bot = eye_y + h_lo.clamp(min=0) * q2
    in_w = _soft((1 - q.abs()) * c("eye_w"), ie)
    eye = _soft(vf - v_top, ie) * _soft(v_bot - vf, ie) * in_w
    _paint(img, torch.full((b, 3), 0.93), eye)
    gx = f(scene["gaze_x"]) * 0.5 * c("eye_w")
    ir = (au - eye_dx - gx * torch.sign(uf)).square() + (vf - eye_y - f(scene["gaze_y"])).square()
    ir = ir.sqrt()
    r_iris = c("eye_h") * 1.05
    _paint(img, ident["iris"], eye * _soft(r_iris - ir, ie))
    _paint(img, torch.full((b, 3), 0.03), eye * _soft(r_iris * 0.45 - ir, ie))
    lash = _soft(0.011 - (vf - v_top).abs(), ie) * _soft((1.05 - q.abs()) * c("eye_w"), ie)
    _paint(img, ident["hair"] * 0.4, lash)
    # crease under the lower lid and crow's feet (cheek raise, tightening)
    under = _soft(0.008 - (vf - (v_bot + 0.03)).abs(), ie) * in_w
    _paint(img, shade, (0.6 * cheek + 0.3 * lid_tight).clamp(max=0.8) * under)
    crow = _soft(0.05 - (au - eye_dx - c("eye_w") - 0.04).abs(), ie) * _soft(
        0.04 - (vf - eye_y).abs(), ie
    )
    crow_lines = (0.5 + 0.5 * torch.cos((vf - eye_y) * (2 * torch.pi / 0.03))).pow(4)
    _paint(img, shade, (0.5 * cheek).clamp(max=0.6) * crow * crow_lines)

    # glasses: two rims and a bridge
    gl = c("glasses")
    rim = ((au - eye_dx) / (c("eye_w") * 1.55)).square() + ((vf - eye_y - 0.01) / 0.1).square()
    rim = rim.sqrt()
    rim_a = _soft(0.012 - ((rim - 1) * 0.1).abs(), ie)
    br = _soft(0.01 - (vf - eye_y + 0.02).abs(), ie) * _soft(eye_dx - c("eye_w") * 1.5 - au, ie)
    _paint(img, scene["frame"], torch.maximum(rim_a, br) * gl)
    _paint(img, scene["lens"], 0.18 * _soft((1 - rim) * 0.1, ie) * gl)


def _lower_face(
    p: _Patch,
    c: _Get,
    act: _Get,
    ident: dict[str, torch.Tensor],
    shade: torch.Tensor,
    ie: torch.Tensor,
    b: int,
) -> None:
    """Nose (shading, nostrils, wrinkles), nasolabial folds, lips, mouth opening and teeth."""
    if p.u.numel() == 0:
        return
    uf, vf, au, img = p.uf, p.vf, p.au, p.img
    eye_y = c("eye_y")
    wrinkle, ulr, cheek = act("nose_wrinkle"), act("upper_lip_raise"), act("cheek_raise")
    tip = eye_y + c("nose_len") - 0.025 * wrinkle - 0.01 * ulr
    nw = c("nose_w") * (1 + 0.3 * wrinkle)
    side = _soft(0.01 - (au - 0.045).abs(), ie) * _soft(vf - eye_y, ie) * _soft(tip - vf, ie)
    _paint(img, shade, 0.25 * side)
    nos = ((au - 0.6 * nw) / (0.45 * nw)).square() + ((vf - tip) / 0.018).square()
    _paint(img, ident["skin"] * 0.3, 0.8 * _soft((1 - nos.sqrt()) * 0.02, ie))
    bridge = _soft(0.07 - au, ie) * _soft(0.06 - (vf - (eye_y + 0.06)).abs(), ie)
    wr_lines = (0.5 + 0.5 * torch.cos((vf - eye_y) * (2 * torch.pi / 0.03))).pow(4)
    _paint(img, shade * 0.7, (1.2 * wrinkle).clamp(max=1) * bridge * wr_lines)

    corner_up, corner_down = act("corner_up"), act("corner_down")
    stretch, press, jaw = act("lip_stretch"), act("lip_press"), act("jaw_drop")
    mw = c("mouth_w") * (
        1
        + 0.5 * stretch
        + 0.22 * corner_up
        - 0.12 * press
        - 0.25 * jaw * (1 - (stretch + corner_up).clamp(max=1))
    )
    my = c("mouth_y") + 0.03 * jaw - 0.015 * ulr
    curve = 0.14 * (corner_down - corner_up) - 0.02 * c("rest_corner") + 0.02 * stretch
    s = uf / mw
    s2 = s * s
    bulge = (1 - s2).clamp(min=0)
    centre = my + curve * s2
    opening = 0.24 * jaw
    v_up = centre - (0.3 * opening + 0.06 * ulr) * bulge.sqrt()
    v_lo = centre + 0.7 * opening * bulge
    in_m = _soft((1 - s.abs()) * mw, ie)
    # nasolabial folds, from the nostril wing to beyond the mouth corner
    fold_u = nw + (mw + 0.03 - nw) * ((vf - tip) / (my - tip)).clamp(0, 1.2)
    fold = _soft(0.01 - (au - fold_u).abs(), ie) * _soft(vf - tip, ie) * _soft(my + 0.04 - vf, ie)
    _paint(img, shade, (0.15 + 0.5 * (cheek + ulr + 0.5 * corner_up)).clamp(max=0.8) * fold)
    lip_t = c("lip_t") * (1 - 0.6 * press)
    lips = _soft(vf - (v_up - lip_t * (0.8 + 0.4 * bulge)), ie) * _soft(
        v_lo + lip_t * (1.0 + 0.5 * bulge) - vf, ie
    )
    _paint(img, ident["lips"], lips * _soft((1.04 - s.abs()) * mw, ie))
    inside = _soft(vf - v_up, ie) * _soft(v_lo - vf, ie) * in_m
    _paint(img, torch.tensor([0.12, 0.06, 0.06]).expand(b, 3), inside)
    teeth = inside * (
        _soft(v_up + 0.02 + 0.03 * ulr + 0.01 * corner_up - vf, ie)
        + _soft(vf - (v_lo - 0.025 * stretch), ie) * (stretch > 0.3)
    ).clamp(max=1)
    _paint(img, torch.full((b, 3), 0.9), teeth)
    line = _soft(0.009 - (vf - centre).abs(), ie) * in_m
    _paint(img, ident["lips"] * 0.4, line * (1 - inside))


def background(b: int, res: int, tint: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """B x 3 x R x R smooth random backgrounds around a scene tint (B x 3): walls, rooms, sky."""
    low = tint[:, :, None, None] * (0.85 + 0.3 * torch.rand(b, 3, 4, 4, generator=g))
    low = low * (0.6 + 0.8 * torch.rand(b, 1, 4, 4, generator=g))
    return F.interpolate(low, size=(res, res), mode="bilinear", align_corners=False).clamp(0, 1)
