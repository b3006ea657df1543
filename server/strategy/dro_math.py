"""The maths of the DRO weighting over sources, as pure functions on numpy arrays.

lambda is a point of the capped simplex {lambda_k >= 0, sum lambda = 1, lambda_k <= cap}; every
function takes and returns arrays aligned with the strategy's ordered list of training sources.
No Flower import: these are tested by hand computation (tests/test_dro_math.py).

One DRO update (`update_lambda`) is: clip the reported losses, fill the losses of silent sources
from memory when the mode needs every source's loss, take the mode's step, mix toward the prior
(lambda <- (1 - eps) lambda + eps p), project onto the capped simplex (KL projection for the
multiplicative modes, Euclidean for the projected-gradient ones), then shorten the move so no
weight changes by more than `max_step` in one round (`limit_step`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from hdf.config.schema import DROSettingsConfig
from hdf.registry import Registry

_D = DROSettingsConfig  # the schema holds the defaults (hdf/config/schema.py, strategy.dro)


@dataclass(frozen=True)
class DROSettings:
    """Settings common to every mode (docs/design.md §4); meanings and defaults: the schema."""

    eta: float = _D.eta
    eps: float = _D.eps
    cap: float = _D.cap
    loss_clip: float = _D.loss_clip
    tau: float = _D.tau
    alpha: float = _D.alpha
    max_step: float = _D.max_step


# ---- projections ----------------------------------------------------------------------------
def _check_cap(k: int, cap: float) -> None:
    if cap * k < 1.0 - 1e-12:
        raise ValueError(f"cap {cap} is below 1/K = {1.0 / k:.4f}: no weighting can satisfy it")


def project_capped_simplex(w: np.ndarray, cap: float) -> np.ndarray:
    """Nearest point in KL divergence of the capped simplex to positive weights `w`.

    Weights above the cap are set to it and the rest rescaled to take up the remaining mass,
    repeated until nothing exceeds the cap (at most K passes).
    """
    w = np.asarray(w, dtype=np.float64)
    k = len(w)
    if k == 0:
        return w
    _check_cap(k, cap)
    w = np.clip(w, 0.0, None)
    if w.sum() <= 0:
        w = np.ones(k)
    w = w / w.sum()
    capped = np.zeros(k, dtype=bool)
    for _ in range(k):
        free = ~capped
        rest = 1.0 - cap * capped.sum()
        mass = w[free].sum()
        out = np.where(capped, cap, w * (rest / mass if mass > 0 else 0.0))
        if mass <= 0:  # every uncapped weight is zero: share the rest evenly
            out[free] = rest / free.sum()
        over = (out > cap + 1e-12) & free
        if not over.any():
            return out
        capped |= over
    return np.minimum(out, cap)


def project_capped_simplex_euclid(v: np.ndarray, cap: float) -> np.ndarray:
    """Euclidean projection of any real vector `v` onto the capped simplex.

    The minimiser of ||x - v||^2 over {0 <= x_k <= cap, sum x = 1} is x_k = clip(v_k - theta, 0,
    cap) for the one theta where the sum is 1 (KKT conditions). The sum is piecewise linear and
    non-increasing in theta with kinks at v_k - cap and v_k, so theta is found exactly by sorting
    the kinks and interpolating on the segment that crosses 1. With cap = 1 this is the usual
    simplex projection (AFL, DRFA).
    """
    v = np.asarray(v, dtype=np.float64)
    k = len(v)
    if k == 0:
        return v
    _check_cap(k, cap)
    cap = min(cap, 1.0)

    def total(theta: float) -> float:
        return float(np.clip(v - theta, 0.0, cap).sum())

    kinks = np.sort(np.concatenate([v - cap, v]))
    # total() is k*cap >= 1 at the first kink and 0 at the last: find the segment crossing 1.
    lo, hi = kinks[0], kinks[-1]
    for a, b in pairwise(kinks):
        if total(a) >= 1.0 >= total(b):
            lo, hi = a, b
            break
    t_lo, t_hi = total(lo), total(hi)
    theta = lo if t_lo == t_hi else lo + (t_lo - 1.0) * (hi - lo) / (t_lo - t_hi)
    x = np.clip(v - theta, 0.0, cap)
    return x / x.sum()  # removes rounding error only


def mix_prior(lam: np.ndarray, prior: np.ndarray, eps: float) -> np.ndarray:
    """lambda <- (1 - eps) * lambda + eps * prior: keeps every source in play."""
    return (1.0 - eps) * lam + eps * prior


def clip_losses(losses: np.ndarray, bound: float) -> np.ndarray:
    """Losses above `bound` count as `bound`, so one extreme value cannot blow lambda up.

    A negative or non-finite loss is an error here, not something to clip: the server rejects
    such replies (server/validation.py) before a loss reaches the maths.
    """
    losses = np.asarray(losses, dtype=np.float64)
    if np.isinf(losses).any() or (losses < 0).any():  # NaN (unknown) passes: NaN < 0 is False
        raise ValueError(f"losses must be finite and >= 0 (NaN for unknown), got {losses}")
    return np.minimum(losses, bound)


def limit_step(old: np.ndarray, new: np.ndarray, max_step: float) -> np.ndarray:
    """old + t (new - old) with the largest t <= 1 that moves no weight by more than `max_step`.

    Both ends lie on the capped simplex, which is convex, so every point between does too: the
    bound keeps lambda a valid weighting while a lying or noisy round can move it only so far.
    """
    if max_step <= 0:
        raise ValueError(f"max_step must be > 0, got {max_step}")
    delta = np.asarray(new, np.float64) - np.asarray(old, np.float64)
    largest = float(np.abs(delta).max()) if delta.size else 0.0
    if largest <= max_step:
        return np.asarray(new, np.float64)
    return np.asarray(old, np.float64) + (max_step / largest) * delta


def on_capped_simplex(lam: np.ndarray, cap: float, tol: float = 1e-9) -> bool:
    """Whether `lam` is a valid weighting: finite, >= 0, <= cap, summing to 1."""
    lam = np.asarray(lam, np.float64)
    return bool(
        np.isfinite(lam).all()
        and (lam >= -tol).all()
        and (lam <= cap + tol).all()
        and abs(lam.sum() - 1.0) <= 1e-6
    )


def fill_losses(losses: np.ndarray, mask: np.ndarray, memory: np.ndarray | None) -> np.ndarray:
    """Every source's loss: this round's where reported, else the last known one (`memory`,
    NaN for never), else the mean of the known ones (no evidence either way)."""
    out = np.where(mask, losses, np.nan if memory is None else memory).astype(np.float64)
    known = np.isfinite(out)
    if not known.any():
        return np.zeros_like(out)
    return np.where(known, out, out[known].mean())


# ---- the modes: (lam, losses, mask, prior, settings) -> lambda before mixing and projection --
def eg_step(
    lam: np.ndarray, losses: np.ndarray, mask: np.ndarray, prior: np.ndarray, s: DROSettings
) -> np.ndarray:
    """Exponentiated gradient (Group DRO): lambda_k <- lambda_k * exp(eta * loss_k), normalised.

    Only sources that reported this round (`mask`) move (`keep_absent` holds the others).
    """
    logits = np.log(np.maximum(lam, 1e-300)) + s.eta * np.where(mask, losses, 0.0)
    w = np.exp(logits - logits.max())
    return w / w.sum()


def kl_step(
    lam: np.ndarray, losses: np.ndarray, mask: np.ndarray, prior: np.ndarray, s: DROSettings
) -> np.ndarray:
    """KL-regularised worst case: argmax_q sum q_k L_k - tau KL(q || p) = p * exp(L / tau) / Z.

    A closed form of the current losses, not of lambda: every source needs a loss, so the
    strategy passes silent sources' last known loss (`fill_losses`).
    """
    logits = np.log(np.maximum(prior, 1e-300)) + losses / s.tau
    w = np.exp(logits - logits.max())
    return w / w.sum()


def cvar_step(
    lam: np.ndarray, losses: np.ndarray, mask: np.ndarray, prior: np.ndarray, s: DROSettings
) -> np.ndarray:
    """CVaR_alpha: the worst alpha-share of the prior mass, each source at most p_k / alpha.

    Sources sorted by loss (worst first; ties by index) take p_k / alpha until the mass is 1; the
    last one takes the remainder (fractional at the boundary). Uniform prior: 1/(alpha K) on the
    worst floor(alpha K) sources and the rest on the next. Closed form like `kl_step`.
    """
    if not 0.0 < s.alpha <= 1.0:
        raise ValueError(f"CVaR alpha must be in (0, 1], got {s.alpha}")
    order = np.argsort(-losses, kind="stable")
    out = np.zeros(len(losses))
    rest = 1.0
    for k in order:
        take = min(prior[k] / s.alpha, rest)
        out[k] = take
        rest -= take
        if rest <= 1e-15:
            break
    return out / out.sum()


def afl_step(
    lam: np.ndarray, losses: np.ndarray, mask: np.ndarray, prior: np.ndarray, s: DROSettings
) -> np.ndarray:
    """AFL projected gradient ascent: lambda + eta * loss, Euclidean-projected onto the capped
    simplex (the gradient of sum lambda_k L_k in lambda is L; silent sources get 0)."""
    return project_capped_simplex_euclid(lam + s.eta * np.where(mask, losses, 0.0), s.cap)


def regret_step(
    lam: np.ndarray, excess: np.ndarray, mask: np.ndarray, prior: np.ndarray, s: DROSettings
) -> np.ndarray:
    """Minimax regret (Agarwal & Zhang 2022): exponentiated gradient on each source's *excess*
    loss, lambda_k <- lambda_k * exp(eta * max(L_k - R_k, 0)), normalised.

    R_k is what source k reaches on its own (`excess_loss` forms the excess). A source that
    nothing fits has L_k close to R_k: its excess is near 0, so its weight is not raised, where
    plain EG would keep raising it for a loss no mixture can lower.
    """
    return eg_step(lam, np.clip(excess, 0.0, None), mask, prior, s)


def excess_loss(losses: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """max(L_k - R_k, 0): the global model's loss above what the source reaches on its own.

    Clipped at 0 from below: a source the global model serves as well as its own model does
    (or better) has no excess and gains no weight from it.
    """
    diff = np.asarray(losses, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    return np.clip(diff, 0.0, None)


def ema(previous: np.ndarray, new: np.ndarray, mask: np.ndarray, beta: float) -> np.ndarray:
    """Exponential moving average across rounds of the signal that moves lambda.

    s_k <- beta * s_k + (1 - beta) * new_k for sources that reported (`mask`); a source's first
    value is taken as it is (no pull toward 0); silent sources keep theirs. beta = 0 is no
    smoothing.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"smoothing beta must be in [0, 1), got {beta}")
    prev = np.asarray(previous, dtype=np.float64)
    new = np.asarray(new, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    mixed = np.where(np.isfinite(prev), beta * prev + (1.0 - beta) * new, new)
    return np.where(mask, mixed, prev)


DROStep = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, DROSettings], np.ndarray]
ESTIMATES = ("sample", "val")


@dataclass(frozen=True)
class DROMode:
    """One registered lambda update.

    step : the pure update (lam, losses, mask, prior, settings) -> lambda on the simplex.
    closed_form : the step needs every source's loss; silent ones come from the loss memory.
    projection : "kl" (rescale, for multiplicative steps) or "euclid" (for additive steps).
    sample_by_lambda : clients are sampled proportionally to lambda and averaged uniformly (DRFA).
    estimate : which per-source loss the step sees by default: "sample" (the global model on a
        fixed training sample, `loss-before`) or "val" (its validation loss from the last
        evaluation).
    excess : the step moves on the excess over each source's own local-model validation loss
        (`excess_loss`); clients must report `local-val-loss`, and the estimate must be "val".
    """

    step: DROStep
    closed_form: bool = False
    projection: str = "kl"
    sample_by_lambda: bool = False
    estimate: str = "sample"
    excess: bool = False


DRO_MODES: Registry[DROMode] = Registry("DRO mode", "set strategy.dro.mode=<name>")
register_mode = DRO_MODES.add
get_mode = DRO_MODES.lookup


register_mode("eg", DROMode(eg_step))
register_mode("kl", DROMode(kl_step, closed_form=True))
register_mode("cvar", DROMode(cvar_step, closed_form=True))
register_mode("afl", DROMode(afl_step, projection="euclid"))
# DRFA: AFL's projected ascent on lambda, clients sampled by lambda (Deng et al. 2020, Alg. 1).
register_mode("drfa", DROMode(afl_step, projection="euclid", sample_by_lambda=True, estimate="val"))
# Regret: EG on the excess of the global model's validation loss over the local model's.
register_mode("regret", DROMode(regret_step, estimate="val", excess=True))


def keep_absent(step: np.ndarray, lam: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sources that did not report keep their weight; the reporters share the rest of the mass
    in the proportions the step gave them.

    A silent source carries no loss, so a step that treats it as loss 0 would cut its weight
    (by exp(-eta * mean loss) in EG) for being offline, not for being well served
    (docs/design.md §4: a lost site's lambda is kept).
    """
    if mask.all() or not mask.any():
        return step
    out = lam.copy()
    reporters = step[mask].sum()
    share = 1.0 - lam[~mask].sum()
    out[mask] = step[mask] * (share / reporters) if reporters > 0 else share / mask.sum()
    return out


def update_lambda(
    mode: str,
    lam: np.ndarray,
    losses: np.ndarray,
    mask: np.ndarray,
    prior: np.ndarray,
    s: DROSettings,
    memory: np.ndarray | None = None,
) -> np.ndarray:
    """One DRO update: mode step on clipped losses, prior mixing, the capped projection, and
    the per-round bound on the move (`limit_step`; `lam` must be on the capped simplex).

    `mask` marks the sources that reported this round; `memory` holds the last known loss of
    every source (NaN for never) and is used by the closed-form modes only.
    """
    m = get_mode(mode)
    losses = clip_losses(np.asarray(losses, dtype=np.float64), s.loss_clip)
    mask = np.asarray(mask, dtype=bool)
    if m.closed_form:
        mem = None if memory is None else clip_losses(np.asarray(memory, np.float64), s.loss_clip)
        losses = fill_losses(losses, mask, mem)
        mask = np.ones_like(mask)
    elif not mask.any():
        return np.asarray(lam, dtype=np.float64).copy()  # nothing reported: nothing moves
    lam = np.asarray(lam, dtype=np.float64)
    step = m.step(lam, losses, mask, prior, s)
    if not m.closed_form:
        step = keep_absent(step, lam, mask)
    mixed = mix_prior(step, prior, s.eps)
    if m.projection == "euclid":
        projected = project_capped_simplex_euclid(mixed, s.cap)
    else:
        projected = project_capped_simplex(mixed, s.cap)
    return limit_step(lam, projected, s.max_step)


def sample_by_weight(weights: np.ndarray, draws: int, seed: int) -> np.ndarray:
    """Counts of `draws` samples with replacement from `weights` (DRFA's client sampling).

    A uniform average over the draws weights source k by count_k / draws, whose expectation is
    lambda_k: the sampled average is an unbiased estimate of the lambda-weighted mix.
    """
    p = np.asarray(weights, dtype=np.float64)
    p = p / p.sum()
    rng = np.random.default_rng(seed)
    return rng.multinomial(draws, p)


__all__ = [
    "DRO_MODES",
    "DROMode",
    "DROSettings",
    "afl_step",
    "cvar_step",
    "eg_step",
    "ema",
    "excess_loss",
    "fill_losses",
    "kl_step",
    "limit_step",
    "on_capped_simplex",
    "project_capped_simplex",
    "project_capped_simplex_euclid",
    "regret_step",
    "sample_by_weight",
    "update_lambda",
]
