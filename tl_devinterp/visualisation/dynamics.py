"""Figures for essential dynamics and developmental stages (matplotlib; `fig.savefig("x.png")`).

The figures are built with the object API on a bare `Figure` (Agg canvas), so they never open a window
and need no display.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.patches import Circle

from ..dynamics.essential import EDResult
from ..dynamics.stages import Stage

STAGE_COLOURS = {"A": "tab:blue", "B": "tab:orange"}


def _stage_index(steps: np.ndarray, stages: Sequence[Stage]) -> np.ndarray:
    """The stage (0-based) of each step; a boundary step belongs to the stage it starts."""
    starts = np.array([s.start for s in stages])
    return np.clip(np.searchsorted(starts, steps, side="right") - 1, 0, len(stages) - 1)


def plot_essential_dynamics(
    ed: EDResult, stages: Sequence[Stage] | None = None, *, n_circles: int = 40, size: float = 4.0
) -> Figure:
    """One panel per PC pair: the smoothed trajectory coloured by stage (by training progress without
    stages), raw PC scores as faint dots, up to `n_circles` osculating circles faint in the background,
    each pair's evolute cusps as black x and the consistent cusps as red stars."""
    n = len(ed.pairs)
    fig = Figure(figsize=(size * n, size), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    T = len(ed.steps)
    cmap = [f"C{k % 10}" for k in range(len(stages or []))]
    colours = [cmap[k] for k in _stage_index(ed.steps, stages)[:-1]] if stages else None
    every = max(1, T // max(n_circles, 1))
    consistent = np.isin(ed.steps, ed.consistent_cusps)
    for p, (ax, (i, j)) in enumerate(zip(axes, ed.pairs)):
        xy = ed.smoothed[:, [i, j]]
        lo, hi = xy.min(0), xy.max(0)
        pad = 0.1 * (hi - lo).max() + 1e-12
        for t in range(1, T - 1, every):
            r, c = ed.radius[p, t], ed.centres[p, t]
            if np.isfinite(r) and np.isfinite(c).all() and r < 10 * (hi - lo).max():
                ax.add_patch(Circle(c, r, fill=False, lw=0.5, alpha=0.15, color="grey"))
        ax.scatter(ed.scores[:, i], ed.scores[:, j], s=4, alpha=0.25, color="grey", zorder=1)
        segments = np.stack([xy[:-1], xy[1:]], axis=1)
        lines = LineCollection(segments, colors=colours, linewidths=2, zorder=2)
        if colours is None:
            lines.set_array(np.linspace(0, 1, T - 1))
            lines.set_cmap("viridis")
        ax.add_collection(lines)
        cusp = np.isin(ed.steps, ed.cusps[p])
        ax.scatter(*xy[cusp].T, marker="x", color="black", s=30, zorder=3, label="evolute cusp")
        ax.scatter(*xy[consistent].T, marker="*", color="red", s=120, zorder=4, label="consistent cusp")
        ax.set_xlim(lo[0] - pad, hi[0] + pad)
        ax.set_ylim(lo[1] - pad, hi[1] + pad)
        ax.set_xlabel(f"PC{i + 1} ({ed.explained_variance_ratio[i]:.0%})")
        ax.set_ylabel(f"PC{j + 1} ({ed.explained_variance_ratio[j]:.0%})")
    axes[0].legend(loc="best", fontsize=8)
    if stages:
        for k, s in enumerate(stages):
            axes[-1].plot([], [], color=cmap[k], lw=2, label=f"stage {k + 1} ({s.type})")
        axes[-1].legend(loc="best", fontsize=8)
    fig.suptitle("Essential dynamics")
    return fig


def shade_stages(ax, stages: Sequence[Stage]) -> None:
    """Shade each stage of `stages` on `ax` (A and B stages in their colours)."""
    for k, s in enumerate(stages):
        ax.axvspan(s.start, s.end, color=STAGE_COLOURS.get(s.type, "grey"), alpha=0.12 if k % 2 else 0.2, lw=0)


def plot_llc_stages(
    steps: Sequence[int],
    llc: Sequence[float],
    stages: Sequence[Stage],
    *,
    llc_std: Sequence[float] | None = None,
    loss: Sequence[float] | None = None,
    size: float = 4.0,
) -> Figure:
    """The LLC over training (log-step axis) with stages shaded (A blue, B orange) and numbered, ± llc_std
    as a band; with `loss`, a second panel beside it shows the loss under the same shading."""
    steps, llc = np.asarray(steps, dtype=float), np.asarray(llc, dtype=float)
    panels = [("LLC", llc, llc_std)] + ([("loss", np.asarray(loss, dtype=float), None)] if loss is not None else [])
    fig = Figure(figsize=(1.6 * size * len(panels), size), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    positive = steps[steps > 0]
    for ax, (name, y, std) in zip(axes, panels):
        shade_stages(ax, stages)
        ax.plot(steps, y, color="black", lw=1.2)
        if std is not None:
            std = np.asarray(std, dtype=float)
            ax.fill_between(steps, y - std, y + std, color="black", alpha=0.1, lw=0)
        ax.set_xscale("symlog", linthresh=positive.min() if len(positive) else 1.0)
        ax.set_xlim(steps.min(), steps.max())
        ax.set_xlabel("training step")
        ax.set_ylabel(name)
        for k, s in enumerate(stages):
            mid = np.sqrt(max(s.start, positive.min() if len(positive) else 1) * max(s.end, 1))
            ax.text(mid, 1.0, f"{k + 1}{s.type}", transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                    fontsize=8)
    fig.suptitle("LLC and developmental stages")
    return fig
