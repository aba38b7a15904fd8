"""Susceptibility pictures: a heads × shifts heatmap at one checkpoint, and each head's χ over training.

Reads the tidy frame of `susceptibilities` (rows with `scope == "head"`), with a `step` column when it
comes from `susceptibilities_over_series`. Built on a bare `Figure`, like the package's other figures.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..errors import InvalidValueError
from ..models import head_name
from ..results import head_rows


def plot_susceptibilities(frame: pd.DataFrame, step: int | None = None) -> Figure:
    """Without `step` over a series: one panel per shift, χ of each head against training step (±SE).
    Otherwise (or for a single checkpoint's frame) a heads × shifts heatmap, diverging around 0."""
    heads = head_rows(frame)
    if heads.empty:
        raise InvalidValueError("The frame has no per-head rows: compute it with heads=True.")
    if "step" in heads and step is None and heads.step.nunique() > 1:
        return _over_training(heads)
    if "step" in heads:
        step = heads.step.max() if step is None else step
        heads = heads[heads.step == step]
    table = heads.assign(name=[head_name(layer, h) for layer, h in zip(heads["layer"], heads["head"], strict=True)]) \
        .pivot(index="name", columns="shift", values="susceptibility")
    fig = Figure(figsize=(1.2 + 0.9 * table.shape[1], 0.6 + 0.32 * table.shape[0]), layout="constrained")
    ax = fig.subplots()
    bound = float(np.nanmax(np.abs(table.to_numpy()))) or 1.0
    image = ax.imshow(table.to_numpy(), cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xticks(range(table.shape[1]), table.columns, rotation=30, ha="right")
    ax.set_yticks(range(table.shape[0]), table.index)
    fig.colorbar(image, ax=ax, label="susceptibility χ")
    ax.set_title("Susceptibilities" + (f" at step {step}" if step is not None else ""))
    return fig


def _over_training(heads: pd.DataFrame) -> Figure:
    shifts = list(dict.fromkeys(heads["shift"]))
    fig = Figure(figsize=(4.5 * len(shifts), 3.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(shifts), sharey=True))
    for ax, shift in zip(axes, shifts, strict=True):
        for (layer, h), rows in heads[heads["shift"] == shift].groupby(["layer", "head"]):
            rows = rows.sort_values("step")
            line, = ax.plot(rows.step, rows.susceptibility, marker=".", lw=1, label=head_name(layer, h))
            ax.fill_between(rows.step, rows.susceptibility - rows.susceptibility_se,
                            rows.susceptibility + rows.susceptibility_se, color=line.get_color(), alpha=0.15)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_title(f"shift: {shift}")
        ax.set_xlabel("training step")
    axes[0].set_ylabel("susceptibility χ")
    axes[-1].legend(fontsize=7, ncols=2)
    return fig
