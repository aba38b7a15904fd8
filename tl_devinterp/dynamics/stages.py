"""Developmental stages from the LLC curve: a piecewise-linear fit in log-step, then boundaries tested against
the checkpoints' standard errors.

1. Fit. λ̂ is fitted by a continuous piecewise-linear function of x = log(step + offset), by weighted least
   squares (weights 1/se²). Knots may sit anywhere (an even grid of candidates in x), at least `min_width`
   apart and from the ends, and at most one per gap between neighbouring checkpoints (two would bend the
   line where no checkpoint constrains it; a merged log + linear grid's close pairs cannot make a zigzag).
   They are added greedily where they lower χ² most, while they lower it by more than KNOT_COST = 6, and
   dropped while one costs less; after each addition or removal every knot moves in turn to its best place
   (a burst's two bends are found only so: the first knot lands in the burst's middle). KNOT_COST: a knot's
   place is the best of many, so noise alone offers more than Akaike's 4 for two parameters; at 6 a straight
   noisy line gets a knot in ~10% of draws (18–26% at 4). The fit only describes the curve; whether a bend
   is a boundary is step 2.
2. Boundaries. Each piece between knots starts as a stage; a stage's change of λ̂ and its chord slope are
   linear in the data, so their SEs follow from the fit. Boundaries sit where design.md §7 puts them: at
   critical points and at local minima of |dλ̂/dlog t|. A boundary between stages L and R holds when, by
   more than `z` standard errors, either
     - λ̂ turns (a critical point): L and R change in opposite directions, each significantly, and neither
       is a dip (below), or
     - one side is a pause (a plateau, a flat top, a slow stretch between two faster ones): both of that
       stage's neighbours change λ̂ significantly, and `ratio` times faster than it; or it goes against both
       (a fall between two rises) and is a dip: a flat piece in its place, its ends free to move to the
       next knots, fits within KNOT_COST in χ² (the fall does not pay for itself; the fit's own SEs, which
       take the knots as given, call a two-checkpoint noise dip on a plateau 5–7 SE).
   A mere change of speed is no boundary: a rise linear in step speeds up 10⁵-fold over five decades of
   log-step, and a sigmoid burst slows down to the end of the run; neither is a local minimum of the speed,
   so each is one stage whatever the parametrisation. The weakest boundary is removed (its stages merged)
   and the others re-tested until all hold.
3. Plateaus. A stage whose change is within `z` SEs of 0 or below `min_change` × the fitted curve's range,
   or that is a pause, is not a stage of its own (no third type); flat stages in a row are one. Inside the
   run it becomes one boundary, at the middle checkpoint (by index: the grid's own middle, linear or log) of
   the flat piece that fits best there, its ends free to move to the second knots around it (the free fit's
   knots wander along a noisy plateau, its slope being free; a flat piece is what a plateau is; Hoogland et
   al. 2024 put boundaries at plateaus). At an end of the run it joins its neighbour. So each stage's change
   is significant, unless the whole run is one stage.
4. Types and places. A stage over which the fitted λ̂ rises is type A (new structure), one where it falls
   type B (compression). A boundary between two checkpoints goes to the nearer one in log-step.

`se` (one standard error per checkpoint, e.g. the std across chains / √chains) defaults to each
checkpoint's scatter about the line through its neighbours (median over the 21 nearest, / 0.6745). With the
defaults (z = 4, ratio = 3, min_width = 0.1, min_change = 0.02) the demo run (`tests/data/demo_llc.csv`,
its SEs) gives A 0–8, B 8–122 (λ̂ 3.22 → 2.36), A 122–3000 (the burst 7.7 → 18.9 of 1286–1714, where the
previous-token and induction heads form, inside it: the rise speeds up from the trough on and slows down to
the end, with no pause in between). The paper's two-layer language model (`tests/data/paper_l2_llc.csv`, SE
from the scatter) gives boundaries at 800, 6.2k, 8.6k and 14.9k, types A, A, B, A, A; the published ones
are 900, 6.5k, 8.5k and 17.5k. Without `min_change` its small wiggles after 17.5k (significant against the
scatter, whose errors are correlated along the curve) become stages. Its published std across chains
(≈ 20) is far above the checkpoint-to-checkpoint scatter, and with it as SE no boundary is significant:
pass the SE that describes differences along the curve. Measured on synthetic curves: `tests/test_stages.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from jaxtyping import Float

from ..errors import InvalidValueError
from ..options import Declared, Option, check

KNOT_COST = 6.0  # χ² a knot must save to enter the fit, and a dip to be two turns (step 1 and 2 above)


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
class PiecewiseFit:
    """λ̂ ≈ β₀ + β₁x + Σₖ βₖ₊₂ max(0, x − knotₖ), fitted by weighted least squares; `cov` is β's covariance."""

    knots: Float[np.ndarray, "K"]
    beta: Float[np.ndarray, "K+2"]
    cov: Float[np.ndarray, "K+2 K+2"]

    def rows(self, at: np.ndarray) -> np.ndarray:
        """The linear maps β -> fitted λ̂ at the points `at` (so value = rows @ beta, its SE from cov)."""
        return _hinges(np.asarray(at, dtype=float), self.knots)


def _hinges(x: np.ndarray, knots: Sequence[float]) -> np.ndarray:
    return np.column_stack([np.ones_like(x), x, *(np.maximum(0.0, x - k) for k in knots)])


def fit_piecewise_linear(
    x: Float[np.ndarray, "N"], y: Float[np.ndarray, "N"], se: Float[np.ndarray, "N"], *, min_width: float = 0.1,
    n_grid: int = 512,
) -> PiecewiseFit:
    """Continuous piecewise-linear weighted least-squares fit of y(x) with knots chosen by χ² (step 1 of the
    module docstring); `x` increasing."""
    grid = np.linspace(x[0], x[-1], n_grid)[1:-1]
    gap = np.searchsorted(x, grid)  # the gap between checkpoints each candidate knot lies in
    cand = np.maximum(0.0, x[:, None] - grid[None, :]) / se[:, None]  # candidates' hinge columns, weighted
    cand_norm = (cand**2).sum(0)

    def chi2(knots: list[float]) -> float:
        X = _hinges(x, knots) / se[:, None]
        return float(np.sum((y / se - X @ np.linalg.lstsq(X, y / se, rcond=None)[0]) ** 2))

    def best(knots: list[float]) -> tuple[float, float]:
        """The candidate knot that lowers χ² most given `knots`, and by how much: the squared projection of
        the (weighted) residual on its hinge column, made orthogonal to the current fit's columns."""
        q = np.linalg.qr(_hinges(x, knots) / se[:, None])[0]
        resid = y / se - q @ (q.T @ (y / se))
        norm = cand_norm - ((q.T @ cand) ** 2).sum(0)
        apart = np.abs(grid[:, None] - np.r_[x[0], knots, x[-1]][None, :]).min(1) >= min_width
        free = apart & ~np.isin(gap, np.searchsorted(x, knots)) & (norm > 1e-9 * cand_norm)
        gain = np.where(free, resid @ cand, 0.0) ** 2 / np.where(free, norm, 1.0)
        i = int(np.argmax(gain))
        return float(grid[i]), float(gain[i])

    def move(knots: list[float]) -> list[float]:
        """Each knot in turn to its best place given the others, until none moves (χ² can only fall)."""
        for _ in range(3):
            before = list(knots)
            for k in range(len(knots)):
                knots[k] = best(knots[:k] + knots[k + 1:])[0]
            knots.sort()
            if knots == before:
                break
        return knots

    knots: list[float] = []
    while len(knots) < len(x) - 3:  # add the best knot while it pays for itself, the others moving after
        at, gain = best(knots)
        if gain <= KNOT_COST:
            break
        knots = move(sorted([*knots, at]))
    while knots:  # drop knots that no longer pay for themselves, the others moving after
        cost = [chi2(knots[:k] + knots[k + 1:]) for k in range(len(knots))]
        k = int(np.argmin(cost))
        if cost[k] - chi2(knots) > KNOT_COST:
            break
        knots = move(knots[:k] + knots[k + 1:])
    X = _hinges(x, knots)
    w = 1 / se**2
    cov = np.linalg.inv(X.T @ (w[:, None] * X))
    return PiecewiseFit(np.array(knots), cov @ X.T @ (w * y), cov)


STAGE_OPTIONS = {
    "z": Declared(float, option=Option(ge=0, help="standard errors a boundary must exceed the noise by")),
    "ratio": Declared(float, option=Option(gt=1, help="speed-up or slow-down that makes a boundary")),
    "min_width": Declared(float, option=Option(ge=0, help="narrowest stage in log-step")),
    "min_change": Declared(float, option=Option(ge=0, lt=1, help="smallest change of a stage, fraction of λ̂'s range")),
}
"""`find_stages`' options, declared once (`options.Declared`); `AnalysisConfig` gives them as `stage_*`."""


def check_stage_options(z: float, ratio: float, min_width: float, min_change: float, *, prefix: str = "",
                        owner: str = "find_stages") -> None:
    """The one check of `find_stages`' options (`options.check`, its message format); `prefix` and `owner`
    name them as the caller does (`stage_`, AnalysisConfig)."""
    for name, value in dict(z=z, ratio=ratio, min_width=min_width, min_change=min_change).items():
        declared = STAGE_OPTIONS[name]
        check(owner, prefix + name, value, declared.hint, declared.option)


def find_stages(
    steps: Sequence[int],
    llc: Sequence[float],
    se: Sequence[float] | None = None,
    *,
    z: float = 4.0,
    ratio: float = 3.0,
    min_width: float = 0.1,
    min_change: float = 0.02,
    offset: float | None = None,
) -> list[Stage]:
    """Stages of a training run from its LLC curve (see the module docstring for the rule).

    `se`: each checkpoint's standard error (default: the curve's scatter); `z`: standard errors by which a
    boundary's turn or change of speed must exceed the noise; `ratio`: how many times faster one side must
    change than the other for a change of speed; `min_width`: the closest two bends of the fit in log-step
    (0.1 ≈ a 10% change of step); `min_change`: the smallest change of a stage, as a fraction of the fitted
    λ̂'s range; `offset`: x = log(step + offset), default the first positive step when the run starts at 0,
    else 0. Stages cover steps[0]..steps[-1], boundaries at checkpoints.
    """
    steps, llc = np.asarray(steps, dtype=float), np.asarray(llc, dtype=float)
    if steps.ndim != 1 or steps.shape != llc.shape or len(steps) < 4:
        raise InvalidValueError(f"steps and llc must be 1-D of equal length >= 4; got {steps.shape} and {llc.shape}.")
    if not np.isfinite(llc).all():
        raise InvalidValueError("llc contains NaN or inf; drop those checkpoints first.")
    if (np.diff(steps) <= 0).any():
        raise InvalidValueError("steps must be strictly increasing.")
    check_stage_options(z, ratio, min_width, min_change)
    if offset is None:
        offset = steps[1] if steps[0] == 0 else 0.0
    if steps[0] + offset <= 0:
        raise InvalidValueError(f"log(step + offset) needs step + offset > 0; got first step {steps[0]}, offset {offset}.")
    x = np.log(steps + offset)
    se = _scatter(x, llc) if se is None else np.asarray(se, dtype=float)
    if se.shape != llc.shape or not (np.isfinite(se) & (se > 0)).all():
        raise InvalidValueError(f"se must hold one finite, positive standard error per checkpoint ({len(llc)}).")

    fit = fit_piecewise_linear(x, llc, se, min_width=min_width)
    edges = [x[0], *fit.knots, x[-1]]  # stage boundaries in x; stage i is edges[i]..edges[i + 1]

    def change(i: int) -> tuple[np.ndarray, float, float]:
        """Stage i's change of λ̂: the map β -> change, the change and its SE."""
        row = fit.rows(edges[i + 1:i + 2])[0] - fit.rows(edges[i:i + 1])[0]
        return row, float(row @ fit.beta), float(np.sqrt(row @ fit.cov @ row))

    def speed(i: int) -> float:
        """Stage i's |slope| (its chord's)."""
        return abs(change(i)[1]) / (edges[i + 1] - edges[i])

    fit_chi2 = float(np.sum(((llc - fit.rows(x) @ fit.beta) / se) ** 2))

    flat_fits: dict[tuple[float, float], tuple[float, float, float]] = {}

    def flat_fit(k: int, reach: int) -> tuple[float, float, float]:
        """The best fit with a flat piece in place of stage k, its ends free to move up to the `reach`-th
        knot beyond each end (not past the neighbours' far ends): (χ², x₁, x₂)."""
        before, after = fit.knots[fit.knots < edges[k]], fit.knots[fit.knots > edges[k + 1]]
        lo = max(edges[k - 1], before[-reach] if len(before) >= reach else x[0])
        hi = min(edges[k + 2], after[reach - 1] if len(after) >= reach else x[-1])
        if (lo, hi) not in flat_fits:
            flat_fits[lo, hi] = _flat_fit(x, llc, se, fit.knots, lo, hi)
        return flat_fits[lo, hi]

    def against(k: int) -> bool:
        """Stage k changes λ̂ against both neighbours (a fall between two rises, or the reverse)."""
        if k == 0 or k == len(edges) - 2:
            return False
        dl, dk, dr = change(k - 1)[1], change(k)[1], change(k + 1)[1]
        return dl * dr > 0 and dk * dl < 0

    def dip(k: int) -> bool:
        """Stage k goes against both neighbours and a flat piece in its place fits within KNOT_COST in χ² of
        the fit: a plateau the noise tilts, not two turns."""
        return against(k) and flat_fit(k, 1)[0] - fit_chi2 <= KNOT_COST

    def pause(k: int) -> float:
        """How many SEs stage k is a pause by: both neighbours change λ̂ significantly (the smaller of their
        changes in SEs) and either k is a dip, or it does not go against both and they change `ratio` times
        faster than it (point estimates); 0 at an end of the run."""
        if k == 0 or k == len(edges) - 2:
            return 0.0
        slower = min(speed(k - 1), speed(k + 1)) > ratio * speed(k)
        if not (dip(k) if against(k) else slower):
            return 0.0
        return min(abs(change(n)[1]) / change(n)[2] for n in (k - 1, k + 1))

    def strength(i: int) -> float:
        """How many SEs the boundary between stages i - 1 and i clears the noise by: the larger of its turn
        (each side's change, when they have opposite signs and neither side is a dip) and the pause either
        side is (a local minimum of |dλ̂/dlog t|: a plateau, a flat top or a pause; a slow-down that never
        speeds up again, like a burst's end, is no boundary)."""
        (_, dl, sl), (_, dr, sr) = change(i - 1), change(i)
        turn = min(abs(dl) / sl, abs(dr) / sr) if dl * dr < 0 and not (dip(i - 1) or dip(i)) else 0.0
        return max(turn, pause(i - 1), pause(i))

    while len(edges) > 2:  # merge across the weakest boundary until all hold
        scores = [strength(i) for i in range(1, len(edges) - 1)]
        if min(scores) >= z:
            break
        edges.pop(int(np.argmin(scores)) + 1)

    floor = min_change * np.ptp(fit.rows(x) @ fit.beta)

    def flat(i: int) -> bool:
        """Stage i changes λ̂ by less than z SEs or `min_change` of its range, or is a pause."""
        _, d, s = change(i)
        return abs(d) < max(z * s, floor) or pause(i) > 0

    i = 0
    while i < len(edges) - 1 and len(edges) > 2:  # a plateau or pause: one boundary at its middle, or none
        if not flat(i):
            i += 1
        elif i < len(edges) - 2 and flat(i + 1):
            edges.pop(i + 1)  # two flat stages in a row are one plateau
        elif 0 < i < len(edges) - 2:
            edges[i:i + 2] = [_middle(x, *flat_fit(i, 2)[1:])]
        else:
            edges.pop(max(i, 1))  # at an end of the run: joins its neighbour

    # a boundary between two checkpoints goes to the nearer one (in log-step)
    level = fit.rows(x) @ fit.beta
    idx = np.unique([0, *(int(np.argmin(np.abs(x - e))) for e in edges[1:-1]), len(x) - 1])
    return [Stage(int(steps[a]), int(steps[b]), "A" if level[b] > level[a] else "B") for a, b in zip(idx[:-1], idx[1:])]


def _scatter(x: np.ndarray, llc: np.ndarray) -> np.ndarray:
    """Each checkpoint's scatter about the line through its neighbours, robustly pooled (median over 21)."""
    a = (x[2:] - x[1:-1]) / (x[2:] - x[:-2])
    resid = np.abs(llc[1:-1] - a * llc[:-2] - (1 - a) * llc[2:]) / np.sqrt(1 + a**2 + (1 - a) ** 2)
    resid = np.r_[resid[0], resid, resid[-1]]
    se = np.array([np.median(resid[max(0, i - 10): i + 11]) / 0.6745 for i in range(len(x))])
    return np.maximum(se, max(1e-9 * np.abs(llc).max(), 1e-300))


def stage_se(steps: Sequence[int], llc: Sequence[float], se: Sequence[float]) -> Float[np.ndarray, "N"]:
    """The SE `analyze` reads stages against: each checkpoint's larger of `se` (the chains' SE) and the curve's
    scatter (`find_stages`' default). The chains' SE is one estimate's sampling noise, but the estimates also
    vary from checkpoint to checkpoint by more than it (with 8 chains on a dense grid single checkpoints become
    turns); the scatter alone can be far below the chains' SE on a smooth curve, whose slow wiggles it then cuts
    into stages. A NaN `se` (one chain) leaves the scatter."""
    steps, llc = np.asarray(steps, dtype=float), np.asarray(llc, dtype=float)
    x = np.log(steps + (steps[1] if steps[0] == 0 else 0.0))  # find_stages' default offset
    return np.fmax(np.asarray(se, dtype=float), _scatter(x, llc))


def _flat_fit(x: np.ndarray, y: np.ndarray, se: np.ndarray, knots: np.ndarray, lo: float, hi: float,
              most: int = 24) -> tuple[float, float, float]:
    """χ² of the best fit with a flat piece [x₁, x₂] between lo and hi: the fit's knots in [lo, hi] are
    replaced by x₁ < x₂ (gap middles between checkpoints), with λ̂ constant between them. Searched over at
    most `most` evenly spread gaps, then every gap near the best pair. The free fit's knots wander along a
    noisy plateau (its slope is free); a flat piece is what a plateau is. Returns (χ², x₁, x₂)."""
    keep = knots[(knots <= lo) | (knots >= hi)]
    gaps = (x[1:] + x[:-1]) / 2
    gaps = gaps[(gaps > lo) & (gaps < hi)]

    def chi2(x1: float, x2: float) -> float:
        e = np.r_[x[0], np.sort(np.r_[keep, x1, x2]), x[-1]]
        cols = [np.clip(x - e[p], 0, e[p + 1] - e[p]) for p in range(len(e) - 1) if e[p] != x1]  # piece slopes
        X = np.column_stack([np.ones_like(x), *cols]) / se[:, None]
        return float(np.sum((y / se - X @ np.linalg.lstsq(X, y / se, rcond=None)[0]) ** 2))

    stride = max(1, -(-len(gaps) // most))
    coarse = gaps[::stride]
    best = min(((chi2(a, b), a, b) for i, a in enumerate(coarse) for b in coarse[i + 1:]), default=(np.inf, lo, hi))
    for _ in range(2 if stride > 1 else 0):  # refine each end among the gaps around it
        i = int(np.searchsorted(gaps, best[1]))
        best = min([best, *((chi2(a, best[2]), a, best[2]) for a in gaps[max(0, i - stride):i + stride] if a < best[2])])
        i = int(np.searchsorted(gaps, best[2]))
        best = min([best, *((chi2(best[1], b), best[1], b) for b in gaps[max(0, i - stride):i + stride] if b > best[1])])
    return best


def _middle(x: np.ndarray, x1: float, x2: float) -> float:
    """The middle checkpoint of [x1, x2] by index (the grid's own middle, linear or log)."""
    inside = x[(x >= x1) & (x <= x2)]
    return float(inside[(len(inside) - 1) // 2]) if len(inside) else (x1 + x2) / 2
