"""The samplers' update rules, chosen by name (`SGLDConfig.sampler`), and the chain state they carry.

Each rule targets the same localised tempered posterior p(w) ∝ exp(−U(w)) on the restriction's coordinates,

    U(w) = nβ·L_B(w) + (γ/2)·‖w − w*‖²,      ∇U(w) = nβ·∇L_B(w) + γ·(w − w*)   (the "drift"),

and moves the chains' weights in place, given the drift ∇U(w) (`drift_`) and the step's noise ζ. The rules
act elementwise on a stack of chains (`Chains`: one flat row of its restriction's coordinates per chain), so
each chain moves as it would alone, and allocate nothing of the chains' size where they can help it (at
GPT-2-small size a row is 0.5 GB: a fresh tensor costs more than the arithmetic).

- "sgld" (Welling & Teh 2011): w ← w − (ε/2)·∇U + √ε·ζ.
- "sgnht" (Ding et al. 2014, Alg. 2; momentum u, thermostat ξ, diffusion A, step η = ε):
  u ← u − ξ·u − η·∇U + √(2Aη)·ζ;  w ← w + u;  ξ ← ξ + (uᵀu/d − η).
- "rmsprop_sgld" (pSGLD, Li et al. 2016): V ← α·V + (1−α)·∇U²;  G = 1/(δ + √V);
  w ← w − (ε/2)·G⊙∇U + √(ε·G)⊙ζ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from jaxtyping import Float

from .diagnostics import ChainStats, rowdot


class SGLDConfig(Protocol):
    """The settings the update rules read (`settings.SGLDConfig` has them; this module imports no settings)."""

    epsilon: float
    gamma: float
    nbeta: float
    diffusion: float
    rmsprop_decay: float
    rmsprop_delta: float


@dataclass
class Chains:
    """A stack of G chains on the same parameters (of one restriction or several): their current weights,
    one flat row per chain (the parameters' coordinates concatenated), one noise generator per chain,
    their diagnostics, and the state their sampler carries, per chain."""

    weights: Float[torch.Tensor, "chains coords"]
    generators: list[torch.Generator]
    d: Float[torch.Tensor, " chains"]  # sampled coordinates per chain: SGNHT's temperature is per coordinate
    stats: ChainStats
    momentum: torch.Tensor | None = None  # SGNHT's u
    thermostat: torch.Tensor | None = None  # SGNHT's ξ, [chains]
    square_avg: torch.Tensor | None = None  # RMSprop's V


def drift_(offset: Float[torch.Tensor, "chains d"], grad: Float[torch.Tensor, "chains d"],
           config: SGLDConfig) -> Float[torch.Tensor, "chains d"]:
    """∇U(w) = γ·(w − w*) + nβ·∇L_B(w), written over `offset` (w − w*), which it returns."""
    return offset.mul_(config.gamma).add_(grad, alpha=config.nbeta)


def sgld_step(chains: Chains, du, noise, config: SGLDConfig) -> None:
    """w ← w − (ε/2)·∇U(w) + √ε·ζ."""
    chains.weights.add_(du, alpha=-config.epsilon / 2)  # drift step
    chains.weights.add_(noise, alpha=math.sqrt(config.epsilon))  # Gaussian step of variance ε


def sgnht_step(chains: Chains, du, noise, config: SGLDConfig) -> None:
    """u ← u − ξ·u − ε·∇U + √(2Aε)·ζ;  w ← w + u;  ξ ← ξ + (uᵀu/d − ε).

    The thermostat ξ adds friction while the momenta run hotter than the target uᵀu/d = ε and removes
    it while they run colder, absorbing the minibatch gradient noise. Starts at u = 0, ξ = A; one ξ per chain.
    """
    if chains.momentum is None:
        chains.momentum = torch.zeros_like(chains.weights)
        chains.thermostat = torch.full_like(chains.d, config.diffusion)
    u = chains.momentum
    u.mul_((1 - chains.thermostat)[:, None])  # friction −ξ·u
    u.add_(du, alpha=-config.epsilon)  # force −η·∇U
    u.add_(noise, alpha=math.sqrt(2 * config.diffusion * config.epsilon))  # diffusion A
    chains.weights.add_(u)
    chains.thermostat += rowdot(u, u) / chains.d - config.epsilon  # uᵀu/d − η


def rmsprop_sgld_step(chains: Chains, du, noise, config: SGLDConfig) -> None:
    """V ← α·V + (1−α)·∇U²;  G = 1/(δ + √V);  w ← w − (ε/2)·G⊙∇U + √(ε·G)⊙ζ.

    V starts at the first ∇U². G ≤ 1/δ: steep coordinates take smaller steps than SGLD's, so ε can be
    larger. The term from G's own change is dropped, as in the paper.
    """
    if chains.square_avg is None:
        chains.square_avg = du.square()
    else:
        chains.square_avg.mul_(config.rmsprop_decay).add_(du.square(), alpha=1 - config.rmsprop_decay)
    g = (chains.square_avg.sqrt() + config.rmsprop_delta).reciprocal()  # G = 1/(δ + √V)
    chains.weights.add_(du * g, alpha=-config.epsilon / 2)
    chains.weights.add_(noise * g.sqrt(), alpha=math.sqrt(config.epsilon))  # N(0, εG)


SAMPLERS = {"sgld": sgld_step, "sgnht": sgnht_step, "rmsprop_sgld": rmsprop_sgld_step}
"""Name → update rule `step(chains, drift, noise, config)`, moving `chains.weights` in place."""
MALA = {"sgld"}
"""The samplers whose step is a Langevin proposal, so the MALA acceptance of `diagnostics` measures them."""
