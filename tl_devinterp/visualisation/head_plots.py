"""Per-head pictures over training: head-score heatmaps and refined-LLC curves coloured by head class.

Built on bare `Figure`s (Agg canvas, no window), like the other figures of the package.

Both read the library's tidy frames: metrics `step, metric, layer, head, value` and LLCs
`step, scope, layer, head, llc_mean, llc_std, ...` (rows with `scope == "head"`), head classes
`layer, head, label` (from `classify_heads`).
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..errors import InvalidValueError
from ..models import head_name
from ..results import head_rows

CLASS_COLORS = {
    "previous-token": "#1f77b4",
    "induction": "#d62728",
    "duplicate-token": "#2ca02c",
    "copying": "#ff7f0e",
    "other": "#9a9a9a",
}
"""One colour per head class, shared by every figure (unknown classes get further tab10 colours)."""


def class_colors(labels: Sequence[str]) -> dict[str, str]:
    """A colour for each class in `labels`: the fixed ones above, then tab10 for any others."""
    extra = iter(c for c in matplotlib.colormaps["tab10"].colors if matplotlib.colors.to_hex(c) not in CLASS_COLORS.values())
    return {lab: CLASS_COLORS.get(lab) or matplotlib.colors.to_hex(next(extra)) for lab in dict.fromkeys(labels)}


def _require(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InvalidValueError(f"The {what} frame lacks columns {missing} (has {list(frame.columns)}).")


def plot_head_scores(metrics: pd.DataFrame, *, metrics_shown: Sequence[str] | None = None) -> Figure:
    """One heatmap per head score: rows are heads (L0H0, L0H1, ...), columns checkpoints, colour the score.

    `metrics_shown` picks metrics (default: every metric that has per-head rows).
    """
    _require(metrics, ["step", "metric", "layer", "head", "value"], "metrics")
    per_head = metrics.dropna(subset=["layer", "head"])
    names = list(metrics_shown or dict.fromkeys(per_head["metric"]))
    if not names:
        raise InvalidValueError("No per-head metrics to plot (every row has an empty layer/head).")
    steps = sorted(per_head["step"].unique())
    n_heads = len(per_head[["layer", "head"]].drop_duplicates())
    cols = min(2, len(names))
    rows = -(-len(names) // cols)
    width, height = max(4.0, 0.18 * len(steps) + 2), max(2.5, 0.25 * n_heads + 1.2)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(names):]:
        ax.set_axis_off()
    for ax, name in zip(axes, names):
        grid = (per_head[per_head["metric"] == name]
                .pivot_table(index=["layer", "head"], columns="step", values="value")
                .reindex(columns=steps))
        im = ax.imshow(grid.to_numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(grid)), [head_name(int(la), int(h)) for la, h in grid.index], fontsize=7)
        ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 8)).round().astype(int))
        ax.set_xticks(ticks, [str(int(steps[i])) for i in ticks], rotation=45, fontsize=7)
        ax.set_xlabel("step (one column per checkpoint)")
        ax.set_title(name.replace("_", " "))
        fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def plot_head_llcs(llc: pd.DataFrame, labels: pd.DataFrame | None = None, *, band: bool = True,
                   xscale: str = "log") -> Figure:
    """Refined LLC of each head over steps: one panel per layer, one line per head, coloured by class.

    `labels` (`layer, head, label`) colours the heads; without it every head is "other". `band` shades
    ± one std across chains. `xscale`: "log" (symlog, step 0 shown: early training) or "linear" (late
    transitions keep their width).
    """
    if xscale not in ("log", "linear"):
        raise InvalidValueError(f"xscale must be 'log' or 'linear', got {xscale!r}.")
    _require(llc, ["step", "scope", "layer", "head", "llc_mean", "llc_std"], "LLC")
    heads = head_rows(llc)
    if heads.empty:
        raise InvalidValueError("The LLC frame has no per-head rows (scope == 'head'); estimate head LLCs first.")
    lab = {}
    if labels is not None:
        _require(labels, ["layer", "head", "label"], "head label")
        lab = {(int(r.layer), int(r.head)): r.label for r in labels.itertuples()}
    colors = class_colors([*CLASS_COLORS, *sorted(set(lab.values()) - set(CLASS_COLORS))])
    layers = sorted(heads["layer"].astype(int).unique())
    fig = Figure(figsize=(5 * len(layers), 3.6), layout="constrained")
    axes = fig.subplots(1, len(layers), squeeze=False, sharey=True)
    for ax, layer in zip(axes[0], layers):
        for (la, h), g in heads[heads["layer"] == layer].groupby(["layer", "head"]):
            g = g.sort_values("step")
            c = colors[lab.get((int(la), int(h)), "other")]
            ax.plot(g["step"], g["llc_mean"], marker="o", ms=3, color=c, lw=1.5)
            if band:
                ax.fill_between(g["step"], g["llc_mean"] - g["llc_std"], g["llc_mean"] + g["llc_std"],
                                color=c, alpha=0.12, lw=0)
            ax.annotate(f"H{int(h)}", (g["step"].iloc[-1], g["llc_mean"].iloc[-1]), fontsize=7, color=c,
                        xytext=(3, 0), textcoords="offset points", va="center")
        if xscale == "log":
            positive = heads["step"].to_numpy()[heads["step"].to_numpy() > 0]
            ax.set_xscale("symlog", linthresh=float(positive.min(initial=1)))  # log steps, step 0 shown
        ax.set_xlabel("step")
        ax.set_title(f"layer {layer}")
    axes[0, 0].set_ylabel("refined LLC (head)")
    shown = dict.fromkeys(lab.get((int(la), int(h)), "other") for la, h in heads[["layer", "head"]].drop_duplicates()
                          .itertuples(index=False))
    handles = [Line2D([], [], color=colors[k], lw=2, label=k) for k in colors if k in shown]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, title="head class")
    return fig


def plot_head_clusters(clusters) -> Figure:
    """A `cluster_heads` result: the dendrogram of heads (labels coloured by class) beside each cluster's
    normalised curves over steps (one panel per cluster, line style per quantity, colour per class)."""
    from scipy.cluster.hierarchy import dendrogram

    heads = clusters.assignments
    colors = class_colors([*CLASS_COLORS, *sorted(set(heads["label"].dropna()) - set(CLASS_COLORS))])
    color_of = {(r.layer, r.head): colors[r.label if isinstance(r.label, str) else "other"] for r in heads.itertuples()}
    n = int(heads["cluster"].max())
    fig = Figure(figsize=(11, max(3.0, 2.2 * n)), layout="constrained")
    grid = fig.add_gridspec(n, 2, width_ratios=[1, 2.2])
    tree = fig.add_subplot(grid[:, 0])
    dendrogram(clusters.linkage, ax=tree, labels=heads["name"].tolist(), orientation="left", color_threshold=0,
               above_threshold_color="#555")
    by_name = dict(zip(heads["name"], zip(heads["layer"], heads["head"])))
    for label in tree.get_yticklabels():
        label.set_color(color_of[by_name[label.get_text()]])
    tree.set_title("heads by trajectory (Ward)")
    styles = dict(zip(sorted(clusters.curves["quantity"].unique()), ["-", "--", ":", "-."] * 4))
    steps = clusters.curves["step"].to_numpy()
    for k in range(1, n + 1):
        ax = fig.add_subplot(grid[k - 1, 1])
        members = heads[heads["cluster"] == k]
        for r in members.itertuples():
            mine = clusters.curves[(clusters.curves["layer"] == r.layer) & (clusters.curves["head"] == r.head)]
            for quantity, g in mine.groupby("quantity"):
                ax.plot(g["step"], g["normalised"], styles[quantity], color=color_of[(r.layer, r.head)], lw=1.3)
        ax.set_xscale("symlog", linthresh=float(steps[steps > 0].min(initial=1)))
        ax.set_title(f"cluster {k}: {', '.join(members['name'])}", fontsize=9)
        ax.set_ylabel("normalised", fontsize=8)
    ax.set_xlabel("step")
    handles = [Line2D([], [], color="#333", ls=s, label=q.replace("_", " ")) for q, s in styles.items()]
    shown = dict.fromkeys(lab if isinstance(lab, str) else "other" for lab in heads["label"])
    handles += [Line2D([], [], color=colors[k], lw=2, label=k) for k in shown]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    return fig
