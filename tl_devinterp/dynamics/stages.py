"""Developmental stages from the LLC curve, defined on the curve (not on the checkpoint grid) and its noise.

1. Smooth in log-step with one fixed width. At each point g of an even grid in x = log(step + offset), a
   line is fitted to the checkpoints by weighted least squares, weights exp(−(x_i − g)²/2σ²) / se_i²
   (a local-linear kernel smoother). Its value is the smoothed λ̂(g) and its slope dλ̂/dx(g); both are
   linear in the data, so their standard errors follow from the checkpoints' SEs. Where checkpoints are
   sparser than σ the fit is the straight line through the nearest ones; where they crowd (the close pairs
   a merged log + linear schedule makes, 208/214) their noisy slope carries its large SE: neither the
   width nor the rule depends on the spacing.
2. Boundaries. Candidates are the local minima of |dλ̂/dx| on the grid: critical points (λ̂ peaks or
   troughs) and plateaus (a rise or fall pauses), at least 2σ from either end. A candidate stays only
   when, on each side (up to the neighbouring candidate), some point's slope differs from the candidate's
   by more than `z` standard errors and by `min_prominence` × max|slope|: where the slope's sign flips,
   its distance from 0; else the fall of |slope| down to the candidate. The weakest candidate is dropped
   and its neighbours re-tested until every boundary passes; a boundary sits at the middle of the run of
   points whose |slope| is within one SE of its minimum (a plateau's middle). On a monotone curve the
   slope never dips significantly: one stage. z = 4 because the slope is tested at many correlated grid
   points: at z = 3 about 1 in 9 noisy monotone curves on the demo's 30-checkpoint grid got a boundary.
3. Types. A stage where the smoothed λ̂ rises from its start to its end is type A (new structure), where
   it falls type B (compression). With the rule above each stage's change exceeds the noise in the
   direction of its type.

`se` (one standard error per checkpoint, e.g. the std across chains / √chains) defaults to the scatter of
the checkpoints about the smoothed curve. Boundaries come out at the nearest checkpoint.

On the paper's two-layer language model (`tests/data/paper_l2_llc.csv`, 500 checkpoints 0..49.9k, SE from
the scatter) the defaults give boundaries at 800, 6.3k, 8.5k and 18.3k steps, types A, A, B, A, A; the
published ones are 900, 6.5k, 8.5k and 17.5k. Its published std across chains (≈ 20) is far above the
checkpoint-to-checkpoint scatter (the chains' errors are shared between checkpoints), and with it as SE no
boundary is significant: pass the SE that describes differences along the curve.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from jaxtyping import Float
from scipy.signal import find_peaks


@dataclass(frozen=True)
class Stage:
    """Training steps [start, end] of one stage; type "A" (LLC rises) or "B" (LLC falls)."""

    start: int
    end: int
    type: str


def stages_frame(stages: Sequence[Stage]) -> pd.DataFrame:
    """One row per stage: stage (1-based), start, end, type."""
    frame = pd.DataFrame([asdict(s) for s in stages], columns=["start", "end", "type"])
    frame.insert(0, "stage", np.arange(1, len(frame) + 1))
    return frame


@dataclass
class LogCurve:
    """A curve smoothed on an even grid in x = log(step + offset), with standard errors."""

    steps: Float[np.ndarray, "G"]
    logt: Float[np.ndarray, "G"]
    smooth: Float[np.ndarray, "G"]
    smooth_se: Float[np.ndarray, "G"]
    slope: Float[np.ndarray, "G"]  # d smooth / d logt
    slope_se: Float[np.ndarray, "G"]
    noise: Float[np.ndarray, "N"]  # the SE used for each checkpoint


def smooth_log_curve(
    steps: Sequence[int], values: Sequence[float], se: Sequence[float] | None = None, *, sigma: float = 0.1,
    offset: float | None = None, n_grid: int = 512,
) -> LogCurve:
    """`values` smoothed by a local-linear Gaussian kernel of fixed width `sigma` in log-step (step 1 of the
    module docstring). `offset` defaults to the first positive step when the series starts at step 0 (so
    step 0 sits one checkpoint spacing before it in log space), else 0."""
    steps, values = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    if steps.ndim != 1 or steps.shape != values.shape or len(steps) < 4:
        raise ValueError(f"steps and values must be 1-D of equal length >= 4; got {steps.shape} and {values.shape}.")
    if not np.isfinite(values).all():
        raise ValueError("values contain NaN or inf; drop those checkpoints first.")
    if (np.diff(steps) <= 0).any():
        raise ValueError("steps must be strictly increasing.")
    if sigma <= 0:
        raise ValueError(f"sigma (smoothing width in log-step units) must be > 0, got {sigma}.")
    if se is not None:
        se = np.asarray(se, dtype=float)
        if se.shape != values.shape or not (np.isfinite(se) & (se > 0)).all():
            raise ValueError(f"se must hold one finite, positive standard error per checkpoint ({len(values)}).")
    if offset is None:
        offset = steps[1] if steps[0] == 0 else 0.0
    if steps[0] + offset <= 0:
        raise ValueError(f"log(step + offset) needs step + offset > 0; got first step {steps[0]}, offset {offset}.")
    x = np.log(steps + offset)
    grid = np.linspace(x[0], x[-1], n_grid)

    def fit(at: np.ndarray, noise: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the linear maps data -> value and data -> slope of the local line at each point `at`.
        Coordinates are taken from the nearest checkpoint, so far ones keep their (tiny) weight exactly."""
        logw = -0.5 * ((x[None, :] - at[:, None]) / sigma) ** 2
        near = logw.argmax(1)
        w = np.exp(logw - logw[np.arange(len(at)), near][:, None]) / noise**2  # scaled per row: same fit
        v = x[None, :] - x[near][:, None]
        s0 = w.sum(1, keepdims=True)
        u = v - (w * v).sum(1, keepdims=True) / s0  # centred on the weighted mean
        suu = (w * u**2).sum(1, keepdims=True)
        if not (suu > 0).all():
            raise ValueError(f"sigma={sigma} is too narrow for the gaps between checkpoints (the local line "
                             f"rests on one of them); raise sigma.")
        slope = w * u / suu
        at_v = (at - x[near])[:, None] - (w * v).sum(1, keepdims=True) / s0  # the point, in centred coordinates
        return w / s0 + at_v * slope, slope

    noise = se
    if noise is None:  # the scatter of the checkpoints about a unit-weight fit, one SE for all
        value_rows, _ = fit(x, np.ones_like(x))
        resid = values - value_rows @ values
        dof = max(1.0, len(x) - np.trace(value_rows))
        noise = np.full_like(x, max(np.sqrt(resid @ resid / dof), 1e-12 * np.abs(values).max()))
    value_rows, slope_rows = fit(grid, noise)
    return LogCurve(
        steps=np.exp(grid) - offset, logt=grid, smooth=value_rows @ values, smooth_se=np.sqrt(value_rows**2 @ noise**2),
        slope=slope_rows @ values, slope_se=np.sqrt(slope_rows**2 @ noise**2), noise=noise,
    )


def find_stages(
    steps: Sequence[int],
    llc: Sequence[float],
    se: Sequence[float] | None = None,
    *,
    sigma: float = 0.1,
    z: float = 4.0,
    min_prominence: float = 0.05,
    offset: float | None = None,
) -> list[Stage]:
    """Stages of a training run from its LLC curve (see the module docstring for the rule).

    `se`: each checkpoint's standard error (default: the curve's scatter); `sigma`: the smoothing width in
    log-step units (0.1 ≈ a 10% change of step); `z`: how many standard errors |dλ̂/dlog t| must fall to
    a boundary from each side. Stages cover steps[0]..steps[-1], boundaries at the nearest checkpoint.
    """
    if z < 0:
        raise ValueError(f"z (standard errors a boundary's dip must exceed) must be >= 0, got {z}.")
    steps = np.asarray(steps)
    c = smooth_log_curve(steps, llc, se, sigma=sigma, offset=offset)
    speed = np.abs(c.slope)
    inside = (c.logt - c.logt[0] >= 2 * sigma) & (c.logt[-1] - c.logt >= 2 * sigma)  # a stage spans 2 widths
    cuts = [b for b in find_peaks(-speed)[0] if inside[b]]
    floor = min_prominence * speed.max()

    def evidence(i: int) -> float:
        """How many SEs the slope moves between boundary i and the most significant point on each side
        (up to the neighbouring boundaries), the smaller of the two. Where the slope's sign flips across
        i, the move is the slope's distance from 0; else the fall of |slope| down to i."""
        b, edges = cuts[i], [0, *cuts, len(speed) - 1]
        sides = [np.arange(edges[i], b), np.arange(b + 1, edges[i + 2] + 1)]
        score = np.inf
        for side, other in (sides, sides[::-1]):
            flips = np.sign(c.slope[side]) != np.sign(c.slope[other][np.argmax(speed[other] / c.slope_se[other])])
            dip = speed[side] - np.where(flips, 0.0, speed[b])
            z_side = dip / np.where(flips, c.slope_se[side], np.hypot(c.slope_se[side], c.slope_se[b]))
            score = min(score, float(np.max(np.where(dip >= floor, z_side, 0.0))))
        return score

    while cuts:  # drop the weakest boundary until every one rests on a dip larger than the noise
        scores = [evidence(i) for i in range(len(cuts))]
        if min(scores) >= z:
            break
        cuts.pop(int(np.argmin(scores)))
    cuts = [_valley_middle(speed, c.slope_se, b) for b in cuts]
    idx = np.unique([0, *(int(np.abs(steps - c.steps[b]).argmin()) for b in cuts), len(steps) - 1])
    level = np.interp(steps, c.steps, c.smooth)
    return [Stage(int(steps[a]), int(steps[b]), "A" if level[b] > level[a] else "B") for a, b in zip(idx[:-1], idx[1:])]


def _valley_middle(speed: np.ndarray, se: np.ndarray, b: int) -> int:
    """The middle of the run of grid points around minimum `b` whose |slope| is within one SE of it: a
    plateau's boundary sits at the plateau's middle, a sharp peak's at the peak."""
    close = speed - speed[b] <= np.hypot(se, se[b])
    lo = hi = b
    while lo > 0 and close[lo - 1]:
        lo -= 1
    while hi < len(speed) - 1 and close[hi + 1]:
        hi += 1
    return (lo + hi) // 2
