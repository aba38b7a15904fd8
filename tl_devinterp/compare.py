"""Two checkpoint series side by side: a counterfactual pair, e.g. trained with and without an intervention.

`compare_series(a, b)` aligns what is known of each series on their common steps: loss, LLC (with
SE), per-head scores and per-head refined LLCs, as one tidy frame with the difference b - a and its standard
error sqrt(se_a² + se_b²) (NaN where a quantity has no SE, like a loss on fixed data). It adds each series'
stages and its phase-change step (the first checkpoint where the best head's `metric` reaches `threshold`:
by default the first step with an induction head, prefix-matching score >= 0.3), and draws a report section.

Each side is an `AnalysisResult`, an `analyze` output folder (read from its `results/*.csv`), or a series (or
series folder): then its head scores and loss are measured with `metrics_over_series` on the series' own
data, and its LLCs with `llc_over_series` when `sgld` options are given. For a series trained with
interventions, pass `interventions.intervened(series)` to measure the networks as they ran in training.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .analysis import AnalysisConfig, AnalysisResult, task_data
from .dynamics import Stage, find_stages, stages_frame
from .errors import InvalidTypeError, InvalidValueError, MissingFileError
from .files import atomic_write
from .metrics import metrics_over_series
from .metrics.metrics_series import HEAD_METRICS
from .results import long_form, model_curve, model_rows
from .sampling import llc_over_series
from .series import MANIFEST, CheckpointSeries
from .tasks import TokenTask
from .visualisation.report import png_figure, table_html, write_report

COLUMNS = ["step", "quantity", "layer", "head", "value_a", "se_a", "value_b", "se_b", "diff", "diff_se"]


@dataclass
class SeriesComparison:
    """Aligned results of two series (see `compare_series`)."""

    labels: tuple[str, str]
    aligned: pd.DataFrame  # COLUMNS: quantity "loss", "llc", "rllc" or a head score; layer/head NA for the model
    stages: pd.DataFrame  # series, stage, start, end, type
    phase_changes: pd.DataFrame  # series, metric, threshold, step (NA: never), layer, head, final

    def figure(self) -> Figure:
        """Loss, LLC (± SE) with stage boundaries, the LLC difference (± 2 SE), and the best head score."""
        fig = Figure(figsize=(11, 7), layout="constrained")
        axes = fig.subplots(2, 2).ravel()
        colors = dict(zip(self.labels, ("#1f77b4", "#d62728")))
        model = self.aligned[self.aligned["layer"].isna()]
        for ax, quantity in zip(axes[:2], ("loss", "llc")):
            rows = model[model["quantity"] == quantity].sort_values("step")
            ax.set_title(quantity.upper() if quantity == "llc" else quantity)
            if rows.empty:
                ax.text(0.5, 0.5, f"no {quantity}", ha="center", transform=ax.transAxes)
                continue
            for side, label in zip("ab", self.labels):
                value, se = rows[f"value_{side}"], rows[f"se_{side}"].fillna(0)
                ax.plot(rows["step"], value, marker="o", ms=2.5, color=colors[label], label=label)
                ax.fill_between(rows["step"], value - se, value + se, color=colors[label], alpha=0.2, lw=0)
            if quantity == "llc":
                for label, g in self.stages.groupby("series"):
                    for start in g["start"].iloc[1:]:
                        ax.axvline(start, color=colors[label], ls=":", lw=1)
            ax.legend(fontsize=8)
        llc = model[model["quantity"] == "llc"].sort_values("step")
        ax = axes[2]
        ax.set_title(f"LLC difference ({self.labels[1]} − {self.labels[0]}) ± 2 SE")
        if not llc.empty:
            ax.plot(llc["step"], llc["diff"], color="#333", marker="o", ms=2.5)
            ax.fill_between(llc["step"], llc["diff"] - 2 * llc["diff_se"], llc["diff"] + 2 * llc["diff_se"],
                            color="#333", alpha=0.15, lw=0)
            ax.axhline(0, color="#999", lw=0.8)
        ax = axes[3]
        for r in self.phase_changes.itertuples():
            best = self.aligned[self.aligned["quantity"] == r.metric].groupby("step")[
                "value_a" if r.series == self.labels[0] else "value_b"].max()
            ax.plot(best.index, best.to_numpy(), marker="o", ms=2.5, color=colors[r.series], label=r.series)
            if not pd.isna(r.step):
                ax.axvline(r.step, color=colors[r.series], ls="--", lw=1)
            ax.axhline(r.threshold, color="#999", lw=0.8)
            ax.set_title(f"best {r.metric.replace('_', ' ')} score (dashed: phase change)")
        if len(self.phase_changes):
            ax.legend(fontsize=8)
        steps = self.aligned["step"].to_numpy()
        for ax in axes:
            ax.set_xscale("symlog", linthresh=float(steps[steps > 0].min(initial=1)))
            ax.set_xlabel("step")
        return fig

    def heads_figure(self) -> Figure:
        """Every head's scores (and rLLC) over training: one panel per quantity, solid a, dashed b."""
        per_head = self.aligned.dropna(subset=["layer"])
        quantities = list(dict.fromkeys(per_head["quantity"]))
        fig = Figure(figsize=(5.5 * max(1, len(quantities)), 3.8), layout="constrained")
        axes = fig.subplots(1, max(1, len(quantities)), squeeze=False)[0]
        heads = sorted({(int(la), int(h)) for la, h in zip(per_head["layer"], per_head["head"])})
        cmap = dict(zip(heads, _palette(len(heads))))
        for ax, quantity in zip(axes, quantities):
            for (layer, head), g in per_head[per_head["quantity"] == quantity].groupby(["layer", "head"]):
                g = g.sort_values("step")
                c = cmap[(int(layer), int(head))]
                ax.plot(g["step"], g["value_a"], color=c, lw=1.3, label=f"L{int(layer)}H{int(head)}")
                ax.plot(g["step"], g["value_b"], color=c, lw=1.3, ls="--")
            steps = per_head["step"].to_numpy()
            ax.set_xscale("symlog", linthresh=float(steps[steps > 0].min(initial=1)))
            ax.set_title(f"{quantity.replace('_', ' ')}: {self.labels[0]} (solid), {self.labels[1]} (dashed)",
                         fontsize=9)
            ax.set_xlabel("step")
        if quantities:
            axes[-1].legend(fontsize=7, ncol=2)
        return fig

    def summary(self) -> pd.DataFrame:
        """Loss and LLC at the last common step, with the phase-change step and final best score."""
        last = self.aligned[self.aligned["step"] == self.aligned["step"].max()]
        rows = []
        for side, label in zip("ab", self.labels):
            row: dict[str, Any] = {"series": label, "step": int(self.aligned["step"].max())}
            for q in ("loss", "llc"):
                value = last.loc[(last["quantity"] == q) & last["layer"].isna(), f"value_{side}"]
                row[q] = float(value.iloc[0]) if len(value) else np.nan
            pc = self.phase_changes[self.phase_changes["series"] == label]
            row.update({"phase_change_step": pc["step"].iloc[0] if len(pc) else pd.NA,
                        "final_best_score": pc["final"].iloc[0] if len(pc) else np.nan})
            rows.append(row)
        return pd.DataFrame(rows)

    def report_section(self, *, figures_dir: str | os.PathLike | None = None) -> tuple[str, list[str]]:
        """(heading, HTML blocks) for `visualisation.report.write_report`; PNGs also go to `figures_dir`."""
        a, b = self.labels
        parts = ["<p>Last common step, phase change (first step where the best head's score reaches the "
                 "threshold) and its final value:</p>" + table_html(self.summary())]
        parts.append(png_figure(self.figure(), "compare-curves", f"{a} vs {b}: loss, LLC (± SE, dotted: stage "
                                "boundaries), LLC difference (± 2 SE) and the best head score.", save_dir=figures_dir))
        if self.aligned["layer"].notna().any():
            parts.append(png_figure(self.heads_figure(), "compare-heads", f"Per-head trajectories: {a} solid, "
                                    f"{b} dashed.", save_dir=figures_dir))
        if not self.stages.empty:
            parts.append("<p>Stages from each LLC curve:</p>" + table_html(self.stages))
        return f"Comparison: {a} vs {b}", parts

    def write(self, out_dir: str | os.PathLike) -> Path:
        """`OUT/comparison.csv`, `stages.csv`, `phase_changes.csv`, `figures/*.png` and `OUT/comparison.html`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, frame in (("comparison", self.aligned), ("stages", self.stages), ("phase_changes", self.phase_changes)):
            atomic_write(out / f"{name}.csv", frame.to_csv(index=False))
        return write_report(out / "comparison.html", [self.report_section(figures_dir=out / "figures")],
                            title=f"tl_devinterp comparison: {self.labels[0]} vs {self.labels[1]}")


def compare_series(
    a: Any,
    b: Any,
    *,
    labels: tuple[str, str] = ("a", "b"),
    metric: str = "prefix_matching",
    threshold: float = 0.3,
    data: Any = None,
    sgld: dict[str, Any] | None = None,
    store_dir: str | os.PathLike | None = None,
    n_test_seqs: int = 256,
    n_probe_seqs: int = 64,
    progress: bool = True,
) -> SeriesComparison:
    """Align two series' results on their common steps (see the module docstring).

    `a`, `b`: `AnalysisResult`s, `analyze` output folders, or series / series folders. For series: `data`
    replaces their own data; `sgld` (keyword arguments of `llc_over_series`, e.g. `dict(num_draws=40,
    heads=True)`) also estimates LLCs; `store_dir` keeps per-checkpoint results for reruns; `n_test_seqs`
    test sequences for the loss, `n_probe_seqs` probe sequences for the head scores; `progress` shows their bars.
    The phase change is the first step where max over heads of `metric` >= `threshold`.
    """
    if metric not in HEAD_METRICS:
        raise InvalidValueError(f"metric must be a head score, one of {list(HEAD_METRICS)}; got {metric!r}.")
    if len(labels) != 2 or labels[0] == labels[1]:
        raise InvalidValueError(f"labels must be two different names, got {labels!r}.")
    sides = [_results(x, label, data=data, sgld=sgld, store_dir=store_dir, n_test_seqs=n_test_seqs,
                      n_probe_seqs=n_probe_seqs, progress=progress) for x, label in zip((a, b), labels)]
    long = [_long(llc, metrics) for llc, metrics, _ in sides]
    aligned = long[0].merge(long[1], on=["step", "quantity", "layer", "head"], suffixes=("_a", "_b"))
    if aligned.empty:
        raise InvalidValueError(f"{labels[0]} and {labels[1]} share no step with a common quantity: compare series trained "
                                f"on the same checkpoint schedule.")
    aligned["diff"] = aligned["value_b"] - aligned["value_a"]
    aligned["diff_se"] = np.sqrt(aligned["se_a"] ** 2 + aligned["se_b"] ** 2)
    aligned = aligned[COLUMNS].sort_values(["quantity", "layer", "head", "step"], na_position="first",
                                           ignore_index=True)
    stages = pd.concat([stages_frame(st).assign(series=label) for (_, _, st), label in zip(sides, labels)],
                       ignore_index=True)
    phases = pd.DataFrame([dict(series=label, **phase_change(metrics, metric=metric, threshold=threshold))
                           for (_, metrics, _), label in zip(sides, labels)])
    return SeriesComparison(labels=tuple(labels), aligned=aligned,
                            stages=stages[["series", "stage", "start", "end", "type"]], phase_changes=phases)


def phase_change(metrics: pd.DataFrame, *, metric: str = "prefix_matching", threshold: float = 0.3) -> dict[str, Any]:
    """The first step where the best head's `metric` reaches `threshold` (NA when it never does), that head,
    and the best score at the last step."""
    rows = metrics[metrics["metric"] == metric].dropna(subset=["layer", "head"])
    if rows.empty:
        raise InvalidValueError(f"The metrics frame has no per-head {metric!r} rows; measure it with metrics_over_series.")
    best = rows.loc[rows.groupby("step")["value"].idxmax()].sort_values("step")
    crossed = best[best["value"] >= threshold]
    first = crossed.iloc[0] if len(crossed) else None
    return dict(metric=metric, threshold=threshold,
                step=pd.NA if first is None else int(first["step"]),
                layer=pd.NA if first is None else int(first["layer"]),
                head=pd.NA if first is None else int(first["head"]),
                final=float(best["value"].iloc[-1]))


# --------------------------------------------------------------------------------------------------
def _results(x, label: str, *, data, sgld, store_dir, n_test_seqs: int, n_probe_seqs: int, progress: bool):
    """(LLC frame or None, metrics frame, stages) of one side."""
    if isinstance(x, AnalysisResult):
        return x.llc, x.metrics, x.stages
    if isinstance(x, (str, os.PathLike)) and (Path(x) / "results" / "metrics.csv").exists():
        results = Path(x) / "results"
        stages = pd.read_csv(results / "stages.csv")
        return (pd.read_csv(results / "llc.csv"), pd.read_csv(results / "metrics.csv"),
                [Stage(int(r.start), int(r.end), str(r.type)) for r in stages.itertuples()])
    if isinstance(x, (str, os.PathLike)):
        if not (Path(x) / MANIFEST).exists():
            raise MissingFileError(f"{x} ({label}) is neither an analyze output folder (results/metrics.csv) nor a "
                                    f"series folder ({MANIFEST}).")
        x = CheckpointSeries.from_dir(x)
    if not isinstance(x, CheckpointSeries):
        raise InvalidTypeError(f"{label} must be an AnalysisResult, an analyze output folder, a CheckpointSeries or a series "
                               f"folder; got {type(x).__name__}.")
    task, train, test = task_data(x, data, AnalysisConfig(n_test_seqs=n_test_seqs))
    # one store folder per series (its manifest, so another series under the same label never reuses results)
    store = None if store_dir is None or not x.meta else Path(store_dir) / f"{label}-{_meta_hash(x.meta)}"
    if isinstance(task, TokenTask):
        metrics = metrics_over_series(x, metrics=[*HEAD_METRICS, "loss"], tokens=test, n_seqs=n_probe_seqs,
                                      store_dir=store, progress=progress)
    else:
        metrics = task.metrics_over_series(x, train, test, store_dir=store, n_seqs=n_probe_seqs, progress=progress)
    if sgld is None:
        return None, metrics, []
    llc = llc_over_series(x, train, store_dir=store, progress=progress, loss_fn=task.sampler_loss, **sgld)
    stages = find_stages(*model_curve(llc)) if len(model_rows(llc)) >= 4 else []
    return llc, metrics, stages


def _meta_hash(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _long(llc: pd.DataFrame | None, metrics: pd.DataFrame) -> pd.DataFrame:
    """`step, quantity, layer, head, value, se` from an LLC frame (model: "llc", heads: "rllc") and metrics."""
    return long_form(llc, metrics)


def _palette(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]
