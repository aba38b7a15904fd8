"""The toy model of superposition (Elhage et al. 2022) in the setting of Chen, Lau, Mendel, Wei & Murfet 2023,
*Dynamical versus Bayesian phase transitions in a toy model of superposition* (arXiv:2310.06301).

c features pass through r = 2 hidden dimensions and back: f(x) = ReLU(WᵀW x + b), W `[r, c]`, b `[c]`; the
loss is the squared error summed over features, ‖x − f(x)‖², averaged over inputs (not halved: the paper's
convention, under which its tabulated losses hold). Inputs are sparse: in the paper's high-sparsity limit
exactly one feature i (uniform) is active, with value μ ~ U[0, 1]; `p_active` instead makes each feature
active independently (Elhage's setting), where no closed form is known.

It is not a transformer: it shows that the LLC engine, the stages and essential dynamics take any torch module
with a loss. Its known answers:

1. The population loss (one active feature) in closed form: for input μ·e_i, output j is ReLU(μ·g_ij + b_j)
   with g = WᵀW, active on one interval of μ, so each (i, j) term is a polynomial integral (`population_loss`).
2. Regular k-gons are critical points: k columns of length l at angles 2πm/k, the other c − k columns zero
   (dead features), the live biases b ≤ 0. Their loss (derived in `kgon_loss`):

       L = [ (c − k)/3 + k·( D(l², b) + Σ_{m=1}^{k−1} I(l²·cos(2πm/k), b) ) ] / c

   D(s, b) = ∫₀¹ (μ − ReLU(μs + b))² dμ, a live feature's own error; I(g, b) = ∫₀¹ ReLU(μg + b)² dμ =
   (g + b)³/(3g) where g > −b, else 0, the interference of a neighbour at angle 2πm/k. A dead feature with bias
   β > 0 (a "+" of the paper's k^{σ+}) outputs β for every input: (μ − β)² for its own, β² for the c − 1 others,
   which changes the loss by (c·β² − β)/c, smallest (−1/(4c²)) at β = 1/(2c).
3. The local learning coefficients of the k-gons (c = 6), by counting (each agrees with the paper): the
   6-gon is a minimum whose only flat direction is the rotation, λ = (18 − 1)/2 = 8.5; the 5-gon's dead column
   and negative bias are exactly flat (they change no output), λ = (15 − 1)/2 = 7; the 5⁺-gon adds a regular
   bias and, since its live columns sum to zero, two regular directions of the dead column: λ = 8.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from scipy.optimize import minimize
from scipy.spatial import ConvexHull, QhullError
from torch import nn

from ..errors import InvalidValueError
from ..models import ModelConfig
from .base import Task, integer, number, register

PAPER_KGONS = {  # Chen et al. 2023, c = 6: (optimal length l*, bias b*, loss) of the standard k-gons
    5: (1.17046, -0.28230, 0.06874),
    6: (1.32053, -0.61814, 0.04819),
}
PAPER_LLC = {"5": 7.0, "5+": 8.5, "6": 8.5}
"""The paper's local learning coefficients of the k-gons at c = 6 (the counts in the module docstring)."""


class TMS(nn.Module):
    """f(x) = ReLU(WᵀW x + b): `n_features` features through `n_hidden` dimensions, W `[n_hidden, n_features]`.

    `loss_fn(x)` is the mean over the batch of ‖x − f(x)‖² (summed over features), the loss SGD trains and
    SGLD samples.
    """

    def __init__(self, n_features: int = 6, n_hidden: int = 2, init_scale: float = 0.1, seed: int = 0):
        super().__init__()
        if n_features < 1 or n_hidden < 1:
            raise InvalidValueError(f"TMS needs n_features >= 1 and n_hidden >= 1; got {n_features}, {n_hidden}.")
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(init_scale * torch.randn(n_hidden, n_features, generator=g))
        self.b = nn.Parameter(torch.zeros(n_features))

    def forward(self, x: Float[torch.Tensor, "batch c"]) -> Float[torch.Tensor, "batch c"]:
        return torch.relu(x @ self.W.T @ self.W + self.b)

    def loss_fn(self, x: Float[torch.Tensor, "batch c"]) -> torch.Tensor:
        x = x[0] if isinstance(x, (tuple, list)) else x
        return ((x - self(x)) ** 2).sum(-1).mean()


@dataclass(frozen=True)
class TMSData:
    """Sparse inputs: `n` rows of `n_features`; with `p_active=None` exactly one feature per row (the paper's
    high-sparsity limit, where `population_loss` is exact), else each feature active with probability
    `p_active`. Active values are U[0, 1]."""

    n: int
    n_features: int = 6
    p_active: float | None = None
    seed: int = 0

    def __post_init__(self):
        if self.n < 1 or self.n_features < 1:
            raise InvalidValueError(f"TMSData needs n >= 1 and n_features >= 1; got n={self.n}, n_features={self.n_features}.")
        if self.p_active is not None and not 0 < self.p_active <= 1:
            raise InvalidValueError(f"TMSData.p_active must lie in (0, 1] (or None: one active feature); got {self.p_active}.")

    def sample(self) -> Float[torch.Tensor, "n c"]:
        g = torch.Generator().manual_seed(self.seed)
        values = torch.rand(self.n, self.n_features, generator=g)
        if self.p_active is None:
            active = torch.zeros(self.n, self.n_features, dtype=torch.bool)
            active[torch.arange(self.n), torch.randint(self.n_features, (self.n,), generator=g)] = True
        else:
            active = torch.rand(self.n, self.n_features, generator=g) < self.p_active
        return values * active


# --------------------------------------------------------------------------------------------------
# Closed forms (one active feature, μ ~ U[0, 1]).


def population_loss(W: Float[torch.Tensor, "r c"], b: Float[torch.Tensor, " c"]) -> float:
    """E‖x − f(x)‖² over inputs μ·e_i (i uniform, μ ~ U[0, 1]), exactly, for any W and b.

    Term (i, j): output j is ReLU(μ·g_ij + b_j), active where μ·g_ij + b_j > 0, one interval [lo, hi] of
    [0, 1]. There the error is (a·μ − b_j)² with a = δ_ij − g_ij, elsewhere (δ_ij·μ)²; both integrate to
    polynomials in lo and hi.
    """
    W, b = W.detach().double(), b.detach().double()
    g = W.T @ W  # [i, j]
    bj = b.expand_as(g)
    root = torch.where(g != 0, -bj / torch.where(g != 0, g, torch.ones_like(g)), torch.zeros_like(g))  # μ·g + b = 0
    lo = torch.where(g > 0, root, torch.where(g < 0, torch.zeros_like(g), torch.where(bj > 0, 0.0, 1.0)))
    hi = torch.where(g < 0, root, torch.ones_like(g))
    lo, hi = lo.clamp(0, 1), hi.clamp(0, 1)
    hi = torch.maximum(hi, lo)
    delta = torch.eye(len(b), dtype=g.dtype)
    a = delta - g
    p1, p2, p3 = hi - lo, (hi**2 - lo**2) / 2, (hi**3 - lo**3) / 3  # ∫ 1, ∫ μ, ∫ μ² over [lo, hi]
    active = a**2 * p3 - 2 * a * bj * p2 + bj**2 * p1
    inactive = delta * (1 / 3 - p3)
    return float((active + inactive).sum() / len(b))


def _own_error(s: float, b: float) -> float:
    """D(s, b) = ∫₀¹ (μ − ReLU(μs + b))² dμ for s > 0, b ≤ 0: μ² below μ₀ = −b/s, ((1 − s)μ − b)² above."""
    m0 = min(1.0, -b / s)
    a = 1.0 - s
    return m0**3 / 3 + a**2 * (1 - m0**3) / 3 - a * b * (1 - m0**2) + b**2 * (1 - m0)


def _interference(g: float, b: float) -> float:
    """I(g, b) = ∫₀¹ ReLU(μg + b)² dμ for b ≤ 0: (g + b)³/(3g) when g > −b, else 0."""
    return (g + b) ** 3 / (3 * g) if g + b > 0 else 0.0


def kgon_loss(k: int, c: int, length: float, bias: float, positive: int = 0) -> float:
    """The loss of the regular k-gon of column length `length` and live bias `bias` (≤ 0), the c − k dead
    features with negative bias except `positive` of them at the optimal positive bias 1/(2c) (module
    docstring, 2.)."""
    if not 1 <= k <= c or not 0 <= positive <= c - k:
        raise InvalidValueError(f"A k-gon needs 1 <= k <= c and 0 <= positive <= c - k; got k={k}, c={c}, positive={positive}.")
    if bias > 0 or length <= 0:
        raise InvalidValueError(f"kgon_loss is derived for length > 0 and bias <= 0; got length={length}, bias={bias}.")
    s = length**2
    live = _own_error(s, bias) + sum(_interference(s * math.cos(2 * math.pi * m / k), bias) for m in range(1, k))
    return ((c - k) / 3 + k * live) / c - positive / (4 * c**2)


def optimal_kgon(k: int, c: int = 6) -> tuple[float, float, float]:
    """(l*, b*, loss) of the k-gon whose length and bias minimise `kgon_loss` (b ≤ 0)."""
    def f(v):
        return kgon_loss(k, c, abs(v[0]) + 1e-9, min(v[1], 0.0))

    best = min((minimize(f, x0, method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-14, "maxiter": 4000})
                for x0 in ([1.0, 0.0], [1.2, -0.3], [1.4, -0.7])), key=lambda r: r.fun)
    return abs(best.x[0]), min(best.x[1], 0.0), float(best.fun)


def kgon(k: int, c: int = 6, length: float | None = None, bias: float | None = None, *, positive: int = 0,
         dead_bias: float = -1.0, rotation: float = 0.0) -> TMS:
    """A TMS planted at the regular k-gon: columns 0..k−1 of length `length` at angles rotation + 2πm/k with
    bias `bias` (default: the optimal ones, `optimal_kgon`), the other columns zero with bias `dead_bias`,
    except the first `positive` of them at 1/(2c)."""
    if length is None or bias is None:
        l_opt, b_opt, _ = optimal_kgon(k, c)
        length, bias = length if length is not None else l_opt, bias if bias is not None else b_opt
    model = TMS(c, 2)
    angles = rotation + 2 * math.pi * torch.arange(k, dtype=torch.float64) / k
    W = torch.zeros(2, c, dtype=torch.float64)
    W[:, :k] = length * torch.stack([angles.cos(), angles.sin()])
    b = torch.full((c,), float(dead_bias), dtype=torch.float64)
    b[:k] = bias
    b[k:k + positive] = 1 / (2 * c)
    with torch.no_grad():
        model.W.copy_(W), model.b.copy_(b)
    return model


# --------------------------------------------------------------------------------------------------
# Metrics of a checkpoint.


def kgon_metrics(model: TMS, *, min_length: float = 0.1) -> dict[str, float]:
    """What a checkpoint has learnt: `k`, the vertices of the convex hull of the columns of W longer than
    `min_length` (the paper's k); `live`, those columns; `negative_bias`, features with b < 0; `positive_dead`,
    short columns with b > 0 (the paper's σ); `loss`, the exact population loss (one active feature); and
    `kgon_loss`, the closed-form loss of the optimal k^{σ+}-gon, the critical point this checkpoint sits near
    when `loss − kgon_loss` is small (NaN where k < 2 or k > c)."""
    W, b = model.W.detach().double(), model.b.detach().double()
    c = W.shape[1]
    lengths = W.norm(dim=0)
    live = lengths > min_length
    points = W.T[live].numpy()
    if len(points) >= 3:
        try:
            k = len(ConvexHull(points).vertices)
        except QhullError:  # collinear columns
            k = 2
    else:
        k = len(points)
    sigma = int(((~live) & (b > 0)).sum())
    closed = float("nan")
    if W.shape[0] == 2 and 2 <= k <= c and sigma <= c - k:
        closed = optimal_kgon(k, c)[2] - sigma / (4 * c**2)
    return dict(k=k, live=int(live.sum()), negative_bias=int((b < 0).sum()), positive_dead=sigma,
                loss=population_loss(W, b), kgon_loss=closed)



# --------------------------------------------------------------------------------------------------
# The task: `tl-devinterp train --preset tms` (the paper's SGD) and `analyze` (LLC, stages, ED, these metrics).


@register
class TMSTask(Task):
    """The toy model of superposition as a task. Its model is no transformer (`has_heads = False`): it is
    built from the spec (`n_features` through `n_hidden` dimensions, initialised N(0, `init_scale`²) with the
    training seed), not from the `ModelConfig`. Data: `n_train` / `n_test` sparse inputs (`TMSData`); the
    metrics are `kgon_metrics` at every checkpoint; essential dynamics reads the outputs on fixed test inputs.
    """

    kind = "tms"
    OPTIONS = {
        "n_features": integer(1, 6),
        "n_hidden": integer(1, 2),
        "n_train": integer(1, 1000),
        "n_test": integer(1, 10_000),
        "p_active": number(0, None, strict=True, high=1),  # None: one active feature
        "init_scale": number(0, 0.1, strict=True),
        "seed": integer(0, 0),
    }
    has_heads = False
    # planted k-gons read within 11% of the paper's λ with these (benchmarks/tms_kgons.py)
    sampler_defaults = dict(epsilon=1e-4, gamma=10.0, nbeta=3000.0, batch_size=1000, num_burnin=100, num_draws=200)

    def data(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.spec
        make = dict(n_features=s["n_features"], p_active=s["p_active"])
        return (TMSData(s["n_train"], seed=2 * s["seed"] + 1, **make).sample(),
                TMSData(s["n_test"], seed=2 * s["seed"] + 2, **make).sample())

    def build_model(self, config: ModelConfig, device: str | torch.device | None = None) -> nn.Module:
        model = TMS(self.spec["n_features"], self.spec["n_hidden"], self.spec["init_scale"], seed=config.seed)
        return model.to(device) if device is not None else model

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        return model.loss_fn(batch)

    def features(self, model: nn.Module, inputs) -> torch.Tensor:
        return model(inputs[0] if isinstance(inputs, tuple) else inputs).flatten()

    def metrics(self, model: nn.Module, test) -> list[tuple[str, None, None, float]]:
        return [(name, None, None, float(value)) for name, value in kgon_metrics(model).items()]

    def position_losses(self, model: nn.Module, sample) -> tuple[np.ndarray, list[str], np.ndarray]:
        """The squared error of each feature on one input."""
        x = sample[None] if sample.ndim == 1 else sample
        with torch.no_grad():
            err = ((x - model(x)) ** 2)[0].cpu().numpy()
        return np.arange(len(err)), self.labels(sample), err

    def labels(self, sample) -> list[str]:
        return [f"f{i}" for i in range(sample.shape[-1])]
