"""Is an LLC estimate measuring the model, or the sampler's hyperparameters? Diagnostics of SGLD chains.

An estimate is only about the model when the likelihood shapes the chains. With nβ too small or γ too
large the chains sit in the Gaussian of the localising prior: ‖w − w*‖ approaches the prior radius √(d/γ),
the loss rises far above L(w*), and λ̂ grows in proportion to nβ whatever the model. Every `LLCResult`
carries these numbers, and the sampler warns (`SamplerWarning`) when one of them says the estimate is
not to be trusted.

Per post-burn-in step and chain, with drift ∇U(w) = nβ·∇L_B(w) + γ·(w − w*) on the sampled coordinates:
- likelihood_fraction = mean ‖nβ·∇L_B‖ / (‖nβ·∇L_B‖ + ‖γ·(w − w*)‖): the likelihood's share of the pull;
- acceptance: the Metropolis-adjusted (MALA) acceptance probability of the step just taken (SGLD only),
  min(1, exp(U(w) − U(w') + log q(w | w') − log q(w' | w))), U = nβ·L_B + γ/2·‖w − w*‖², estimated as
  devinterp does with the minibatch losses and gradients at both ends (low: ε too large);
- trace_drift: the t-statistic across chains of (last third − first third) of each chain's λ̂ trace.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

PRIOR_DOMINATED = 0.5  # likelihood_fraction below this: the prior shapes the chains
LARGE_INCREASE = 0.2  # loss_increase above this fraction of L(w*): chains left the basin
LOW_ACCEPTANCE = 0.5  # MALA acceptance below this: ε too large for the local curvature
DRIFT_T, DRIFT_REL = 4.0, 0.1  # a trace still moving: |t| above DRIFT_T and a change above DRIFT_REL·|λ̂|


ROW = ("loss_increase", "distance", "prior_radius", "likelihood_fraction", "acceptance", "regime")
"""The diagnostics a results table keeps, one column each (`SamplerDiagnostics.as_row`)."""


class SamplerWarning(UserWarning):
    """An LLC estimate whose chains are prior-dominated, negative, far from the checkpoint or not flat."""


@dataclass(frozen=True)
class SamplerDiagnostics:
    """How the chains behaved; `regime` is "likelihood" when the estimate is about the model."""

    loss_increase: float  # mean L_B(w_t) − L_B(w*) over chains and draws (nats): λ̂ / nβ
    distance: float  # mean ‖w_t − w*‖ over chains and draws
    prior_radius: float  # √(d/γ): the distance of chains that only feel the prior
    likelihood_fraction: float  # in [0, 1]
    acceptance: float  # MALA acceptance estimate in [0, 1]
    trace_drift: float  # t-statistic of the post-burn-in trace's change (≈ 0 when flat)
    regime: str  # "likelihood" | "prior"
    warnings: tuple[str, ...] = ()

    def as_row(self) -> dict:
        """The columns a results table keeps (`ROW`)."""
        return {k: getattr(self, k) for k in ROW}


class ChainStats:
    """Running sums for a stack of G chains ([G] arrays), fed once per post-burn-in step by the sampler;
    each chain's numbers are those it would have alone."""

    def __init__(self, n_chains: int, mala: bool = True):
        self.mala = mala  # score steps as MALA proposals (SGLD's update only; other samplers report NaN)
        self.distance, self.likelihood_fraction, self.acceptance = (np.zeros(n_chains) for _ in range(3))
        self.n = self.n_accept = 0
        self.previous: tuple[np.ndarray, torch.Tensor, torch.Tensor] | None = None  # U, drift, noise

    def update(self, *, loss: np.ndarray, distance: np.ndarray, grad_norm: np.ndarray, drift: torch.Tensor,
               noise: torch.Tensor, config) -> None:
        """One step from w, per chain: L_B(w), ‖w − w*‖, ‖∇L_B(w)‖, the drift ∇U(w) and the noise ξ that move it on."""
        lik, pri = config.nbeta * grad_norm, config.gamma * distance
        self.likelihood_fraction += np.divide(lik, lik + pri, out=np.zeros_like(lik), where=lik + pri > 0)
        self.distance += distance
        self.n += 1
        potential = config.nbeta * loss + config.gamma * distance**2 / 2  # U(w)
        if self.mala and self.previous is not None:  # the step w_prev → w just taken, scored as a MALA proposal
            eps = config.epsilon
            u_prev, drift_prev, noise_prev = self.previous
            # w_prev − w + (ε/2)∇U(w), with w − w_prev = −(ε/2)∇U(w_prev) + √ε·ξ_prev
            back = torch.add((eps / 2) * (drift + drift_prev), noise_prev, alpha=-math.sqrt(eps))
            log_q_back = -(norms(back) ** 2) / (2 * eps)
            log_q_forward = -(norms(noise_prev) ** 2) / 2
            log_alpha = u_prev - potential + log_q_back - log_q_forward
            self.acceptance += np.exp(np.minimum(0.0, log_alpha))
            self.n_accept += 1
        self.previous = (potential, drift, noise)

    def means(self) -> dict[str, np.ndarray]:
        """Per chain: mean ‖w − w*‖, likelihood fraction and acceptance (NaN without MALA scores)."""
        acceptance = self.acceptance / self.n_accept if self.n_accept else np.full_like(self.acceptance, math.nan)
        return dict(distance=self.distance / max(self.n, 1), likelihood_fraction=self.likelihood_fraction / max(self.n, 1),
                    acceptance=acceptance)


def norms(rows: torch.Tensor) -> np.ndarray:
    """The Euclidean norm of each row (chain) of a [chains, coords] tensor, as float64."""
    return torch.linalg.vector_norm(rows, dim=1).double().cpu().numpy()


def summarise(per_chain: dict[str, np.ndarray], llc_trace: np.ndarray, *, loss_increase: float, init_loss: float,
              d: int, gamma: float, label: str) -> SamplerDiagnostics:
    """The chains' diagnostics (`per_chain`: `ChainStats.means()` of a restriction's chains), with a
    `SamplerWarning` for each sign of an untrustworthy estimate."""
    distance = float(per_chain["distance"].mean())
    fraction = float(per_chain["likelihood_fraction"].mean())
    acceptance = float(per_chain["acceptance"].mean())
    third = max(llc_trace.shape[1] // 3, 1)
    change = llc_trace[:, -third:].mean(1) - llc_trace[:, :third].mean(1)  # per chain
    spread = change.std(ddof=1) / math.sqrt(len(change)) if len(change) > 1 else math.inf
    drift_t = float(change.mean() / spread) if spread > 0 else 0.0
    llc = float(llc_trace.mean())
    regime = "prior" if fraction < PRIOR_DOMINATED else "likelihood"

    said = []
    if regime == "prior":
        said.append(f"chains are prior-dominated (likelihood share {fraction:.2f}, ‖w − w*‖ = {distance:.3g} vs "
                    f"prior radius {math.sqrt(d / gamma) if gamma > 0 else math.inf:.3g}): λ̂ reflects nβ and γ more than "
                    f"the model; raise nbeta or lower gamma (see calibrate_llc)")
    if llc < 0:
        said.append(f"λ̂ = {llc:.3g} < 0: the chains found lower loss than the checkpoint, which is then no local "
                    f"minimum of the sampled loss; raise gamma, or read the value as a lower bound")
    if loss_increase > LARGE_INCREASE * max(abs(init_loss), 1e-12):
        said.append(f"chains sit {loss_increase:.3g} nats above L(w*) = {init_loss:.3g}: they left the checkpoint's "
                    f"basin; lower epsilon or nbeta, or raise gamma")
    if acceptance < LOW_ACCEPTANCE:
        said.append(f"MALA acceptance {acceptance:.2f} < {LOW_ACCEPTANCE}: epsilon is large for the local curvature")
    if abs(drift_t) > DRIFT_T and abs(change.mean()) > DRIFT_REL * max(abs(llc), 1e-12):
        said.append(f"the λ̂ trace is still {'rising' if change.mean() > 0 else 'falling'} after burn-in "
                    f"(t = {drift_t:.1f}): raise num_burnin or epsilon")
    for message in said:
        warnings.warn(f"LLC of {label}: {message}.", SamplerWarning, stacklevel=4)
    return SamplerDiagnostics(loss_increase, distance, math.sqrt(d / gamma) if gamma > 0 else math.inf, fraction,
                              acceptance, drift_t, regime, tuple(said))
