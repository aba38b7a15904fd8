"""Calibration that chooses: sweep step size ε × localisation γ × inverse temperature nβ, read each cell's λ̂
and sampler diagnostics, and recommend one setting by a fixed rule.

The rule (`choose_setting`). A cell (ε, γ, nβ) is acceptable when
1. its chains are stable: no divergence, λ̂ > 0, a flat trace after burn-in (|trace_drift| < DRIFT_T) and,
   for SGLD, a MALA acceptance of at least LOW_ACCEPTANCE;
2. they are likelihood-dominated: the diagnostics' `regime` says so (the loss, not the prior, pulls the
   chains) and, where the sweep holds a larger nβ at the same (ε, γ), λ̂ is not proportional to nβ:
   its elasticity d log λ̂ / d log nβ (`nbeta_elasticity`, from neighbouring nβ cells) is below
   MAX_ELASTICITY. The elasticity is the direct test: ≈ 0 when the likelihood sets the loss increase
   (λ̂ is a property of the model), ≈ 1 when the prior or the chains' diffusion does; the norm-based
   `regime` alone misses prior-dominated chains in models whose few stiff directions carry large gradients;
3. λ̂ is settled in ε: the cell at ε/2 (same γ, nβ; it must be in the sweep and stable) gives a λ̂ within
   EPS_TOLERANCE (10%) of this one, so the step size no longer sets the answer.
Swept over several checkpoints, a setting must be acceptable at every one. Among acceptable settings the
recommendation is the smallest γ (the least prior), then the largest ε (the fastest mixing), then the nβ
closest (in ratio) to the default n/log n of the batch size. No acceptable cell: no recommendation (None).

Why nβ matters: when the prior dominates, the chains' loss increase is set by the noise and γ, not by nβ,
so λ̂ = nβ·(L − L*) grows in proportion to nβ. Only in the likelihood regime does the increase shrink as
1/nβ, making λ̂ a property of the model. The table's `regime` column says which one a cell is in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from torch import nn
from tqdm.auto import tqdm

from ..errors import InvalidValueError, LLCDivergenceError
from .diagnostics import DRIFT_T, LOW_ACCEPTANCE
from .heads import summary
from .llc import estimate_llc
from .settings import SGLDConfig, default_nbeta

EPS_TOLERANCE = 0.1  # λ̂ may change by at most this fraction when ε halves
MAX_ELASTICITY = 0.5  # d log λ̂ / d log nβ above this: λ̂ follows nβ, not the model
SETTING = ["epsilon", "gamma", "nbeta"]


@dataclass
class Calibration:
    """A sweep's table (one row per cell: λ̂, diagnostics and the rule's verdicts) and the chosen setting."""

    table: pd.DataFrame
    choice: dict[str, float] | None  # epsilon, gamma, nbeta; None when no cell passes the rule

    def config(self, base: SGLDConfig | None = None) -> SGLDConfig:
        """`base` (default: the defaults) with the chosen ε, γ and nβ."""
        if self.choice is None:
            raise InvalidValueError("No setting of the sweep passed the calibration rule; widen the sweep (smaller "
                                    "gammas, larger nbetas, smaller epsilons) and read `table` for why cells failed.")
        return SGLDConfig.build(base, **self.choice)


def calibrate_llc(
    model: nn.Module,
    data,
    config: SGLDConfig | None = None,
    *,
    epsilons: Sequence[float] = (2.5e-5, 5e-5, 1e-4, 2e-4),
    gammas: Sequence[float] = (1.0, 10.0, 100.0),
    nbetas: Sequence[float] = (30.0, 100.0, 300.0, 1000.0),
    restrict=None,
    loss_fn: Callable | None = None,
    progress: bool = True,
) -> Calibration:
    """Estimate λ̂ at every (epsilon, gamma, nbeta) of the sweep with `config`'s other settings, and choose
    one by the module's rule. The ε grid should hold halvings (each ε next to ε/2) for rule 3.

    Table columns: epsilon, gamma, nbeta, diverged, llc_mean, llc_se, ..., the diagnostics (loss_increase,
    distance, prior_radius, likelihood_fraction, acceptance, regime, trace_drift), stable, eps_change and
    acceptable; `llc_trace` holds each cell's chains × draws trace. A diverged cell is reported, not raised.
    """
    config = SGLDConfig.build(config)
    cells = [(e, g, b) for g in gammas for b in nbetas for e in epsilons]
    rows = []
    for epsilon, gamma, nbeta in tqdm(cells, desc="calibration", unit="cell", disable=not progress):
        setting = dict(epsilon=float(epsilon), gamma=float(gamma), nbeta=float(nbeta))
        try:
            r = estimate_llc(model, data, SGLDConfig.build(config, **setting), restrict=restrict, loss_fn=loss_fn,
                             progress=False)
        except LLCDivergenceError:
            rows.append(dict(setting, diverged=True, llc_mean=math.nan, llc_trace=None))
            continue
        rows.append(dict(setting, diverged=False, **summary(r), trace_drift=r.diagnostics.trace_drift,
                         llc_trace=r.llc_trace.numpy()))
    table = judge(pd.DataFrame(rows))
    return Calibration(table, choose_setting(table, default_nbeta=default_nbeta(config.resolve(data).batch_size)))


def judge(table: pd.DataFrame) -> pd.DataFrame:
    """Add the rule's verdicts per cell: `stable`, `eps_change` (relative change of λ̂ from ε/2 to ε),
    `nbeta_elasticity` (d log λ̂ / d log nβ towards the next larger nβ of the same ε, γ, else from the next
    smaller; NaN with one nβ) and `acceptable` (stable, likelihood-dominated, eps_change < EPS_TOLERANCE).
    Cells of several checkpoints carry a `step` column and are judged per step."""
    t = table.copy()
    for column, fill in (("regime", "prior"), ("trace_drift", math.inf), ("acceptance", math.nan)):
        t[column] = t[column].fillna(fill) if column in t else fill  # diverged cells have no diagnostics
    t["stable"] = (~t["diverged"].astype(bool) & (t["llc_mean"] > 0) & (t["trace_drift"].abs() < DRIFT_T)
                   & ~(t["acceptance"] < LOW_ACCEPTANCE))
    keys = (["step"] if "step" in t else []) + ["gamma", "nbeta"]
    half = t.assign(epsilon=t["epsilon"] * 2)[[*keys, "epsilon", "llc_mean", "stable"]]  # the cell at ε/2
    half = half.rename(columns={"llc_mean": "llc_half", "stable": "stable_half"})
    t["epsilon_key"] = t["epsilon"].round(15)
    half["epsilon_key"] = half.pop("epsilon").round(15)
    t = t.merge(half, on=[*keys, "epsilon_key"], how="left").drop(columns="epsilon_key")
    t["eps_change"] = ((t["llc_mean"] - t["llc_half"]) / t["llc_half"].abs()).abs().where(t["stable_half"] == True)  # noqa: E712
    t["nbeta_elasticity"] = _elasticity(t, [*keys[:-2], "epsilon", "gamma"])
    likelihood = (t["regime"] == "likelihood") & ~(t["nbeta_elasticity"] >= MAX_ELASTICITY)
    t["acceptable"] = t["stable"] & likelihood & (t["eps_change"] < EPS_TOLERANCE)
    return t.drop(columns=["llc_half", "stable_half"])


def _elasticity(t: pd.DataFrame, keys: list[str]) -> pd.Series:
    """d log λ̂ / d log nβ between each cell and its neighbour in nβ (the next larger; the last cell of a
    group uses the next smaller), within groups of equal `keys`; NaN where λ̂ ≤ 0 or the group has one nβ."""
    out = pd.Series(math.nan, index=t.index)
    for _, g in t.groupby(keys):
        g = g.sort_values("nbeta")
        log_llc = np.log(g["llc_mean"].where(g["llc_mean"] > 0)).to_numpy()
        log_nbeta = np.log(g["nbeta"].to_numpy())
        slopes = np.diff(log_llc) / np.diff(log_nbeta)
        if len(slopes):
            out[g.index] = np.append(slopes, slopes[-1])
    return out


def choose_setting(table: pd.DataFrame, *, default_nbeta: float | None = None) -> dict[str, float] | None:
    """The module's rule on a judged table (`judge`): among settings acceptable at every step, the smallest
    γ, then the largest ε, then the nβ closest in ratio to `default_nbeta`. None when none is acceptable."""
    ok = table.groupby(SETTING)["acceptable"].all().reset_index()
    ok = ok[ok["acceptable"]]
    if ok.empty:
        return None
    distance = np.abs(np.log(ok["nbeta"] / default_nbeta)) if default_nbeta else 0.0
    best = ok.assign(neg_eps=-ok["epsilon"], nbeta_distance=distance).sort_values(
        ["gamma", "neg_eps", "nbeta_distance"]).iloc[0]
    return {k: float(best[k]) for k in SETTING}


def plot_calibration(result: Calibration | pd.DataFrame) -> Figure:
    """Trace plots (rows: epsilon; columns: gamma × nbeta), one line per chain, the mean dashed; the title
    gives λ̂ and the regime, green when the cell passed the rule, red when it diverged."""
    table = result.table if isinstance(result, Calibration) else result
    if "gamma" not in table:
        table = table.assign(gamma=math.nan)
    epsilons = sorted(table["epsilon"].unique())
    columns = sorted(table[["gamma", "nbeta"]].drop_duplicates().itertuples(index=False, name=None))
    fig = Figure(figsize=(2.6 * len(columns), 2.0 * len(epsilons)), layout="constrained")
    axes = fig.subplots(len(epsilons), len(columns), squeeze=False, sharex=True)
    for row in table.itertuples():
        ax = axes[epsilons.index(row.epsilon), columns.index((row.gamma, row.nbeta))]
        if row.diverged:
            ax.text(0.5, 0.5, "diverged", ha="center", va="center", color="red", transform=ax.transAxes)
        else:
            ax.plot(np.asarray(row.llc_trace).T, lw=0.7, alpha=0.7)
            ax.axhline(row.llc_mean, color="k", ls="--", lw=1)
        passed = bool(getattr(row, "acceptable", False))
        regime = getattr(row, "regime", "")
        ax.set_title(f"ε={row.epsilon:g} γ={row.gamma:g} nβ={row.nbeta:g}\nλ̂={row.llc_mean:.3g} {regime}",
                     fontsize=7, color="green" if passed else "black")
    for ax in axes[-1]:
        ax.set_xlabel("draw")
    for ax in axes[:, 0]:
        ax.set_ylabel("nβ·(L − L*)")
    fig.suptitle("SGLD calibration (green: passes the rule)")
    return fig
