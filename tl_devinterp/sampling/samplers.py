"""The samplers' update rules, chosen by name (`SGLDConfig.sampler`), and the chain state they carry.

Each rule targets the same localised tempered posterior p(w) ∝ exp(−U(w)) on the restriction's coordinates,

    U(w) = nβ·L_B(w) + (γ/2)·‖w − w*‖²,      ∇U(w) = nβ·∇L_B(w) + γ·(w − w*)   (the "drift"),

and moves the chain's weights in place, returning the drift (the diagnostics read its two terms).
`grad` and `noise` arrive already zero outside the restriction, so no rule moves a masked coordinate.

- "sgld" (Welling & Teh 2011): w ← w − (ε/2)·∇U + √ε·ζ.
- "sgnht" (Ding et al. 2014, Alg. 2; momentum u, thermostat ξ, diffusion A, step η = ε):
  u ← u − ξ·u − η·∇U + √(2Aη)·ζ;  w ← w + u;  ξ ← ξ + (uᵀu/d − η).
- "rmsprop_sgld" (pSGLD, Li et al. 2016): V ← α·V + (1−α)·∇U²;  G = 1/(δ + √V);
  w ← w − (ε/2)·G⊙∇U + √(ε·G)⊙ζ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .diagnostics import ChainStats

if TYPE_CHECKING:
    from .llc import SGLDConfig


@dataclass
class Chain:
    """One chain of one restriction: its current weights (the restriction's parameters, full shape,
    requiring grad), its noise generator, its diagnostics, and the state its sampler carries."""

    weights: list[torch.Tensor]
    generator: torch.Generator
    d: int  # sampled coordinates: SGNHT's temperature is per coordinate
    stats: ChainStats = field(default_factory=ChainStats)
    momentum: list[torch.Tensor] | None = None  # SGNHT's u
    thermostat: float = 0.0  # SGNHT's ξ
    square_avg: list[torch.Tensor] | None = None  # RMSprop's V


def drift(w: list[torch.Tensor], w_star: list[torch.Tensor], grad: list[torch.Tensor],
          config: SGLDConfig) -> list[torch.Tensor]:
    """∇U(w) = nβ·∇L_B(w) + γ·(w − w*)."""
    out = torch._foreach_sub(w, w_star)  # w − w*
    torch._foreach_mul_(out, config.gamma)  # γ·(w − w*)
    torch._foreach_add_(out, grad, alpha=config.nbeta)  # + nβ·∇L_B(w)
    return out


def sgld_step(chain: Chain, w_star, grad, noise, config: SGLDConfig) -> list[torch.Tensor]:
    """w ← w − (ε/2)·∇U(w) + √ε·ζ."""
    du = drift(chain.weights, w_star, grad, config)
    torch._foreach_add_(chain.weights, du, alpha=-config.epsilon / 2)  # drift step
    torch._foreach_add_(chain.weights, noise, alpha=math.sqrt(config.epsilon))  # Gaussian step of variance ε
    return du


def sgnht_step(chain: Chain, w_star, grad, noise, config: SGLDConfig) -> list[torch.Tensor]:
    """u ← u − ξ·u − ε·∇U + √(2Aε)·ζ;  w ← w + u;  ξ ← ξ + (uᵀu/d − ε).

    The thermostat ξ adds friction while the momenta run hotter than the target uᵀu/d = ε and removes
    it while they run colder, absorbing the minibatch gradient noise. Starts at u = 0, ξ = A.
    """
    du = drift(chain.weights, w_star, grad, config)
    if chain.momentum is None:
        chain.momentum, chain.thermostat = [torch.zeros_like(t) for t in chain.weights], config.diffusion
    u = chain.momentum
    torch._foreach_mul_(u, 1 - chain.thermostat)  # friction −ξ·u
    torch._foreach_add_(u, du, alpha=-config.epsilon)  # force −η·∇U
    torch._foreach_add_(u, noise, alpha=math.sqrt(2 * config.diffusion * config.epsilon))  # diffusion A
    torch._foreach_add_(chain.weights, u)
    kinetic = sum(float(t.square().sum()) for t in u) / chain.d  # uᵀu/d
    chain.thermostat += kinetic - config.epsilon
    return du


def rmsprop_sgld_step(chain: Chain, w_star, grad, noise, config: SGLDConfig) -> list[torch.Tensor]:
    """V ← α·V + (1−α)·∇U²;  G = 1/(δ + √V);  w ← w − (ε/2)·G⊙∇U + √(ε·G)⊙ζ.

    V starts at the first ∇U². G ≤ 1/δ: steep coordinates take smaller steps than SGLD's, so ε can be
    larger. The term from G's own change is dropped, as in the paper.
    """
    du = drift(chain.weights, w_star, grad, config)
    squared = torch._foreach_mul(du, du)
    if chain.square_avg is None:
        chain.square_avg = squared
    else:
        torch._foreach_mul_(chain.square_avg, config.rmsprop_decay)
        torch._foreach_add_(chain.square_avg, squared, alpha=1 - config.rmsprop_decay)
    g = torch._foreach_sqrt(chain.square_avg)
    torch._foreach_add_(g, config.rmsprop_delta)
    torch._foreach_reciprocal_(g)  # G = 1/(δ + √V)
    torch._foreach_add_(chain.weights, torch._foreach_mul(du, g), alpha=-config.epsilon / 2)
    torch._foreach_sqrt_(g)
    torch._foreach_add_(chain.weights, torch._foreach_mul(noise, g), alpha=math.sqrt(config.epsilon))  # N(0, εG)
    return du


SAMPLERS = {"sgld": sgld_step, "sgnht": sgnht_step, "rmsprop_sgld": rmsprop_sgld_step}
"""Name → update rule `step(chain, w_star, grad, noise, config) -> ∇U(w)`."""
