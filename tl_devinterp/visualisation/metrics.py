"""A task's model-level and per-layer metrics over training, one panel per metric, stages shaded.

Reads the tidy metrics frame `step, metric, layer, head, value` (per-head rows are the head-score heatmaps'
business, `visualisation.head_plots`); a per-layer metric draws one line per layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..dynamics.stages import Stage
from ..errors import InvalidValueError
from .dynamics import shade_stages


def plot_metrics(metrics: pd.DataFrame, stages: Sequence[Stage] = (), *, xscale: str = "symlog") -> Figure:
    """One panel per metric without a head (model-level: one line; per-layer: one line per layer)."""
    rows = metrics[metrics["head"].isna()]
    names = list(dict.fromkeys(rows["metric"]))
    if not names:
        raise InvalidValueError("No model-level or per-layer metrics to plot (only head scores).")
    cols = min(3, len(names))
    fig = Figure(figsize=(4.2 * cols, 3.0 * int(np.ceil(len(names) / cols))), layout="constrained")
    axes = fig.subplots(int(np.ceil(len(names) / cols)), cols, squeeze=False).ravel()
    for ax, name in zip(axes, names):
        frame = rows[rows["metric"] == name]
        for layer, g in frame.groupby(frame["layer"].fillna(-1), sort=True):
            g = g.sort_values("step")
            ax.plot(g["step"], g["value"], marker=".", label=None if layer < 0 else f"layer {int(layer)}")
        if frame["layer"].notna().any():
            ax.legend(fontsize=7)
        shade_stages(ax, stages)
        ax.set_xscale(xscale)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
    for ax in axes[len(names):]:
        ax.set_visible(False)
    return fig
