"""Developmental stages from the LLC curve.

λ̂ is resampled on an even grid in log(step + offset), smoothed there with a Gaussian of width `sigma`
(in log-step units; wider where checkpoints are sparser than that, so it always averages a few of them) and
differentiated. Stage boundaries are the local minima of |dλ̂/dlog t| whose prominence is at least
`min_prominence` × max|dλ̂/dlog t|: critical points (λ̂ peaks or troughs, where the derivative is zero) and
plateaus (where the rise or fall pauses). Minima within two Gaussian widths of either end are dropped, since
the Gaussian is cut there. A stage where λ̂ rises is type A (new structure), where it falls type B
(compression). Boundaries come out at the nearest checkpoint.

On synthetic curves piecewise linear in log-step (1001 checkpoints, noise sd 0.2% of the range) peaks,
troughs and plateau middles are recovered within a factor 1.15 of the step; at noise sd 0.4% a spurious
boundary starts to appear: `min_prominence` = 0.05 sits near that noise floor; raise it for noisier curves.

On the paper's two-layer language model (`paper_l2_llc.csv`, 500 checkpoints 0..49.9k) the defaults give
boundaries at 800, 6.4k, 8.6k and 18.5k steps, stage types A, A, B, A, A; the published boundaries are 900,
6.5k, 8.5k and 17.5k (each within a factor 1.13 of the step). The weakest, 17.5k (where the rise slows),
needs min_prominence <= 0.07 and sigma in [0.06, 0.12].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from jaxtyping import Float
from scipy.signal import find_peaks

from .essential import gaussian_smooth

MIN_SPACINGS = 3.0  # the Gaussian spans at least this many checkpoint spacings where checkpoints are sparse


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
    """A curve resampled on an even grid in log(step + offset) and smoothed there."""

    steps: Float[np.ndarray, "G"]
    logt: Float[np.ndarray, "G"]
    width: Float[np.ndarray, "G"]  # the Gaussian's σ in log-step at each grid point
    smooth: Float[np.ndarray, "G"]
    slope: Float[np.ndarray, "G"]  # d smooth / d logt


def smooth_log_curve(
    steps: Sequence[int], values: Sequence[float], *, sigma: float = 0.1, offset: float | None = None,
    n_grid: int = 1024,
) -> LogCurve:
    """`values` smoothed on an even log-step grid with a Gaussian of width max(sigma, MIN_SPACINGS × the
    local checkpoint spacing), so that where checkpoints are sparse (early, on a linear schedule) the noise of
    single checkpoints is averaged too.

    `offset` defaults to the first positive step when the series starts at step 0 (so step 0 sits one
    checkpoint spacing before it in log space), else 0.
    """
    steps, values = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    if steps.ndim != 1 or steps.shape != values.shape or len(steps) < 4:
        raise ValueError(f"steps and values must be 1-D of equal length >= 4; got {steps.shape} and {values.shape}.")
    if not np.isfinite(values).all():
        raise ValueError("values contain NaN or inf; drop those checkpoints first.")
    if (np.diff(steps) <= 0).any():
        raise ValueError("steps must be strictly increasing.")
    if sigma <= 0:
        raise ValueError(f"sigma (smoothing width in log-step units) must be > 0, got {sigma}.")
    if offset is None:
        offset = steps[1] if steps[0] == 0 else 0.0
    if steps[0] + offset <= 0:
        raise ValueError(f"log(step + offset) needs step + offset > 0; got first step {steps[0]}, offset {offset}.")
    x = np.log(steps + offset)
    grid = np.linspace(x[0], x[-1], n_grid)
    width = np.maximum(sigma, MIN_SPACINGS * np.interp(grid, (x[1:] + x[:-1]) / 2, np.diff(x)))
    smooth = gaussian_smooth(np.interp(grid, x, values), width / (grid[1] - grid[0]))
    return LogCurve(np.exp(grid) - offset, grid, width, smooth, np.gradient(smooth, grid))


def find_stages(
    steps: Sequence[int],
    llc: Sequence[float],
    *,
    sigma: float = 0.1,
    min_prominence: float = 0.05,
    offset: float | None = None,
) -> list[Stage]:
    """Stages of a training run from its LLC curve (see the module docstring for the rule).

    `sigma`: Gaussian width in log-step units (0.1 ≈ a 10% change of step); `min_prominence`: how deep a
    minimum of |dλ̂/dlog t| must be, as a fraction of its maximum, to be a boundary. Boundaries are reported
    at the nearest checkpoint; stages cover steps[0]..steps[-1].
    """
    if not 0 <= min_prominence <= 1:
        raise ValueError(f"min_prominence is a fraction of max|dλ/dlog t| in [0, 1]; got {min_prominence}.")
    steps = np.asarray(steps)
    c = smooth_log_curve(steps, llc, sigma=sigma, offset=offset)
    speed = np.abs(c.slope)
    minima, _ = find_peaks(-speed, prominence=min_prominence * speed.max())
    inside = (c.logt[minima] - c.logt[0] >= 2 * c.width[minima]) & (c.logt[-1] - c.logt[minima] >= 2 * c.width[minima])
    cuts = np.unique([0, *(int(np.abs(steps - c.steps[m]).argmin()) for m in minima[inside]), len(steps) - 1])
    level = np.interp(steps, c.steps, c.smooth)
    return [
        Stage(int(steps[a]), int(steps[b]), "A" if level[b] > level[a] else "B") for a, b in zip(cuts[:-1], cuts[1:])
    ]
