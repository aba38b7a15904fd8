"""Calibration that finds λ, not stability: an nβ ladder on mixed chains, ε from the measured discretisation bias.

SGLD's λ̂ = nβ·E[L_B(w) − L_B(w*)] is the model's λ only in the limit of its settings, and each setting has
its own bias (design.md §4). The rule fixes γ and removes the others in turn:
1. The prior. γ is fixed (`gamma`, small: the chains should spread along the flat directions of a singular
   model as far as its likelihood, not γ, allows). What the prior then still pulls in is the finite-nβ
   bias: λ̂ rises towards λ as nβ grows (the likelihood's share of the posterior grows).
2. Step size. SGLD's step adds a bias to λ̂ that every run measures, `diagnostics.discretisation` =
   ε·(E‖∇U‖² − dγ)/(8λ̂) as a share of λ̂ (`diagnostics.summarise` derives it). It grows as the chains spread
   into the stiffer places of the valley, so it is read off every run, not once. Each rung first probes its ε
   (PROBE_DRAWS steps from w*, ÷4 on a divergence, rescaled while above MAX_DISCRETISATION), so a too-large ε
   costs a probe, not a burn-in; the first guess is the ε that the rung below measured, scaled for this nβ
   (the stiffness grows ∝ nβ). A run above MAX_DISCRETISATION continues its chains at ε scaled to
   TARGET_DISCRETISATION (restarts from w* when far above).
3. Mixing. A run from w* burns in BURNIN_RELAXATIONS of the prior's relaxation time 1/(εγ) (the likelihood
   only speeds it up) and draws half as many; chains that disagree (R-hat > MAX_RHAT) or whose λ̂ trace still
   moves (|t| > DRIFT_T) continue for as long again with twice the draws. A continued run's `num_burnin` is
   the burn-in from w* at its ε with the same Langevin time Σ ε·steps: the setting a fresh run needs.
4. Temperature. nβ climbs ×LADDER (√10) from START × the config's (n/log n of the batch by default) until
   λ̂ moves by less than `tolerance`·(LADDER^BIAS_DECAY − 1) (relative, beyond 2 combined SEs) from the last
   rung below holding COMPARED of the pull (rungs below that are never compared, so need not mix), on a rung
   where the likelihood holds LIKELIHOOD_SHARE of the pull: if the finite-nβ bias falls at least as nβ^−½
   (a regular direction's falls as nβ^−1), the upper rung is then within `tolerance`. Where 2 SEs straddle the limit, the noisier rung's chains continue for twice the draws
   (draws are spent where the choice is made), under step 2's and 3's checks (long chains spread into
   stiffer places, where their ε adds more). The recommendation is the upper rung's setting.
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
LADDER = math.sqrt(10)  # nβ grows by this factor per rung
BIAS_DECAY = 0.5  # the finite-nβ bias is taken to fall at least as nβ^−0.5 (a regular direction's: as nβ^−1)
START = 0.01  # the first rung: this × the config's nβ
PROBE_DRAWS = 200  # a probe: this many steps from w*, long enough for the stiff directions that set ε to settle
LIKELIHOOD_SHARE = 0.98  # a rung is compared with the one below only when the likelihood's share of the pull is this
COMPARED = 0.9  # a rung with less of the pull is never the rung below a compared one (one rung raises a Gaussian
# direction's share nβk/(nβk + γ) from 0.9 to 0.966 < LIKELIHOOD_SHARE), so its chains need not mix
MAX_DISCRETISATION, TARGET_DISCRETISATION = 0.03, 0.015  # ε's share of λ̂: above the first, ε rescaled to the second
BURNIN_RELAXATIONS = 0.25  # burn-in: this × 1/(εγ), doubled (with the draws) while the chains are not mixed
MAX_RHAT = 1.1  # chains mixed: split R-hat of λ̂ at most this, and its trace's drift |t| at most diagnostics' DRIFT_T
MIN_CHAINS, MIN_DRAWS = 8, 200
MAX_EPSILON = 0.1  # ε·γ at most this: the prior's own direction widened by at most 1/(1 − 0.1/4)
SETTING = ["epsilon", "gamma", "nbeta", "num_burnin", "num_draws"]


@dataclass
class Calibration:
    """The runs (`table`: one row per run, its setting, λ̂, diagnostics, `discretisation`, the SGLD `steps` per
    chain it cost, whether it was an ε `probe` or `continued` an earlier run's chains, and the rule's
    `verdict`), the recommended setting
    (`choice`, None when the budget ran out or λ̂ follows nβ: `reason` says which) and its run's λ̂ (`llc`),
    and the SGLD steps per chain spent (`steps`)."""

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


def calibrate_llc(
    model: nn.Module,
    data,
    config: SGLDConfig | None = None,
    *,
    gamma: float = GAMMA,
    tolerance: float = 0.1,
    max_steps: int = 300_000,
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

    def run(epsilon: float, nbeta: float, burnin: int, draws: int, probe: bool = False,
            init: LLCResult | None = None) -> LLCResult | str:
        """One estimate, recorded in the table, or why none: "diverged", or "budget" (it cannot be paid for).
        `init`: an earlier run at this nβ whose chains it continues, so that its burn-in counts theirs too: the
        table's `num_burnin` is the burn-in from w* at this ε with the same Langevin time Σ ε·steps before the
        draws (what relaxes the flat directions), the setting a run from w* needs."""
        nonlocal spent
        if spent + burnin + draws > max_steps:
            return "budget"
        setting = dict(epsilon=epsilon, gamma=gamma, nbeta=nbeta, num_burnin=burnin, num_draws=draws)
        spent += burnin + draws
        bar.update(burnin + draws)
        before = 0.0 if init is None else rows[row_of[id(init)]]["burnin_time"] + init.config.epsilon * init.config.num_draws
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the table holds each run's diagnostics
                r = estimate_llc(model, data, SGLDConfig.build(config, **setting), restrict=restrict, loss_fn=loss_fn,
                                 progress=False, init=init)
        except LLCDivergenceError:
            rows.append(dict(setting, steps=burnin + draws, probe=probe, continued=init is not None, diverged=True,
                             llc_mean=math.nan, llc_trace=None, verdict="diverged"))
            return "diverged"
        time = before + epsilon * burnin  # the Langevin time before the draws: Σ ε·steps
        rows.append(dict(setting, num_burnin=math.ceil(time / epsilon - 1e-9), burnin_time=time, steps=burnin + draws,
                         probe=probe, continued=init is not None, diverged=False,
                         **summary(r), discretisation=np.nan_to_num(r.diagnostics.discretisation),  # λ̂ ≤ 0: unknown, 0
                         llc_trace=r.llc_trace.numpy()))
        row_of[id(r)] = len(rows) - 1
        return r

    def probe(epsilon: float, nbeta: float) -> float | None:
        """Step 2's ε at nβ from probes (PROBE_DRAWS steps from w*, no burn-in): ÷4 while a chain diverges,
        rescaled towards TARGET_DISCRETISATION (at most ÷10 a time) while the step adds more than
        MAX_DISCRETISATION of λ̂. A too-large ε costs a probe, not a burn-in. None: the budget ended."""
        while True:
            r = run(epsilon, nbeta, 0, PROBE_DRAWS, probe=True)
            if r == "budget":
                return None
            if r == "diverged":
                epsilon /= 4
                continue
            share = rows[-1]["discretisation"]
            rows[-1]["verdict"] = f"probe: ε adds {share:.1%}"
            if share <= MAX_DISCRETISATION:
                return epsilon
            epsilon *= max(TARGET_DISCRETISATION / share, 0.1)

    def rung(epsilon: float, nbeta: float, more: LLCResult | None = None) -> LLCResult | None:
        """Steps 2-3 at one nβ: a run whose ε adds < MAX_DISCRETISATION of λ̂ on mixed chains (a rung holding less
        than COMPARED of the pull need not mix: only its likelihood share is read); None: the budget ran out.
        Chains not mixed are continued (as long again, twice the draws), not restarted. `more`: a run of this
        rung whose chains continue for twice its draws (an undecided comparison), checked like a new one (long
        chains spread into stiffer places, where its ε adds more)."""
        if more is None and (epsilon := probe(epsilon, nbeta)) is None:
            return None
        burnin, draws, init = (None, MIN_DRAWS, None) if more is None else (0, 2 * more.config.num_draws, more)
        while True:
            if init is None:  # from w*: a quarter of the prior's relaxation time
                burnin = math.ceil(BURNIN_RELAXATIONS / (epsilon * gamma))
                draws = max(draws, burnin // 2)
            r = run(epsilon, nbeta, burnin, draws, init=init)
            if r == "diverged":
                epsilon, init = epsilon / 4, None
                continue
            if r == "budget":
                return None
            share = rows[-1]["discretisation"]
            if share > MAX_DISCRETISATION:  # the chains spread into stiffer places: a finer ε, continued there
                rows[-1]["verdict"] = f"ε adds {share:.0%}"
                epsilon, init = epsilon * TARGET_DISCRETISATION / share, (r if share < 2 * MAX_DISCRETISATION else None)
                if init is not None:
                    burnin, draws = rows[-1]["num_burnin"], 2 * draws
            elif r.diagnostics.likelihood_fraction < COMPARED:
                rows[-1]["verdict"] = "prior-dominated" if r.diagnostics.likelihood_fraction < PRIOR_DOMINATED else \
                    "never compared"
                return r
            elif r.diagnostics.r_hat > MAX_RHAT or abs(r.diagnostics.trace_drift) > DRIFT_T:
                rows[-1]["verdict"] = "not mixed: continued"
                burnin, draws, init = rows[-1]["num_burnin"], 2 * draws, r  # the chains' steps so far, again
            else:
                return r

    # the first rung: START × the config's nβ
    nbeta, epsilon = START * config.nbeta, MAX_EPSILON / gamma
    close = tolerance * (LADDER**BIAS_DECAY - 1)  # the gap between rungs that leaves the upper one within tolerance
    below, choice, reason = None, None, ""  # below: the last rung holding COMPARED of the pull
    r = rung(epsilon, nbeta)
    while r is not None:
        row = rows[row_of[id(r)]]
        if r.diagnostics.likelihood_fraction >= LIKELIHOOD_SHARE and below is not None:
            gap, noise = abs(r.mean - below.mean), 2 * math.hypot(r.se, below.se)
            if gap + noise < close * abs(r.mean):
                row["verdict"] = "converged in nβ: recommended"
                choice = {k: float(row[k]) for k in SETTING}
                break
            if gap - noise < close * abs(r.mean):  # undecided: the noisier rung's chains continue for more draws
                row["verdict"] = "undecided: more draws"
                noisier = below if below.se > r.se else r
                if (again := rung(noisier.config.epsilon, noisier.config.nbeta, more=noisier)) is None:
                    r = None
                    break
                if noisier is below:  # (the upper rung's row gets its verdict below)
                    rows[row_of[id(again)]].setdefault("verdict", "more draws")
                below, r = (again, r) if noisier is below else (below, again)
                continue
        row["verdict"] = row.get("verdict") or "moving with nβ"
        if r.diagnostics.likelihood_fraction >= COMPARED:
            below = r
        if nbeta * LADDER > max_nbeta:
            reason = f"λ̂ still moves with nβ at max_nbeta = {max_nbeta:g}"
            break
        share = max(row["discretisation"], 1e-6)
        epsilon = min(r.config.epsilon * TARGET_DISCRETISATION / share, MAX_EPSILON / gamma) / LADDER
        nbeta *= LADDER
        r = rung(epsilon, nbeta)
    bar.close()
    if choice is None and not reason:
        reason = f"the budget ({max_steps} steps per chain) ran out at nβ = {nbeta:.4g}"
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
