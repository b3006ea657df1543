"""Facial actions and the per-class temporal profiles that drive them (docs/design.md §5).

Each class is one or more *variants*: a range per facial action at the apex, loosely after FACS
action units (AU1+2 brow raise, AU4 brow lower, AU5/AU7 lids, AU6 cheek, AU9 nose wrinkle, AU10
upper lip, AU12/AU15 lip corners, AU20 lip stretch, AU23/24 press, AU26 jaw). The confusable pairs
share most actions on purpose: fear and surprise both raise brows and open eyes and mouth (fear
adds the inner-brow raise, brows drawn together and a stretched mouth; surprise an arched brow and
a round mouth); disgust and anger both lower the brows (disgust adds the nose wrinkle and raised
upper lip; anger tightened lids and pressed lips). The expression unfolds over the clip with a
random onset, rise, apex hold and offset; blinks and talking are added as nuisance.
"""

from __future__ import annotations

import math

import torch

from hdf.classes import EMOTIONS

ACTIONS: tuple[str, ...] = (
    "brow_raise",  # AU1+2: whole brow up, arched
    "brow_inner",  # AU1: inner ends up (sad, fear)
    "brow_lower",  # AU4: brows down and together
    "lid_raise",  # AU5: upper lid up, sclera shows
    "lid_tighten",  # AU7: narrower eyes
    "cheek_raise",  # AU6: cheeks up, crow's feet, lower lid pushed up
    "nose_wrinkle",  # AU9
    "upper_lip_raise",  # AU10
    "corner_up",  # AU12
    "corner_down",  # AU15
    "lip_stretch",  # AU20: mouth pulled sideways
    "lip_press",  # AU23/24: thin, tight lips
    "jaw_drop",  # AU26/27: mouth opening
)
A = {name: i for i, name in enumerate(ACTIONS)}

# (class, weight within the class, {action: (low, high) at the apex before intensity scaling})
_VARIANTS: list[tuple[str, float, dict[str, tuple[float, float]]]] = [
    ("happy", 0.6, {"cheek_raise": (0.5, 1.0), "corner_up": (0.6, 1.0), "lid_tighten": (0.0, 0.3)}),
    (
        "happy",
        0.4,
        {
            "cheek_raise": (0.6, 1.0),
            "corner_up": (0.6, 1.0),
            "jaw_drop": (0.3, 0.7),
            "upper_lip_raise": (0.0, 0.3),
        },
    ),
    (
        "sad",
        1.0,
        {
            "brow_inner": (0.5, 1.0),
            "brow_lower": (0.1, 0.4),
            "corner_down": (0.5, 1.0),
            "lid_tighten": (0.0, 0.3),
            "lip_press": (0.0, 0.4),
        },
    ),
    ("neutral", 1.0, {}),
    (
        "angry",
        0.7,
        {
            "brow_lower": (0.6, 1.0),
            "lid_tighten": (0.3, 0.7),
            "lid_raise": (0.0, 0.3),
            "lip_press": (0.4, 1.0),
            "nose_wrinkle": (0.0, 0.25),
            "corner_down": (0.0, 0.25),
        },
    ),
    (
        "angry",
        0.3,  # shouting: open mouth, some upper-lip raise (closer to disgust and fear)
        {
            "brow_lower": (0.6, 1.0),
            "lid_tighten": (0.2, 0.5),
            "lid_raise": (0.0, 0.4),
            "jaw_drop": (0.35, 0.7),
            "upper_lip_raise": (0.1, 0.4),
        },
    ),
    (
        "surprise",
        1.0,
        {"brow_raise": (0.6, 1.0), "lid_raise": (0.5, 1.0), "jaw_drop": (0.4, 1.0)},
    ),
    (
        "disgust",
        1.0,
        {
            "nose_wrinkle": (0.5, 1.0),
            "upper_lip_raise": (0.5, 1.0),
            "brow_lower": (0.3, 0.7),
            "lid_tighten": (0.1, 0.5),
            "corner_down": (0.1, 0.4),
            "cheek_raise": (0.1, 0.4),
            "jaw_drop": (0.0, 0.25),
        },
    ),
    (
        "fear",
        1.0,
        {
            "brow_raise": (0.3, 0.7),
            "brow_inner": (0.4, 0.9),
            "brow_lower": (0.15, 0.4),
            "lid_raise": (0.5, 1.0),
            "lip_stretch": (0.5, 1.0),
            "jaw_drop": (0.15, 0.7),
            "corner_down": (0.0, 0.3),
        },
    ),
]


def _variant_tables() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(class index per variant, cumulative weight within class, low table, high table)."""
    n = len(_VARIANTS)
    cls = torch.zeros(n, dtype=torch.long)
    cum = torch.zeros(n)
    lo = torch.zeros(n, len(ACTIONS))
    hi = torch.zeros(n, len(ACTIONS))
    running: dict[str, float] = {}
    for i, (name, w, acts) in enumerate(_VARIANTS):
        cls[i] = EMOTIONS.index(name)
        running[name] = running.get(name, 0.0) + w
        cum[i] = running[name]
        for act, (a, b) in acts.items():
            lo[i, A[act]], hi[i, A[act]] = a, b
    return cls, cum, lo, hi


_CLS, _CUM, _LO, _HI = _variant_tables()


def apex_actions(
    labels: torch.Tensor, intensity: torch.Tensor, g: torch.Generator, leak: float = 0.12
) -> torch.Tensor:
    """B x A action strengths at the apex: the class variant, scaled by each clip's intensity.

    `leak` adds small random actions of any kind, so neutral faces are never perfectly still and
    no class is a clean template.
    """
    b = len(labels)
    pick = torch.rand(b, generator=g)
    variant = torch.zeros(b, dtype=torch.long)
    for c in range(len(EMOTIONS)):
        idx = (c == _CLS).nonzero().flatten()
        mine = labels == c
        total = _CUM[idx[-1]]
        # the first variant whose cumulative weight exceeds the draw
        choice = (pick[:, None] * total >= _CUM[idx][None, :]).sum(1).clamp(max=len(idx) - 1)
        variant = torch.where(mine, idx[choice], variant)
    u = torch.rand(b, len(ACTIONS), generator=g)
    apex = _LO[variant] + u * (_HI[variant] - _LO[variant])
    apex = apex * intensity[:, None]
    noise = torch.rand(b, len(ACTIONS), generator=g) * leak
    noise = noise * (torch.rand(b, len(ACTIONS), generator=g) < 0.3)
    return apex + noise


def _smoothstep(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def envelope(
    times: torch.Tensor, duration: float, onset: tuple[float, float], g: torch.Generator
) -> torch.Tensor:
    """B x T expression strength in [0, 1]: onset, rise, apex hold and offset at random times."""
    b = times.shape[0]
    r = torch.rand(b, 4, generator=g)
    t_on = (onset[0] + r[:, 0] * (onset[1] - onset[0])) * duration
    rise = 0.15 + 0.45 * r[:, 1]
    hold = 0.6 + 1.5 * r[:, 2]
    fall = 0.3 + 0.6 * r[:, 3]
    t = times
    up = _smoothstep((t - t_on[:, None]) / rise[:, None])
    down = 1.0 - _smoothstep((t - (t_on + rise + hold)[:, None]) / fall[:, None])
    return up * down


def blinks(times: torch.Tensor, duration: float, rate: float, g: torch.Generator) -> torch.Tensor:
    """B x T eyelid closure in [0, 1] from up to three blinks at random times (~0.15 s each)."""
    b = times.shape[0]
    k = 3
    when = torch.rand(b, k, generator=g) * (duration + 0.4) - 0.2
    on = torch.rand(b, k, generator=g) < (rate * duration / k)
    d = (times[:, :, None] - when[:, None, :]) / 0.07
    close = torch.exp(-d * d) * on[:, None, :]
    return close.sum(-1).clamp(max=1.0)


def talking(
    times: torch.Tensor, prob: float, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(jaw, stretch) B x T mouth movement of speech, unrelated to the emotion, in some clips."""
    b = times.shape[0]
    r = torch.rand(b, 6, generator=g)
    on = (r[:, 0] < prob).float()
    amp = (0.1 + 0.3 * r[:, 1]) * on
    f = 2.5 + 3.0 * r[:, 2]  # syllables per second
    phase = r[:, 3] * 2 * math.pi
    f2 = 0.7 + 0.8 * r[:, 4]
    syll = 0.5 + 0.5 * torch.sin(2 * math.pi * f[:, None] * times + phase[:, None])
    gate = (0.5 + 0.5 * torch.sin(2 * math.pi * f2[:, None] * times + 3 * phase[:, None])).sqrt()
    jaw = amp[:, None] * syll * syll * gate
    stretch = 0.3 * amp[:, None] * torch.sin(2 * math.pi * 0.6 * f[:, None] * times + r[:, 5, None])
    return jaw, stretch


# Head movement that goes with each expression, at the apex (image units; yaw in feature-shift
# units with a random side): happy bobs with laughter, sad drops the head, anger pushes it
# forward, surprise and fear pull it back (fear also turns away), disgust turns away.
#            cy     scale   |yaw|  bob
_BODY = torch.tensor(
    [
        [0.00, 0.00, 0.0, 0.03],  # happy
        [0.06, -0.02, 0.0, 0.0],  # sad
        [0.00, 0.00, 0.0, 0.0],  # neutral
        [0.02, 0.06, 0.0, 0.0],  # angry
        [-0.04, -0.07, 0.0, 0.0],  # surprise
        [-0.02, -0.03, 1.0, 0.0],  # disgust
        [-0.02, -0.06, 0.6, 0.0],  # fear
    ]
)


def body_motion(
    labels: torch.Tensor,
    intensity: torch.Tensor,
    env: torch.Tensor,
    times: torch.Tensor,
    g: torch.Generator,
) -> dict[str, torch.Tensor]:
    """B x T offsets of head position, scale and yaw that accompany the expression."""
    b = len(labels)
    row = _BODY[labels] * (intensity * (0.5 + torch.rand(b, generator=g)))[:, None]
    side = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    phase = torch.rand(b, 1, generator=g) * 2 * math.pi
    bob = row[:, 3:4] * torch.sin(2 * math.pi * 3.0 * times + phase)
    return {
        "cy": (row[:, 0:1] + bob) * env,
        "scale": row[:, 1:2] * env,
        "yaw": (row[:, 2:3] * side[:, None]) * env,
    }
