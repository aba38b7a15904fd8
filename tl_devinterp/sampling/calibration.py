"""Calibration: a sweep over step size ε × inverse temperature nβ, to see where SGLD is stable.

A good setting has a flat nβ·(L_B(w_t) − L_B(w*)) trace after burn-in, positive and below d/2;
a trace still rising means ε is too small (or burn-in too short), a spiking or diverging one that ε is too large.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from torch import nn

from .heads import summary
from .llc import LLCDivergenceError, SGLDConfig, estimate_llc


def calibrate_llc(
    model: nn.Module,
    data,
    *,
    epsilons: Sequence[float] = (1e-4, 3e-4, 1e-3, 3e-3),
    nbetas: Sequence[float] = (3.0, 10.0, 30.0),
    gamma: float = SGLDConfig.gamma,
    num_chains: int = SGLDConfig.num_chains,
    num_draws: int = SGLDConfig.num_draws,
    num_burnin: int = 0,
    batch_size: int = SGLDConfig.batch_size,
    restrict=None,
    loss_fn: Callable | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per (epsilon, nbeta): the estimate, `diverged`, and `llc_trace` (chains × draws array of
    nβ·(L_B(w_t) − L_B(w*))). A diverged setting is reported (NaN estimate, diverged=True), not raised."""
    rows = []
    for epsilon in epsilons:
        for nbeta in nbetas:
            try:
                r = estimate_llc(
                    model, data, epsilon=epsilon, gamma=gamma, nbeta=nbeta, num_chains=num_chains,
                    num_draws=num_draws, num_burnin=num_burnin, batch_size=batch_size, restrict=restrict,
                    loss_fn=loss_fn, seed=seed, progress=False,
                )
                rows.append(dict(epsilon=epsilon, nbeta=nbeta, diverged=False, **summary(r), llc_trace=r.llc_trace.numpy()))
            except LLCDivergenceError:
                rows.append(dict(epsilon=epsilon, nbeta=nbeta, diverged=True, llc_mean=math.nan, llc_trace=None))
    return pd.DataFrame(rows)


def plot_calibration(result: pd.DataFrame):
    """A grid of trace plots (rows: epsilon, columns: nbeta), one line per chain, the mean dashed."""
    epsilons, nbetas = sorted(result.epsilon.unique()), sorted(result.nbeta.unique())
    fig = Figure(figsize=(3 * len(nbetas), 2.2 * len(epsilons)), layout="constrained")
    axes = fig.subplots(len(epsilons), len(nbetas), squeeze=False, sharex=True)
    for _, row in result.iterrows():
        ax = axes[epsilons.index(row.epsilon), nbetas.index(row.nbeta)]
        if row.diverged:
            ax.text(0.5, 0.5, "diverged", ha="center", va="center", color="red", transform=ax.transAxes)
        else:
            trace = np.asarray(row.llc_trace)
            ax.plot(trace.T, lw=0.7, alpha=0.7)
            ax.axhline(row.llc_mean, color="k", ls="--", lw=1)
        ax.set_title(f"ε={row.epsilon:g}, nβ={row.nbeta:g}: λ̂={row.llc_mean:.3g}", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("draw")
    for ax in axes[:, 0]:
        ax.set_ylabel("nβ·(L − L*)")
    fig.suptitle("SGLD calibration: pick a stable, flat trace")
    return fig
