"""Is an LLC estimate measuring the model, or the sampler's hyperparameters? Diagnostics of SGLD chains.

An estimate is only about the model when the chains sample the localised tempered posterior
p(w) ∝ exp(−U(w)), U = nβ·L(w) + γ/2·‖w − w*‖², and the likelihood, not the prior, shapes it. Three
things break that, and each leaves a mark these diagnostics read (every `LLCResult` carries them; the
sampler warns, `SamplerWarning`, naming cause and remedy):
- a step size ε too coarse for the curvature: SGLD's chains then spread wider than p (by ≈ εk/4 in a
  direction of stiffness k) and λ̂ reads high;
- chains not yet mixed: they are still spreading out from w* (λ̂ reads low) or disagree with each other;
- the prior dominates (γ too large for nβ): the chains sit in the prior's Gaussian and λ̂ follows nβ and γ.

The virial identity makes the first two measurable in one run: under p, E[(w − w*)·∇U(w)] = d exactly
(integrate by parts), so `virial` = that mean over chains and draws / d is 1 at equilibrium, above 1
when ε inflates the spread, below 1 while the chains are still spreading out. `prior_share` = γ·E‖w − w*‖²/d
is the prior's part of it (≈ 1: the chains only feel the prior). Directions flat for the likelihood hold a prior
share of 1 each at equilibrium without biasing λ̂, so the share alone misjudges singular models; `prior_elasticity`
= ∂log λ̂/∂log γ = −γ·Cov(λ̂_t, ‖w − w*‖²)/(2λ̂) (differentiate E_p[nβL] in γ) measures the prior's pull on λ̂ itself.
ArviZ's rank-normalised split R-hat, bulk and tail ESS and MCSE of the λ̂ trace say whether chains agree and how
many independent draws the mean rests on.

Whether the chains disagree is judged against R-hat's own noise, not a fixed threshold: with M chains of n_e
effective draws each, R̂² − 1 ≈ (F − 1)/n_e, where F = (variance of the chain means) / (within-chain variance
/ n_e) is χ²_{M−1}/(M−1)-distributed when the chains sample one distribution. A fixed R̂ < 1.01 therefore
needs n_e in the hundreds per chain (healthy zoo runs read 1.01-1.02); `disagreement` tests F,
with n_e from the within-chain autocorrelation alone (each chain centred on its own mean), so stuck chains
cannot hide by shrinking the ESS the threshold is judged at.

Per post-burn-in step and chain, with drift ∇U(w) = nβ·∇L_B(w) + γ·(w − w*) on the sampled coordinates,
`ChainStats` keeps ‖w − w*‖, ‖∇L_B‖, the noise's norm, (w − w*)·∇U, the likelihood's share of the pull
‖nβ∇L_B‖ / (‖nβ∇L_B‖ + ‖γ(w − w*)‖) and the MALA acceptance probability of the step just taken (SGLD
only; estimated as devinterp does, with the minibatch losses at both ends, so batch noise lowers it).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure

PRIOR_DOMINATED = 0.5  # likelihood_fraction below this, or prior_share above it: the prior shapes the chains
PRIOR_ELASTIC = 0.15  # prior_elasticity below −this (beyond 2 MCSE): halving γ would move λ̂ by ≳ 10% (0.15·ln 2)
PRIOR_ELASTIC_SHARED = 0.1  # a prior share above PRIOR_DOMINATED counts only with an elasticity below −this: directions
# flat for the likelihood hold a share of 1 each without moving λ̂ (a deep linear network at −9%: share 0.78,
# elasticity −0.06; prior-dominated ones at −34% and −48%: 0.77 and 0.88, −0.12 and −0.14)
VIRIAL_HIGH = 1.05  # virial above this (beyond 3 MCSE): ε too coarse, the chains wider than p
DISCRETISATION_HIGH = 0.2  # the step's own bias estimate above this share of λ̂ (where the likelihood holds at least
# PRIOR_DOMINATED of the pull: prior-held chains have λ̂ ≈ 0 and are flagged as such): ε too coarse, λ̂ reads high
# (zoo, benchmarks/zoo_diagnostics.py: +29% and +27% read 0.26 and 0.23, where the virial, held down by the valley,
# read 0.69 and 1.06; good runs 0.014-0.13; a +8% run 0.145)
VIRIAL_LOW = 0.6  # virial below this (beyond 3 MCSE): chains still spreading out. Not 1 − noise: directions flat
# for the likelihood (the true parameters' valley) relax at the prior's rate εγ only, so on good zoo runs at γ = 1
# the virial reads 0.69-0.88 long after λ̂ has settled; chains still spreading where λ̂ depends read 0.19-0.47
# (benchmarks/zoo_diagnostics.py). For the same reason a still-growing ‖w − w*‖ is no sign of a bad λ̂.
BASIN = 1.1  # λ̂ above this × d/2 (the regular bound, beyond noise): the chains left the basin
DISAGREE_P = 1e-3  # chains disagree: their means spread more than their Monte Carlo error allows at this p-value
MIN_ESS = 100  # effective draws (within chains, all chains) below this: too few independent draws for the SE
MIN_CHAIN_ESS = 20  # effective draws per chain below this: their autocorrelation (so their error) is too uncertain
# to judge whether the chains agree (a short chain's autocorrelation is underestimated, and the test over-fires)
LOW_ACCEPTANCE = 0.5  # MALA acceptance below this: ε too large for the local curvature
DRIFT_T, DRIFT_REL = 4.0, 0.1  # a trace still moving: |t| above DRIFT_T and a change above DRIFT_REL·|λ̂|
REGIMES = ("likelihood", "step size", "not mixed", "prior")
"""`SamplerDiagnostics.regime`: only "likelihood" is about the model."""
TRACES = ("loss", "distance", "grad_norm", "noise_norm", "virial", "likelihood_fraction", "acceptance")
"""The per-step sampler metrics kept per chain and draw (`LLCResult.trace`)."""

ROW = ("loss_increase", "distance", "prior_radius", "likelihood_fraction", "acceptance", "virial", "prior_share",
       "r_hat", "ess_bulk", "ess_tail", "mcse", "regime")
"""The diagnostics a results table keeps, one column each (`SamplerDiagnostics.as_row`)."""


class SamplerWarning(UserWarning):
    """An LLC estimate whose chains are prior-dominated, too coarse in ε, unmixed, or otherwise not the model's."""


@dataclass(frozen=True)
class SamplerDiagnostics:
    """How the chains behaved; `regime` is "likelihood" only when the estimate is about the model, else
    "step size", "not mixed" or "prior" (the first that applies, in the order the module docstring gives)."""

    loss_increase: float  # mean L_B(w_t) − L_B(w*) over chains and draws (nats): λ̂ / nβ
    distance: float  # mean ‖w_t − w*‖ over chains and draws
    prior_radius: float  # √(d/γ): the distance of chains that only feel the prior
    likelihood_fraction: float  # in [0, 1]
    acceptance: float  # MALA acceptance estimate in [0, 1]
    trace_drift: float  # t-statistic of the post-burn-in trace's change (≈ 0 when flat)
    regime: str  # "likelihood" | "step size" | "not mixed" | "prior"
    warnings: tuple[str, ...] = ()
    virial: float = math.nan  # E[(w − w*)·∇U] / d: 1 at equilibrium
    prior_share: float = math.nan  # γ·E‖w − w*‖² / d
    r_hat: float = math.nan  # ArviZ split rank-normalised R-hat of the λ̂ trace
    ess_bulk: float = math.nan  # ArviZ bulk ESS
    ess_tail: float = math.nan  # ArviZ tail ESS
    mcse: float = math.nan  # ArviZ Monte Carlo standard error of λ̂ (the mean)
    prior_elasticity: float = math.nan  # ∂log λ̂/∂log γ under p: ≈ 0 when the prior leaves λ̂ alone
    discretisation: float = math.nan  # ε·(E‖∇U‖² − dγ)/(8λ̂): the share of λ̂ SGLD's step adds (`summarise`)

    def as_row(self) -> dict:
        """The columns a results table keeps (`ROW`)."""
        return {k: getattr(self, k) for k in ROW}


class ChainStats:
    """Per-step metrics (`TRACES` but the loss) of a stack of G chains, recorded once per post-burn-in step by
    the sampler; each chain's numbers are those it would have alone. Besides the numbers it keeps one
    [chains, d] tensor, for the MALA score (updated in place: no new tensor of the chains' size per step)."""

    def __init__(self, n_chains: int, mala: bool = True):
        self.mala = mala  # score steps as MALA proposals (SGLD's update only; other samplers report NaN)
        self.n_chains = n_chains
        self.rows: dict[str, list[np.ndarray]] = {k: [] for k in TRACES[1:]}
        # U(w_prev), (ε/2)∇U(w_prev) − √ε·ξ_prev (one [chains, coords] tensor), ‖ξ_prev‖²: all a MALA score needs
        self.previous: tuple[np.ndarray, torch.Tensor, np.ndarray] | None = None

    @staticmethod
    def measure(offset: torch.Tensor, grad: torch.Tensor, pull: torch.Tensor, config) -> dict[str, np.ndarray]:
        """What `update` needs of the state w about to be left, read before the drift is written over w − w*:
        ‖w − w*‖, ‖∇L_B(w)‖ and (w − w*)·∇U(w) = γ‖w − w*‖² + nβ·(w − w*)·`pull` (∇L_B, or with weight decay)."""
        distance = norms(offset)
        return dict(distance=distance, grad_norm=norms(grad),
                    virial=config.gamma * distance**2 + config.nbeta * rowdot(offset, pull).double().cpu().numpy())

    def update(self, *, loss: np.ndarray, state: dict[str, np.ndarray], drift: torch.Tensor, noise: torch.Tensor,
               config) -> None:
        """One step from w, per chain: L_B(w), `measure`'s numbers of w, the drift ∇U(w) and the noise ξ that
        moved it on ([chains, coords] tensors)."""
        distance, grad_norm, noise_norm = state["distance"], state["grad_norm"], norms(noise)
        lik, pri = config.nbeta * grad_norm, config.gamma * distance
        row = dict(distance=distance, grad_norm=grad_norm, noise_norm=noise_norm, virial=state["virial"],
                   likelihood_fraction=np.divide(lik, lik + pri, out=np.zeros_like(lik), where=lik + pri > 0),
                   acceptance=np.full(self.n_chains, math.nan))
        potential = config.nbeta * loss + config.gamma * distance**2 / 2  # U(w)
        carry = None
        if self.mala and self.previous is not None:  # the step w_prev → w just taken, scored as a MALA proposal
            eps = config.epsilon
            u_prev, carry, noise_sq = self.previous
            # w_prev − w + (ε/2)∇U(w), with w − w_prev = −(ε/2)∇U(w_prev) + √ε·ξ_prev
            back = carry.add_(drift, alpha=eps / 2)  # the carried tensor is used once: updated in place
            log_q_back = -(norms(back) ** 2) / (2 * eps)
            log_q_forward = -noise_sq / 2
            log_alpha = u_prev - potential + log_q_back - log_q_forward
            row["acceptance"] = np.exp(np.minimum(0.0, log_alpha))
        for k, v in row.items():
            self.rows[k].append(v)
        if self.mala:  # (ε/2)∇U(w) − √ε·ξ, into the carried tensor's memory once it exists
            eps = config.epsilon
            carry = torch.mul(drift, eps / 2, out=carry).add_(noise, alpha=-math.sqrt(eps))
            self.previous = (potential, carry, noise_norm**2)

    def traces(self) -> dict[str, np.ndarray]:
        """Each metric as [chains, steps] (the first step's acceptance is NaN: no step was taken before it)."""
        return {k: np.stack(v, axis=1) if v else np.empty((self.n_chains, 0)) for k, v in self.rows.items()}


def norms(rows: torch.Tensor) -> np.ndarray:
    """The Euclidean norm of each row (chain) of a [chains, coords] tensor, as float64."""
    return torch.linalg.vector_norm(rows, dim=1).double().cpu().numpy()


def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Each row's dot product of two [chains, coords] tensors (a batched BLAS dot: no [chains, coords] product)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).flatten()


def mcmc_summary(trace: np.ndarray) -> dict[str, float]:
    """ArviZ's split rank-normalised R-hat, bulk and tail ESS and the MCSE of the mean of a [chains, draws]
    trace (NaN where ArviZ cannot compute them: fewer than 4 draws, or a constant trace)."""
    import arviz as az

    trace = np.asarray(trace, dtype=float)
    if trace.shape[1] < 4 or not np.isfinite(trace).all():
        return dict(r_hat=math.nan, ess_bulk=math.nan, ess_tail=math.nan, mcse=math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a constant trace: ArviZ divides by zero, gives NaN
        return dict(r_hat=float(az.rhat(trace, method="rank")), ess_bulk=float(az.ess(trace, method="bulk")),
                    ess_tail=float(az.ess(trace, method="tail")), mcse=float(az.mcse(trace, method="mean")))


def disagreement(trace: np.ndarray) -> tuple[float, float, float]:
    """(F, p-value, effective draws per chain) for whether the chains of a [chains, draws] trace sample one
    distribution: F = variance of the chain means × n_e / within-chain variance, ~ χ²_{M−1}/(M−1) if they do;
    n_e = ArviZ's ESS of the trace with each chain centred on its own mean, / M (within-chain autocorrelation
    only). F and p are NaN when n_e < `MIN_CHAIN_ESS` (too few effective draws to judge) or the trace is constant."""
    from scipy import stats

    trace = np.asarray(trace, dtype=float)
    chains = trace.shape[0]
    centred = trace - trace.mean(1, keepdims=True)
    within = centred.var(ddof=1)
    if chains < 2 or trace.shape[1] < 4 or not np.isfinite(trace).all() or within <= 0:
        return math.nan, math.nan, math.nan
    n_e = mcmc_summary(centred)["ess_bulk"] / chains  # rank-normalised: robust to λ̂'s heavy right tail
    if not n_e >= MIN_CHAIN_ESS:
        return math.nan, math.nan, n_e
    f = float(trace.mean(1).var(ddof=1) * n_e / within)
    return f, float(stats.chi2.sf(f * (chains - 1), chains - 1)), n_e


def _drift_t(trace: np.ndarray) -> tuple[float, float]:
    """(t-statistic across chains, mean) of each chain's change from the first to the last third of `trace`."""
    third = max(trace.shape[1] // 3, 1)
    change = trace[:, -third:].mean(1) - trace[:, :third].mean(1)
    spread = change.std(ddof=1) / math.sqrt(len(change)) if len(change) > 1 else math.inf
    return (float(change.mean() / spread) if spread > 0 else 0.0), float(change.mean())


def summarise(traces: dict[str, np.ndarray], llc_trace: np.ndarray, *, loss_increase: float, d: int,
              gamma: float, label: str, nbeta: float = math.nan, epsilon: float = math.nan) -> SamplerDiagnostics:
    """The chains' diagnostics (`traces`: `ChainStats.traces()` of a restriction's chains, [chains, draws]),
    with a `SamplerWarning` naming cause and remedy for each sign of an untrustworthy estimate.

    `discretisation` (SGLD's step `epsilon`; NaN for other samplers): SGLD's step ε widens a direction of
    stiffness k by 1/(1 − εk/4), which raises that direction's term of λ̂ by ≈ ε(k − γ)/8. Summed over
    directions this is ε·(tr ∇²U − dγ)/8, and tr ∇²U = E‖∇U‖² under the posterior (integrate by parts), which
    the traces give: ‖∇U‖² = nβ²‖∇L_B‖² + 2γ(w − w*)·∇U − γ²‖w − w*‖² (minibatch noise counts too: it also
    widens the chains). As a share of λ̂ it is the estimate's own step-size bias, read where the virial cannot
    (directions flat for the likelihood hold the virial below 1 whatever ε does)."""
    distance = float(traces["distance"].mean())
    fraction = float(traces["likelihood_fraction"].mean())
    acceptance = float(np.nanmean(traces["acceptance"])) if np.isfinite(traces["acceptance"]).any() else math.nan
    virial = float(traces["virial"].mean()) / d
    virial_se = mcmc_summary(traces["virial"] / d)["mcse"]
    virial_se = virial_se if math.isfinite(virial_se) else 0.0  # (w − w*)·∇U/d: off 1 by more than noise?
    prior_share = gamma * float((traces["distance"] ** 2).mean()) / d
    radius = math.sqrt(d / gamma) if gamma > 0 else math.inf
    # ∂λ̂/∂γ = −½·Cov_p(nβL, ‖w − w*‖²): the batch noise in L_B is independent of w, so it leaves the covariance alone
    product = (llc_trace - llc_trace.mean()) * (traces["distance"] ** 2 - (traces["distance"] ** 2).mean())
    scale = -gamma / (2 * float(llc_trace.mean())) if llc_trace.mean() > 0 else math.nan
    elasticity, elasticity_se = scale * float(product.mean()), abs(scale) * mcmc_summary(product)["mcse"]
    mcmc = mcmc_summary(llc_trace)
    drift_t, change = _drift_t(llc_trace)
    llc = float(llc_trace.mean())
    moving = abs(drift_t) > DRIFT_T and abs(change) > DRIFT_REL * max(abs(llc), 1e-12)
    step_share = math.nan  # SGLD's step's share of λ̂ (docstring): NaN for other samplers, or when λ̂ ≤ 0
    if math.isfinite(epsilon) and llc > 0:
        drift_sq = nbeta**2 * traces["grad_norm"] ** 2 + 2 * gamma * traces["virial"] - gamma**2 * traces["distance"] ** 2
        step_share = epsilon * max(float(drift_sq.mean()) - d * gamma, 0.0) / (8 * llc)

    said, regime = [], "likelihood"
    if virial > VIRIAL_HIGH and virial - 1 > 3 * virial_se:
        regime = "step size"
        said.append(f"the chains spread {virial:.2f}× wider than the posterior allows (virial E[(w − w*)·∇U]/d = "
                    f"{virial:.3f} > {VIRIAL_HIGH}): epsilon is too coarse for the "
                    f"curvature and λ̂ reads high; lower epsilon (calibrate_llc finds one)")
    elif step_share > DISCRETISATION_HIGH and fraction >= PRIOR_DOMINATED:  # (under the prior, λ̂ ≈ 0 inflates it)
        regime = "step size"
        said.append(f"SGLD's step adds about {step_share:.0%} to λ̂ (its discretisation bias ε·(E‖∇U‖² − dγ)/(8λ̂) "
                    f"> {DISCRETISATION_HIGH:.0%}): epsilon is too coarse for the curvature and λ̂ reads high; lower "
                    f"epsilon (calibrate_llc finds one)")
    if (virial < VIRIAL_LOW and 1 - virial > 3 * virial_se) or moving:
        regime = "not mixed" if regime == "likelihood" else regime
        said.append(f"the chains are still spreading out (virial {virial:.3f} < {VIRIAL_LOW}, λ̂ trace t = "
                    f"{drift_t:.1f}): λ̂ reads low; raise num_burnin (or epsilon, or gamma to mix faster)")
    noise = 2 * elasticity_se if math.isfinite(elasticity_se) else 0.0

    def pulls(threshold: float) -> bool:  # the prior moves λ̂ beyond `threshold` and noise (unknown when λ̂ ≤ 0: yes)
        return not math.isfinite(elasticity) or (elasticity < -threshold and -elasticity > noise)

    if (fraction < PRIOR_DOMINATED or (math.isfinite(elasticity) and pulls(PRIOR_ELASTIC))
            or (prior_share > PRIOR_DOMINATED and pulls(PRIOR_ELASTIC_SHARED))):
        regime = "prior" if regime == "likelihood" else regime
        said.append(f"chains are prior-dominated (∂log λ̂/∂log γ = {elasticity:.2f}, prior share γ·E‖w − w*‖²/d = "
                    f"{prior_share:.2f}, likelihood share of "
                    f"the pull {fraction:.2f}, ‖w − w*‖ = {distance:.3g} vs prior radius {radius:.3g}): λ̂ reflects nβ "
                    f"and γ more than the model; raise nbeta or lower gamma (calibrate_llc finds them)")
    f, p, n_e = disagreement(llc_trace)
    if p < DISAGREE_P:
        regime = "not mixed" if regime == "likelihood" else regime
        said.append(f"the chains disagree: their λ̂ means spread {f:.1f}× the variance their Monte Carlo error allows "
                    f"(p = {p:.1g} < {DISAGREE_P}; R-hat {mcmc['r_hat']:.3f}): they sample different regions; raise "
                    f"num_burnin and num_draws")
    # Too few draws: noise, not bias, so the regime stays. Counted within chains: the bulk ESS also shrinks when the
    # chain means differ, which the disagreement test judges (a healthy 4 × 2000 zoo run: bulk ESS 92, 4 × 59 within).
    if n_e * llc_trace.shape[0] < MIN_ESS or n_e < MIN_CHAIN_ESS:
        said.append(f"only {n_e * llc_trace.shape[0]:.0f} effective draws ({n_e:.0f} per chain; need {MIN_ESS} and "
                    f"{MIN_CHAIN_ESS} per chain): the SE, and whether the chains agree, cannot be judged; raise "
                    f"num_draws (or num_burnin)")
    if llc < 0:
        said.append(f"λ̂ = {llc:.3g} < 0: the chains found lower loss than the checkpoint, which is then no local "
                    f"minimum of the sampled loss; raise gamma, or read the value as a lower bound")
    if llc > BASIN * d / 2 + 3 * mcmc["mcse"] and regime == "likelihood":
        said.append(f"λ̂ = {llc:.3g} exceeds d/2 = {d / 2:g}, the most any local minimum's LLC can be: the chains left "
                    f"the checkpoint's basin; raise gamma or lower epsilon")
    if acceptance < LOW_ACCEPTANCE:
        said.append(f"MALA acceptance {acceptance:.2f} < {LOW_ACCEPTANCE}: epsilon is large for the local curvature")
    for message in said:
        warnings.warn(f"LLC of {label}: {message}.", SamplerWarning, stacklevel=4)
    return SamplerDiagnostics(loss_increase, distance, radius, fraction, acceptance, drift_t, regime, tuple(said),
                              virial=virial, prior_share=prior_share, prior_elasticity=elasticity,
                              discretisation=step_share, **mcmc)


def plot_trace(result) -> Figure:
    """The per-step sampler metrics of an `LLCResult` (`result.trace`), one line per chain over the post-burn-in
    draws: nβ·(L_B − L_B(w*)) (λ̂'s trace, its mean dashed), ‖w − w*‖ (the prior radius dotted), ‖∇L_B‖,
    the noise's norm, the virial (w − w*)·∇U / d (1 at equilibrium) and the MALA acceptance (SGLD only)."""
    trace, diag = result.trace, result.diagnostics
    panels = [("λ̂ trace  nβ·(L_B − L_B(w*))", result.llc_trace.numpy(), result.mean),
              ("‖w − w*‖", trace["distance"], diag.prior_radius if math.isfinite(diag.prior_radius) else None),
              ("‖∇L_B‖", trace["grad_norm"], None), ("noise norm", trace["noise_norm"], None),
              ("virial (w − w*)·∇U / d", trace["virial"] / result.d, 1.0), ("MALA acceptance", trace["acceptance"], None)]
    fig = Figure(figsize=(10, 6.5), layout="constrained")
    for ax, (title, values, line) in zip(fig.subplots(3, 2, sharex=True).flat, panels):
        ax.plot(np.asarray(values).T, lw=0.6, alpha=0.8)
        if line is not None:
            ax.axhline(line, color="k", ls="--" if title.startswith("λ̂") else ":", lw=1)
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"{result.restrict}: λ̂ = {result.mean:.3g} ± {result.se:.2g}, R-hat {diag.r_hat:.3f}, bulk ESS "
                 f"{diag.ess_bulk:.0f}, regime {diag.regime}", fontsize=10)
    return fig
