"""One self-contained HTML page gathering the figures of an analysis; it works offline.

Images are embedded as base64 PNG data URIs and circuitsvis's JavaScript is inlined once, so the file
refers to nothing outside itself (no CDN, no image files). Every figure sits in a
`<figure class="tl-figure" id="fig-...">` so tests and readers can find each one.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..files import atomic_write
from ..models import head_name
from ..results import head_rows, model_rows
from ..sampling.diagnostics import PRIOR_DOMINATED
from ..sampling.diagnostics import ROW as DIAGNOSTIC_COLUMNS
from .attention import circuitsvis_script

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
figure.tl-figure { margin: 1.2em 0; } figure.tl-figure img { max-width: 100%; }
figcaption { color: #555; font-size: .9em; margin-top: .3em; }
table.tl-table { border-collapse: collapse; font-size: .9em; }
table.tl-table td, table.tl-table th { border: 1px solid #ddd; padding: 2px 8px; text-align: right; }
.tokens { font-family: monospace; line-height: 1.9; } .tok { padding: 1px 2px; border-radius: 2px; }
.tok-caption { font-size: .85em; color: #555; margin-top: .6em; }
"""


def _figure(body: str, fig_id: str, caption: str, kind: str) -> str:
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure class="tl-figure" id="fig-{html.escape(fig_id)}" data-kind="{kind}">\n{body}\n{cap}</figure>'


def png_figure(fig: Figure, fig_id: str, caption: str = "", *, save_dir: str | os.PathLike | None = None) -> str:
    """A matplotlib figure as an embedded PNG (also saved as `save_dir/<fig_id>.png`)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    png = buf.getvalue()
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        atomic_write(Path(save_dir) / f"{fig_id}.png", png)
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return _figure(f'<img alt="{html.escape(caption or fig_id)}" src="{uri}">', fig_id, caption, "png")


def html_figure(body: str, fig_id: str, caption: str = "", *, kind: str = "html") -> str:
    """Ready HTML (token pictures, circuitsvis views) as one figure of the report."""
    return _figure(body, fig_id, caption, kind)


def table_html(frame: pd.DataFrame, *, float_format: str = "{:.3g}") -> str:
    return frame.to_html(index=False, classes="tl-table", border=0, float_format=float_format.format)


def write_report(
    path: str | os.PathLike,
    sections: Sequence[tuple[str, Sequence[str]]],
    *,
    title: str = "tl_devinterp report",
    intro: str = "",
) -> Path:
    """Write `sections` (heading, list of HTML blocks) as one offline page; returns the path.

    circuitsvis's bundle is inlined once, only when a section holds an attention view.
    """
    blocks = [f"<h1>{html.escape(title)}</h1>", intro]
    for heading, parts in sections:
        blocks.append(f'<section><h2>{html.escape(heading)}</h2>\n' + "\n".join(parts) + "</section>")
    body = "\n".join(blocks)
    script = circuitsvis_script() if 'class="circuitsvis"' in body else ""
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<link rel="icon" href="data:,">'  # no favicon request
            f"<title>{html.escape(title)}</title><style>{_CSS}</style>{script}</head>\n<body>\n{body}\n</body></html>\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, page.encode("utf-8"))
    return path


def _regime_note(frame: pd.DataFrame, what: str) -> list[str]:
    """A sentence on how many estimates were prior-dominated or negative (empty without diagnostics)."""
    if "regime" not in frame:
        return []
    prior, negative = int((frame["regime"] == "prior").sum()), int((frame["llc_mean"] < 0).sum())
    warn = ' style="color:#b00"' if prior or negative else ""
    return [f"<p{warn}>Sampler regime ({what} estimates): {len(frame) - prior} of {len(frame)} likelihood-dominated, "
            f"{prior} prior-dominated (λ̂ there reflects nβ and γ more than the model); {negative} negative.</p>"]


def prior_share(frame: pd.DataFrame) -> tuple[int, int]:
    """(prior-dominated estimates, estimates) of an LLC frame: regime "prior", or the diagnostics' own test
    (likelihood share below PRIOR_DOMINATED or prior share above it) where `regime` names another cause first
    (a too-coarse ε is "step size" even when the prior also dominates, as on the demo)."""
    if "regime" not in frame or frame.empty:
        return 0, len(frame)
    prior = frame["regime"] == "prior"
    if "likelihood_fraction" in frame:
        prior |= frame["likelihood_fraction"] < PRIOR_DOMINATED
    if "prior_share" in frame:
        prior |= frame["prior_share"] > PRIOR_DOMINATED
    return int(prior.sum()), len(frame)


def proxy_headline(llc: pd.DataFrame) -> str:
    """One sentence for the top of a report (and the end of `analyze`) when LLC estimates are prior-dominated:
    the curve then follows the sampler's fixed setting more than the model ("" when none is)."""
    prior, total = prior_share(llc)
    if not prior:
        return ""
    what = "All" if prior == total else f"{prior} of {total}"
    return (f"{what} LLC estimates are prior-dominated (likelihood share < {PRIOR_DOMINATED} or prior share > {PRIOR_DOMINATED}): the curves are a proxy at one "
            f"fixed sampler setting (λ̂ follows nβ and γ more than the model), not the model's LLC; stages and head "
            f"clusters drawn from them say so. Calibrate (calibrate=True, or raise nbeta / lower gamma) for estimates "
            f"of the model.")


def _from_prior(llc: pd.DataFrame, what: str) -> str:
    """A warning beside a result derived from LLC estimates that were prior-dominated ("" when none was)."""
    prior, total = prior_share(llc)
    return (f'<p style="color:#b00">{html.escape(what)} derived from LLC estimates of which {prior} of {total} are '
            f'prior-dominated: they describe the sampler\'s fixed setting as much as the model.</p>') if prior else ""


def _sampler_parts(model_llc: pd.DataFrame, result) -> list[str]:
    """The settings used, the calibration's choice and table, and each checkpoint's diagnostics."""
    parts = _regime_note(model_llc, "model")
    calibration = getattr(result, "calibration", None)
    if calibration is not None:
        parts.append(f"<p>Calibration (sampling.calibration rule) chose {html.escape(str(calibration.choice))} "
                     f"{html.escape(calibration.reason)}.</p>")
        shown = [c for c in ("checkpoint", "step", "epsilon", "gamma", "nbeta", "num_burnin", "llc_mean", "llc_se",
                             "virial", "r_hat", "regime", "verdict") if c in calibration.table]
        parts.append("<details><summary>calibration runs</summary>" + table_html(calibration.table[shown]) + "</details>")
    shown = [c for c in ("step", "llc_mean", "llc_se", *DIAGNOSTIC_COLUMNS) if c in model_llc]
    if len(shown) > 3:
        parts.append("<details><summary>sampler diagnostics per checkpoint</summary>"
                     + table_html(model_llc[shown]) + "</details>")
    return parts


def stage_head_change(metrics: pd.DataFrame | None, start: int, end: int) -> str:
    """The head score that moved most over [start, end], e.g. "prefix_matching L1H2 0.09 → 0.70": what
    forms during a stage ("" without head scores at both ends)."""
    if metrics is None:
        return ""
    heads = metrics[metrics["layer"].notna() & metrics["step"].isin([start, end])]
    wide = heads.pivot_table(index=["metric", "layer", "head"], columns="step", values="value")
    if start not in wide or end not in wide or start == end:
        return ""
    change = (wide[end] - wide[start]).dropna()
    if change.empty:
        return ""
    metric, layer, head = change.abs().idxmax()
    return f"{metric} {head_name(int(layer), int(head))} {wide.at[(metric, layer, head), start]:.2f} → " \
           f"{wide.at[(metric, layer, head), end]:.2f}"


def analysis_report(result, path: str | os.PathLike, *, figures_dir: str | os.PathLike | None = None) -> Path:
    """The report of an `AnalysisResult` (see `tl_devinterp.analysis`): every part it holds, in pipeline
    order. PNGs also go to `figures_dir`."""
    from .dynamics import plot_essential_dynamics, plot_llc_stages
    from .head_plots import plot_head_clusters, plot_head_llcs, plot_head_scores
    from .metrics import plot_metrics
    from .token_html import loss_difference_html

    def png(fig, fig_id, caption):
        return png_figure(fig, fig_id, caption, save_dir=figures_dir)

    sections = []
    model_llc = model_rows(result.llc)
    headline = proxy_headline(result.llc)
    summary = [f'<p style="color:#b00;font-weight:bold" id="proxy-headline">{html.escape(headline)}</p>'] * bool(headline)
    summary += [f"<p>{len(model_llc)} checkpoints analysed, steps {model_llc['step'].min()}–{model_llc['step'].max()}."
               f" Results as CSV in <code>results/</code>, figures as PNG in <code>figures/</code>.</p>"]
    if result.stages:
        level = model_llc.set_index("step").reindex(columns=["llc_mean", "llc_se"])  # raw values at the boundaries
        summary.append(table_html(pd.DataFrame([
            {"stage": i + 1, "start": s.start, "end": s.end, "type": s.type, "LLC at start": level.at[s.start, "llc_mean"],
             "LLC at end": level.at[s.end, "llc_mean"], "SE at end": level.at[s.end, "llc_se"],
             "largest head-score change": stage_head_change(result.metrics, s.start, s.end)}
            for i, s in enumerate(result.stages)])))
        summary.append(_from_prior(model_llc, "The stages are"))
    if result.head_classes is not None and not result.head_classes.empty:
        summary.append("<p>Head classes at the last checkpoint (from head scores, not from LLCs):</p>"
                       + table_html(result.head_classes))
    sections.append(("Summary", summary))
    sections.append(("LLC and stages", [png(
        plot_llc_stages(model_llc["step"], model_llc["llc_mean"], result.stages, llc_std=model_llc["llc_std"],
                        loss=model_llc["init_loss"]),
        "llc-stages", "Local learning coefficient over training (± std across chains) and the loss on the "
        "sampled data; stages shaded (A: LLC rises, B: it falls)."), *_sampler_parts(model_llc, result)]))
    heads = head_rows(result.llc)
    if not heads.empty:
        sections.append(("Per-head refined LLCs", [png(
            plot_head_llcs(result.llc, result.head_classes, xscale="linear"), "head-llcs",
            "Refined LLC of each head over training (linear steps, so late transitions keep their width), one "
            "panel per layer, coloured by the head's class."), *_regime_note(heads, "head")]))
    if result.metrics is not None and result.metrics["head"].isna().any():
        sections.append(("The task's metrics", [png(
            plot_metrics(result.metrics, result.stages), "metrics",
            "The task's model-level and per-layer metrics over training (results/metrics.csv), stages shaded.")]))
    if result.metrics is not None and result.metrics["head"].notna().any():
        sections.append(("Head scores", [png(
            plot_head_scores(result.metrics), "head-scores", "Head scores over training (rows: heads).")]))
    if getattr(result, "head_clusters", None) is not None:
        clusters = result.head_clusters
        sections.append(("Head trajectories", [png(
            plot_head_clusters(clusters), "head-clusters",
            "Heads clustered by their normalised trajectories (rLLC and head scores over training, Ward linkage): "
            "the dendrogram, then each cluster's curves coloured by head class."),
            "<p>Heads per cluster and class:</p>" + table_html(clusters.table.reset_index()),
            _from_prior(heads, "The clusters are")]))
    if result.ed is not None:
        sections.append(("Essential dynamics", [png(
            plot_essential_dynamics(result.ed, result.stages), "essential-dynamics",
            "Principal components of the model's outputs over training, osculating circles and evolute cusps.")]))
    if (result.loss_differences is not None and not result.loss_differences.empty
            and (result.loss_differences["position"] >= 1).all()):  # one loss per predicted token
        parts = []
        for i, ((a, b), g) in enumerate(result.loss_differences.groupby(["step_from", "step_to"], sort=True)):
            diff = np.zeros(len(result.sample_tokens) - 1)  # positions the task does not score: no change
            diff[g["position"].to_numpy() - 1] = g["loss_diff"].to_numpy()
            body = loss_difference_html(result.sample_tokens, diff, caption=f"step {a} → {b}")
            parts.append(html_figure(body, f"loss-diff-{i}", f"Per-token loss change from step {a} to step {b} "
                                     "(red: loss fell, blue: loss rose).", kind="tokens"))
        sections.append(("Per-token loss changes between stage boundaries", parts))
    if result.attention:
        parts = [html_figure(view.html(include_js=False, element_id=f"circuitsvis-{i}"), f"attention-{i}",
                             f"Attention of {', '.join(view.head_names)} at step {step} on a sample sequence.",
                             kind="attention")
                 for i, (step, view) in enumerate(result.attention)]
        sections.append(("Attention at stage boundaries", parts))
    return write_report(path, sections, title=result.title)
