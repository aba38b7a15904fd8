"""Osculating circles, the evolute and its cusps, for any 2-D curve sampled at equal parameter steps.

Derivatives are central finite differences, r′_t = (c_{t+1} − c_{t−1}) / 2 and r″_t = c_{t+1} − 2c_t + c_{t−1},
so nothing is defined at the two endpoints: their entries are NaN. The signed curvature is
k = (r′_x r″_y − r′_y r″_x) / |r′|³ (positive when the curve turns left); the curvature κ = |k|, the radius
R = 1/κ, and the centre of the osculating circle c + R·n̂ with n̂ the unit normal toward the turn, which is
c + |r′|² / (r′ × r″) · (−r′_y, r′_x). On a straight stretch (r′ × r″ = 0) κ = 0, R = inf and the centre is
NaN (it lies at infinity). On a circle sampled every h radians the estimate is κ·2/(1 + cos h), off by h²/4.

The centres trace the evolute. Its cusps sit where the centre stops and turns back, |C_{t+1} − C_t| locally
minimal, which in the continuum is dR/ds = 0: an extremum of the signed curvature k. An inflection
(k crossing zero) is not one: there the centre runs off to infinity. So the cusps are the extrema of k,
kept only when their prominence (how far k must travel back before reaching a more extreme value) is at
least `min_prominence` times the spread of k along the curve (its 5-95 percentile range). Small wiggles
from sampling, rounding or leftover noise fall below that (a circle has no cusp); the main turns stay.
Near an end the curve may stop before k has travelled back that far (an ellipse's vertex 5% of the way
from its end), so a one-sided rule holds there: when the side toward the end reaches the end without a
more extreme value, the extremum counts if k falls by the threshold on the inner side and by at least
half of it toward the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from jaxtyping import Float
from scipy.signal import find_peaks

from ..errors import InvalidValueError


@dataclass
class OsculatingCircles:
    """Per point of a `[T, 2]` curve; entries 0 and T-1 are NaN (no central difference there)."""

    signed_curvature: Float[np.ndarray, "T"]
    curvature: Float[np.ndarray, "T"]
    radius: Float[np.ndarray, "T"]
    centre: Float[np.ndarray, "T 2"]


def _check_curve(curve) -> np.ndarray:
    c = np.asarray(curve, dtype=float)
    if c.ndim != 2 or c.shape[1] != 2:
        raise InvalidValueError(f"curve must be an array of shape [T, 2] (one 2-D point per row); got shape {c.shape}.")
    if len(c) < 3:
        raise InvalidValueError(f"curve needs at least 3 points for a central second difference; got {len(c)}.")
    if not np.isfinite(c).all():
        raise InvalidValueError("curve contains NaN or inf; drop or interpolate those points first.")
    return c


def osculating_circles(curve: Float[np.ndarray, "T 2"]) -> OsculatingCircles:
    """Curvature, radius and centre of the osculating circle at every interior point of `curve`."""
    c = _check_curve(curve)
    d1 = np.full_like(c, np.nan)
    d2 = np.full_like(c, np.nan)
    d1[1:-1] = (c[2:] - c[:-2]) / 2
    d2[1:-1] = c[2:] - 2 * c[1:-1] + c[:-2]
    cross = d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]
    speed2 = (d1**2).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = cross / speed2**1.5
        perp = np.stack([-d1[:, 1], d1[:, 0]], axis=1)
        centre = c + (speed2 / cross)[:, None] * perp
        radius = 1 / np.abs(k)
    centre[cross == 0] = np.nan
    return OsculatingCircles(signed_curvature=k, curvature=np.abs(k), radius=radius, centre=centre)


def curvature_extrema(k: Float[np.ndarray, "T"], *, min_prominence: float = 0.5) -> np.ndarray:
    """Indices where the signed curvature `k` has an extremum of prominence >= min_prominence × the 5-95
    percentile spread of k.

    NaN entries (endpoints) never hold an extremum.
    """
    if min_prominence < 0:
        raise InvalidValueError(f"min_prominence must be >= 0, got {min_prominence}.")
    finite = np.isfinite(k)
    if finite.sum() < 3:
        return np.array([], dtype=int)
    idx = np.flatnonzero(finite)
    kk = k[idx]
    spread = float(np.percentile(kk, 95) - np.percentile(kk, 5))
    threshold = max(min_prominence * spread, 1e-9 * float(np.abs(kk).max()))  # floor: rounding error
    found = [p for sign in (1, -1) for p in find_peaks(sign * kk)[0] if _prominent(sign * kk, p, threshold)]
    return np.sort(idx[np.array(found, dtype=int)])


def _prominent(x: np.ndarray, p: int, threshold: float) -> bool:
    """Whether the peak x[p] descends by `threshold` on both sides before a higher value, or (one-sided
    rule) on the inner side, with at least half of it toward an end that comes before any higher value."""
    drops, cut = [], []
    for side in (x[p::-1], x[p:]):  # from the peak outward, to the left and to the right
        higher = np.flatnonzero(side > x[p])
        stop = higher[0] if len(higher) else len(side)
        drops.append(x[p] - side[:stop].min())
        cut.append(not len(higher))
    if min(drops) >= threshold:
        return True
    inner = int(np.argmax(drops))  # the side that falls further; the other one must run into the end
    return cut[1 - inner] and drops[inner] >= threshold and drops[1 - inner] >= threshold / 2


def evolute_cusps(curve: Float[np.ndarray, "T 2"], *, min_prominence: float = 0.5) -> np.ndarray:
    """Indices of the cusps of the evolute of `curve` (vertices of the curve; see the module docstring)."""
    return curvature_extrema(osculating_circles(curve).signed_curvature, min_prominence=min_prominence)
