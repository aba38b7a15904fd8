"""Calibration that finds λ, not stability: a ladder of runs, each step of it aimed at one bias of SGLD's λ̂.

SGLD's λ̂ = nβ·E[L_B(w) − L_B(w*)] is the model's λ only in the limit of its settings, and each setting has
its own bias (design.md §4). The rule removes them in turn, on chains that have mixed:
1. Mixing. The localising prior relaxes ‖w − w*‖² in ≈ 1/(εγ) steps (an Ornstein-Uhlenbeck process), the
   likelihood only speeds that up (often by far: nβ·h ≫ γ in its stiff directions). Each run starts with
   BURNIN_RELAXATIONS of them (at least the config's own num_burnin) and draws half as many (at least
   MIN_DRAWS); a run the diagnostics call "not mixed" (virial E[(w − w*)·∇U]/d below 1: chains still
   spreading out; ‖w − w*‖ or the trace still moving; R-hat > 1.05) runs again with twice the burn-in.
2. Step size. SGLD's discretisation widens a direction of stiffness k by 1/(1 − εk/4): the virial measures
   that inflation directly (`diagnostics`). ε is halved while the virial exceeds 1 by more than
   VIRIAL_TOLERANCE and 2 of its MCSEs (a chain diverging: ε ÷ 4); while 2 MCSEs exceed VIRIAL_UNDECIDED,
   the run is repeated with twice the burn-in and draws (draws are spent where the choice is made). A rung's first ε is the previous rung's scaled by nβ_prev/nβ (stiffness ∝ nβ).
3. Temperature and prior. With γ fixed, raising nβ shrinks the prior's pull and the finite-nβ bias at once
   (the chains concentrate where the likelihood, not γ, holds them): nβ climbs a ladder (×10 while the prior
   dominates, ×4 after) from the config's nβ until λ̂ moves by less than `tolerance` (relative, beyond 2 SEs)
   between rungs. The setting is the last rung's.
4. Control. The chosen setting is run again at ε/2 (twice the burn-in): λ̂ must stay within `tolerance`,
   else ε halves and the control repeats. The recommendation is the setting whose ε/2 control agreed.
Every run counts towards `max_steps` (SGLD steps per chain, burn-in included); when the budget runs out first
there is no recommendation, and `Calibration.reason` says which step it was at. On the known-answer zoo
(`known_answers`, `python -m tl_devinterp.sampling.known_answers`) the README states the accuracy measured.

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
from .diagnostics import PRIOR_DOMINATED, mcmc_summary
from .head_llcs import summary
from .llc import estimate_llc
from .settings import SGLDConfig

BURNIN_RELAXATIONS = 0.5  # first burn-in 0.5/(εγ) steps, half the prior's relaxation time; doubled while not mixed
VIRIAL_TOLERANCE = 0.03  # virial − 1 above this (and 2 MCSEs): ε too coarse (the chains ≈ 3% wider than p)
VIRIAL_UNDECIDED = 0.1  # 2 MCSEs of the virial above this: too few draws to judge ε, run longer
MIN_DRAWS = 200
SETTING = ["epsilon", "gamma", "nbeta", "num_burnin", "num_draws"]


@dataclass
class Calibration:
    """The runs (`table`: one row per run, its setting, λ̂, diagnostics and the rule's `step`/`verdict`), the
    recommended setting (`choice`, None when the budget ran out or λ̂ follows nβ: `reason` says which), and
    the SGLD steps per chain spent (`steps`)."""

    table: pd.DataFrame
    choice: dict[str, float] | None
    steps: int = 0
    reason: str = ""

    def config(self, base: SGLDConfig | None = None) -> SGLDConfig:
        """`base` (default: the defaults) with the recommended ε, γ, nβ, burn-in and draws."""
        if self.choice is None:
            raise InvalidValueError(f"calibrate_llc found no setting: {self.reason}. Read `table` for the runs; "
                                    f"raise max_steps or start from a larger nbeta.")
        return SGLDConfig.build(base, **{k: (int(v) if k.startswith("num_") else v) for k, v in self.choice.items()})


def calibrate_llc(
    model: nn.Module,
    data,
    config: SGLDConfig | None = None,
    *,
    tolerance: float = 0.05,
    max_steps: int = 200_000,
    max_nbeta: float = 1e9,
    restrict=None,
    loss_fn: Callable | None = None,
    progress: bool = True,
) -> Calibration:
    """Recommend ε, nβ, burn-in and draws (γ, chains and batch size from `config`) by the module's rule:
    λ̂ converged in nβ within `tolerance` on mixed chains whose virial says ε is fine, confirmed at ε/2.
    `max_steps` bounds the SGLD steps per chain over all runs; `max_nbeta` the ladder's top."""
    config = SGLDConfig.build(config).resolve(data)
    if not 0 < tolerance < 1:
        raise InvalidValueError(f"tolerance (relative change of λ̂ that counts as converged) must be in (0, 1), got "
                                f"{tolerance}.")
    if config.gamma <= 0:
        raise InvalidValueError(f"calibrate_llc needs gamma > 0 (the prior sets the mixing time), got {config.gamma}.")
    rows: list[dict] = []
    spent = 0
    bar = tqdm(total=max_steps, desc="calibration", unit="step", disable=not progress)

    def run(step: str, epsilon: float, nbeta: float, burnin: int):
        """One estimate (None when a chain diverged), recorded in the table."""
        nonlocal spent
        draws = max(MIN_DRAWS, config.num_draws, burnin // 2)
        setting = dict(epsilon=epsilon, gamma=config.gamma, nbeta=nbeta, num_burnin=burnin, num_draws=draws)
        spent += burnin + draws
        bar.update(burnin + draws)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the table holds each run's diagnostics
                r = estimate_llc(model, data, SGLDConfig.build(config, **setting), restrict=restrict, loss_fn=loss_fn,
                                 progress=False)
        except LLCDivergenceError:
            rows.append(dict(setting, step=step, diverged=True, llc_mean=math.nan, llc_trace=None))
            return None
        rows.append(dict(setting, step=step, diverged=False, **summary(r), llc_trace=r.llc_trace.numpy()))
        return r

    def mixed_run(step: str, epsilon: float, nbeta: float):
        """Steps 1-2 at one nβ: (result, ε) with mixed chains and a virial within tolerance, or (None, why)."""
        burnin = max(config.num_burnin, math.ceil(BURNIN_RELAXATIONS / (epsilon * config.gamma)))
        while spent + burnin + max(MIN_DRAWS, config.num_draws, burnin // 2) <= max_steps:
            r = run(step, epsilon, nbeta, burnin)
            if r is None:
                epsilon /= 4
                burnin *= 4
                continue
            d = r.diagnostics
            se = mcmc_summary(r.trace["virial"] / r.d)["mcse"]  # the virial's own noise: decide only beyond it
            se = se if math.isfinite(se) else math.inf
            if d.virial - 1 > max(VIRIAL_TOLERANCE, 2 * se):
                rows[-1]["verdict"] = "ε too coarse"
                epsilon /= 2
                burnin *= 2
            elif 2 * se > VIRIAL_UNDECIDED:  # too few draws to tell: spend more where the choice is made
                rows[-1]["verdict"] = "virial undecided: more draws"
                burnin *= 2
            elif d.regime == "not mixed":
                rows[-1]["verdict"] = "not mixed"
                burnin *= 2
            else:
                return r, epsilon
        return None, f"the budget ({max_steps} steps per chain) ran out at nβ = {nbeta:g} ({step})"

    nbeta, epsilon = config.nbeta, config.epsilon
    previous, choice, reason = None, None, ""
    while True:
        r, epsilon_or_why = mixed_run("nβ ladder", epsilon, nbeta)
        if r is None:
            reason = epsilon_or_why
            break
        epsilon = epsilon_or_why
        prior = r.diagnostics.prior_share > PRIOR_DOMINATED or r.diagnostics.likelihood_fraction < PRIOR_DOMINATED
        converged = previous is not None and not prior and _agree(previous, r, tolerance)
        rows[-1]["verdict"] = "converged in nβ" if converged else ("prior-dominated" if prior else "moving with nβ")
        if converged:
            control, why = mixed_run("ε/2 control", epsilon / 2, nbeta)
            if control is None:
                reason = why
                break
            if _agree(r, control, tolerance):
                rows[-1]["verdict"] = "agrees at ε/2: recommended"
                choice = {k: float(rows[-1][k]) for k in SETTING}  # the control's own setting (finer ε)
                break
            rows[-1]["verdict"] = "moves at ε/2"
            epsilon /= 2
            r = control
        previous = r
        factor = 10.0 if prior else 4.0
        if nbeta * factor > max_nbeta:
            reason = f"λ̂ still moves with nβ at max_nbeta = {max_nbeta:g}"
            break
        nbeta, epsilon = nbeta * factor, epsilon / factor
    bar.close()
    return Calibration(pd.DataFrame(rows), choice, spent, reason)


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


def _agree(a, b, tolerance: float) -> bool:
    """λ̂ of two runs within `tolerance` of each other (relative), or within 2 combined SEs."""
    gap = abs(a.mean - b.mean)
    return gap < tolerance * max(abs(b.mean), 1e-12) or gap < 2 * math.hypot(a.se, b.se)


def plot_calibration(result: Calibration | pd.DataFrame) -> Figure:
    """One panel per run in the order run: its λ̂ trace (one line per chain, the mean dashed), titled with its
    setting, λ̂, regime and the rule's verdict (green: recommended)."""
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
        ax.set_title(f"ε={row.epsilon:.2g} γ={row.gamma:g} nβ={row.nbeta:.3g}\nλ̂={row.llc_mean:.3g} "
                     f"{getattr(row, 'regime', '') if not row.diverged else ''} {verdict}", fontsize=7,
                     color="green" if "recommended" in verdict else "black")
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle("SGLD calibration runs (nβ·(L − L*) per draw)")
    return fig
