"""Calibration that finds λ, not stability: an nβ ladder on mixed chains, ε from the measured discretisation bias.

SGLD's λ̂ = nβ·E[L_B(w) − L_B(w*)] is the model's λ only in the limit of its settings, and each setting has
its own bias (design.md §4). The rule fixes γ and removes the others in turn:
1. The prior. γ is fixed (`gamma`, small: the chains should spread along the flat directions of a singular
   model as far as its likelihood, not γ, allows). What the prior then still pulls in is the finite-nβ
   bias: λ̂ rises towards λ as nβ grows (the likelihood's share of the posterior grows).
2. Step size. SGLD's step ε widens a direction of stiffness k by 1/(1 − εk/4), which raises that direction's
   term of λ̂ by ≈ ε(k − γ)/8. Summed over directions this is ε·(tr ∇²U − dγ)/8, and tr ∇²U = E‖∇U‖²
   under the posterior (integrate by parts), which every run measures: its bias estimate
   `discretisation` = ε·(E‖∇U‖² − dγ)/(8λ̂), a fraction of λ̂ (minibatch noise counts too: it also widens
   the chains). The stiff directions dominate it and settle first, so it is read off chains that have not
   finished spreading out along the flat ones. A run above MAX_DISCRETISATION repeats with ε scaled to
   TARGET_DISCRETISATION; each rung starts from the ε that the previous rung's measurement gives for its nβ
   (the stiffness grows ∝ nβ).
3. Mixing. A run burns in BURNIN_RELAXATIONS of the prior's relaxation time 1/(εγ) (the likelihood only
   speeds it up) and draws half as many; a run whose chains disagree (R-hat > MAX_RHAT) or whose λ̂ trace
   still moves (|t| > DRIFT_T) repeats with twice both.
4. Temperature. nβ climbs ×LADDER from START × the config's (n/log n of the batch by default), at least
   d/20 (below it the chains' loss increase λ/nβ nears the sampler's divergence limit of 100 nats), until
   λ̂ moves by less than `tolerance` (relative, beyond 2 combined SEs) from the last likelihood-dominated
   rung below, on a rung where the likelihood holds LIKELIHOOD_SHARE of the pull. Where 2 SEs straddle
   `tolerance`, the noisier rung's draws double (draws are spent where the choice is made). The
   recommendation is the upper rung's setting.
Every run counts towards `max_steps` (SGLD steps per chain, burn-in included); when the budget runs out
first there is no recommendation, and `Calibration.reason` says where. Its accuracy on the known-answer zoo
(`known_answers`; `python -m tl_devinterp.sampling.known_answers` prints the table the README's *Trusting
the numbers* quotes) is measured only on the cases listed there.

On a model whose checkpoint is not a minimum of the sampled loss (a language model mid-training) λ̂ has no
nβ → ∞ limit (the chains run downhill as nβ grows): the ladder then ends without a recommendation, and the
table shows how λ̂ follows nβ.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from torch import nn
from tqdm.auto import tqdm

from ..errors import InvalidValueError, LLCDivergenceError
from .diagnostics import DRIFT_T, PRIOR_DOMINATED
from .head_llcs import summary
from .llc import LLCResult, estimate_llc
from .settings import SGLDConfig

GAMMA = 1.0  # the prior's strength the calibration fixes (weights of order 1: the prior radius is √d)
LADDER = 10.0  # nβ grows by this factor per rung
START = 0.01  # the first rung: this × the config's nβ
LIKELIHOOD_SHARE = 0.98  # a rung is compared with the one below only when the likelihood's share of the pull is this
MAX_DISCRETISATION, TARGET_DISCRETISATION = 0.03, 0.015  # ε's share of λ̂: above the first, ε rescaled to the second
BURNIN_RELAXATIONS = 0.25  # burn-in: this × 1/(εγ), doubled (with the draws) while the chains are not mixed
MAX_RHAT = 1.1  # chains mixed: split R-hat of λ̂ at most this, and its trace's drift |t| at most diagnostics' DRIFT_T
MIN_CHAINS, MIN_DRAWS = 8, 200
MAX_EPSILON = 0.1  # ε·γ at most this: the prior's own direction widened by at most 1/(1 − 0.1/4)
SETTING = ["epsilon", "gamma", "nbeta", "num_burnin", "num_draws"]


@dataclass
class Calibration:
    """The runs (`table`: one row per run, its setting, λ̂, diagnostics, `discretisation` and the rule's
    `verdict`), the recommended setting (`choice`, None when the budget ran out or λ̂ follows nβ: `reason`
    says which) and its run's λ̂ (`llc`), and the SGLD steps per chain spent (`steps`)."""

    table: pd.DataFrame
    choice: dict[str, float] | None
    steps: int = 0
    reason: str = ""
    llc: float = math.nan  # λ̂ of the recommended run

    def config(self, base: SGLDConfig | None = None) -> SGLDConfig:
        """`base` (default: the defaults) with the recommended ε, γ, nβ, burn-in and draws (and at least
        the chains the calibration ran)."""
        if self.choice is None:
            raise InvalidValueError(f"calibrate_llc found no setting: {self.reason}. Read `table` for the runs; "
                                    f"raise max_steps or start from a larger nbeta.")
        base = SGLDConfig.build(base)
        return SGLDConfig.build(base, num_chains=max(base.num_chains, MIN_CHAINS),
                                **{k: (int(v) if k.startswith("num_") else v) for k, v in self.choice.items()})


def discretisation(result: LLCResult) -> float:
    """ε·(E‖∇U‖² − dγ)/(8λ̂): the share of λ̂ that SGLD's step adds (module docstring, step 2). ‖∇U‖² per
    step from the traces: nβ²‖∇L_B‖² + 2γ(w − w*)·∇U − γ²‖w − w*‖²."""
    c, t = result.config, result.trace
    drift_sq = c.nbeta**2 * t["grad_norm"] ** 2 + 2 * c.gamma * t["virial"] - c.gamma**2 * t["distance"] ** 2
    return c.epsilon * max(float(np.mean(drift_sq)) - result.d * c.gamma, 0.0) / (8 * max(result.mean, 1e-12))


def calibrate_llc(
    model: nn.Module,
    data,
    config: SGLDConfig | None = None,
    *,
    gamma: float = GAMMA,
    tolerance: float = 0.1,
    max_steps: int = 100_000,
    max_nbeta: float = 1e9,
    restrict=None,
    loss_fn: Callable | None = None,
    progress: bool = True,
) -> Calibration:
    """Recommend ε, nβ, burn-in and draws at the prior strength `gamma` (the config's γ is replaced; its
    chains, at least MIN_CHAINS, and batch size are kept) by the module's rule: λ̂ converged in nβ within
    `tolerance` on mixed chains whose step adds < MAX_DISCRETISATION of λ̂. `max_steps` bounds the SGLD steps
    per chain over all runs; `max_nbeta` the ladder's top."""
    config = SGLDConfig.build(config).resolve(data)
    if not 0 < tolerance < 1:
        raise InvalidValueError(f"tolerance (relative change of λ̂ that counts as converged) must be in (0, 1), got "
                                f"{tolerance}.")
    if gamma <= 0:
        raise InvalidValueError(f"calibrate_llc needs gamma > 0 (the prior sets the mixing time), got {gamma}.")
    config = SGLDConfig.build(config, gamma=gamma, num_chains=max(config.num_chains, MIN_CHAINS))
    rows: list[dict] = []
    row_of: dict[int, int] = {}  # id of a run's result -> its row
    spent = 0
    bar = tqdm(total=max_steps, desc="calibration", unit="step", disable=not progress)

    def run(epsilon: float, nbeta: float, burnin: int, draws: int) -> LLCResult | str:
        """One estimate, recorded in the table, or why none: "diverged", or "budget" (it cannot be paid for)."""
        nonlocal spent
        if spent + burnin + draws > max_steps:
            return "budget"
        setting = dict(epsilon=epsilon, gamma=gamma, nbeta=nbeta, num_burnin=burnin, num_draws=draws)
        spent += burnin + draws
        bar.update(burnin + draws)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the table holds each run's diagnostics
                r = estimate_llc(model, data, SGLDConfig.build(config, **setting), restrict=restrict, loss_fn=loss_fn,
                                 progress=False)
        except LLCDivergenceError:
            rows.append(dict(setting, diverged=True, llc_mean=math.nan, llc_trace=None, verdict="diverged: ε ÷ 4"))
            return "diverged"
        rows.append(dict(setting, diverged=False, **summary(r), discretisation=discretisation(r),
                         llc_trace=r.llc_trace.numpy()))
        row_of[id(r)] = len(rows) - 1
        return r

    def rung(epsilon: float, nbeta: float, burnin: int = 0, draws: int = MIN_DRAWS) -> tuple[LLCResult | None, str]:
        """Steps 2-3 at one nβ: a run whose ε adds < MAX_DISCRETISATION of λ̂ on mixed chains (a prior-dominated
        rung need not mix: only its likelihood share is read), or (None, why)."""
        burnin = max(burnin, math.ceil(BURNIN_RELAXATIONS / (epsilon * gamma)))
        draws = max(draws, burnin // 2)
        while True:
            r = run(epsilon, nbeta, burnin, draws)
            if r == "diverged":
                epsilon /= 4
                burnin = max(burnin, math.ceil(BURNIN_RELAXATIONS / (epsilon * gamma)))
                continue
            if r == "budget":
                return None, f"the budget ({max_steps} steps per chain) ran out at nβ = {nbeta:.4g}"
            share = rows[-1]["discretisation"]
            if share > MAX_DISCRETISATION:
                rows[-1]["verdict"] = f"ε adds {share:.0%}"
                epsilon *= TARGET_DISCRETISATION / share
                burnin = math.ceil(BURNIN_RELAXATIONS / (epsilon * gamma))
                draws = max(draws, burnin // 2)
            elif r.diagnostics.likelihood_fraction < PRIOR_DOMINATED:
                rows[-1]["verdict"] = "prior-dominated"
                return r, ""
            elif r.diagnostics.r_hat > MAX_RHAT or abs(r.diagnostics.trace_drift) > DRIFT_T:
                rows[-1]["verdict"] = "not mixed"
                burnin, draws = 2 * burnin, 2 * draws
            else:
                return r, ""

    # the first rung: START × the config's nβ, but not so low that the chains' loss increase ≈ λ/nβ ≤ d/(2nβ)
    # nears the sampler's divergence limit (100 nats): nβ ≥ d/20 (d of the whole model; a restriction's is smaller)
    d = sum(p.numel() for p in model.parameters() if p.requires_grad)
    nbeta, epsilon = max(START * config.nbeta, d / 20), MAX_EPSILON / gamma
    below, choice, reason = None, None, ""  # below: the last likelihood-dominated rung
    r, reason = rung(epsilon, nbeta)
    while r is not None:
        row = rows[row_of[id(r)]]
        if r.diagnostics.likelihood_fraction >= LIKELIHOOD_SHARE and below is not None:
            gap, noise = abs(r.mean - below.mean), 2 * math.hypot(r.se, below.se)
            if gap + noise < tolerance * abs(r.mean):
                row["verdict"] = "converged in nβ: recommended"
                choice = {k: float(row[k]) for k in SETTING}
                break
            if gap - noise < tolerance * abs(r.mean):  # undecided: more draws for the noisier of the two rungs
                row["verdict"] = "undecided: more draws"
                c = below.config if below.se > r.se else r.config
                again, reason = rung(c.epsilon, c.nbeta, c.num_burnin, 2 * c.num_draws)
                if again is None:
                    break
                below, r = (again, r) if below.se > r.se else (below, again)
                continue
        row["verdict"] = row.get("verdict") or "moving with nβ"
        if r.diagnostics.likelihood_fraction >= PRIOR_DOMINATED:
            below = r
        if nbeta * LADDER > max_nbeta:
            reason = f"λ̂ still moves with nβ at max_nbeta = {max_nbeta:g}"
            break
        share = max(discretisation(r), 1e-6)
        epsilon = min(r.config.epsilon * TARGET_DISCRETISATION / share, MAX_EPSILON / gamma) / LADDER
        nbeta *= LADDER
        r, reason = rung(epsilon, nbeta)
    bar.close()
    return Calibration(pd.DataFrame(rows), choice, spent, reason, r.mean if choice else math.nan)


def combine(calibrations: dict[int, Calibration]) -> Calibration:
    """One recommendation for several checkpoints (step -> its calibration): the largest nβ, the smallest ε
    scaled to it (ε·nβ is what stiffness limits), the longest burn-in and draws; none if any has none."""
    table = pd.concat([c.table.assign(checkpoint=step) for step, c in calibrations.items()], ignore_index=True)
    steps = sum(c.steps for c in calibrations.values())
    missing = {step: c.reason for step, c in calibrations.items() if c.choice is None}
    if missing:
        return Calibration(table, None, steps, "; ".join(f"step {s}: {why}" for s, why in missing.items()))
    choices = [c.choice for c in calibrations.values()]
    nbeta = max(c["nbeta"] for c in choices)
    choice = dict(epsilon=min(c["epsilon"] * c["nbeta"] for c in choices) / nbeta, gamma=choices[0]["gamma"],
                  nbeta=nbeta, num_burnin=max(c["num_burnin"] for c in choices),
                  num_draws=max(c["num_draws"] for c in choices))
    return Calibration(table, choice, steps)


def plot_calibration(result: Calibration | pd.DataFrame) -> Figure:
    """One panel per run in the order run: its λ̂ trace (one line per chain, the mean dashed), titled with its
    setting, λ̂ and the rule's verdict (green: recommended)."""
    table = result.table if isinstance(result, Calibration) else result
    n = len(table)
    cols = min(4, max(n, 1))
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(3.0 * cols, 2.2 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax, row in zip(axes, table.itertuples()):
        if row.diverged:
            ax.text(0.5, 0.5, "diverged", ha="center", va="center", color="red", transform=ax.transAxes)
        else:
            ax.plot(np.asarray(row.llc_trace).T, lw=0.6, alpha=0.7)
            ax.axhline(row.llc_mean, color="k", ls="--", lw=1)
        verdict = getattr(row, "verdict", "")
        verdict = verdict if isinstance(verdict, str) else ""
        ax.set_title(f"ε={row.epsilon:.2g} γ={row.gamma:g} nβ={row.nbeta:.3g}\nλ̂={row.llc_mean:.3g} {verdict}",
                     fontsize=7, color="green" if "recommended" in verdict else "black")
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle("SGLD calibration runs (nβ·(L − L*) per draw)")
    return fig
