"""The two regression settings (tl_devinterp.tasks.regression) on 2 CPU cores: the numbers and figures of the
README's sections "In-context linear regression" and "Sparse-attention regression".

    python benchmarks/regression_settings.py [--work DIR] [--docs docs] [--quiet]

0. The `icl-regression` preset (the paper's run as its code configures it): its parameter count and how often
   each training context is seen (it is not run).
1. In-context linear regression: trains the `icl-regression-quick` preset (D=3, K=8, Gaussian tasks, a 2-layer
   transformer of 13,760 parameters, 1500 steps; the paper's run is D=4, K=16, ~50k parameters, far longer) and
   analyses it (LLC at every checkpoint, head LLCs at 6, the task's metrics, stages, essential dynamics). Prints
   the stages and, at each boundary, the loss, its distance to ridge and dMMSE, the prediction norm, the ICL
   score, the LayerNorm-weight norms and the effective rank of W_pos. Figure: docs/icl_regression.png.
2. The same run continued: the `icl-regression-long` preset (the quick run to 12,000 steps, whose first 1500 are
   the quick run's) with the LLC at every checkpoint (the sampler above) and the task's metrics. Prints the
   stages and, at each boundary, the LLC's peak, step 1500 and the end, the LLC, loss, ICL score, LayerNorm-weight
   norms, unembedding norm and effective rank of W_pos. Figure: docs/icl_regression_long.png (about 12 minutes).
3. Where the stage rule puts LR1's end: the quick run's LLC at its own 20 checkpoints and at a dense grid of 43
   (n_log_checkpoints=40; the same weights at the shared steps), with 3 and 8 chains; prints `find_stages` from
   step 0 and from step 1, with the chains' SE and with its default, the scatter along the curve.
4. Sparse-attention regression: trains the `sparse-regression-quick` architecture (D=8, 1 layer, 2 heads) at
   T = 8, 16, 32, 64 with two seeds each, 1200 steps, a checkpoint every 20, and measures the plateau length:
   the first checkpoint whose test loss is below half the loss of predicting 0. Prints each length and the
   fitted exponent of plateau ∝ T^a. Then analyses the T=16 run (LLC with stages, attention on the relevant
   token and its entropy per head). Figure: docs/sparse_regression.png.
Runs in about 45 minutes on 2 shared CPU cores (part 3 alone about 20); every step resumes from WORK.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

import tl_devinterp as tdi
from tl_devinterp.dynamics.stages import stage_se
from tl_devinterp.tasks import make_task
from tl_devinterp.tasks.base import index_batch
from tl_devinterp.tasks.regression import masked_mse
from tl_devinterp.training import PRESETS
from tl_devinterp.visualisation.dynamics import shade_stages

SGLD = dict(epsilon=3e-4, gamma=100.0, nbeta=30.0, num_chains=3, num_draws=80, num_burnin=40)
"""The sampler for both settings: the regression tasks' own `sampler_defaults` (ε, γ, nβ), more draws."""
LENGTHS, SEEDS = (8, 16, 32, 64), (0, 1)


def n_parameters(series: tdi.CheckpointSeries) -> int:
    return sum(p.numel() for p in series.load(series.steps[-1]).parameters())


def icl(work: Path, docs: Path, progress: bool) -> None:
    series = tdi.train(work / "icl" / "series", "icl-regression-quick", progress=progress)
    config = tdi.AnalysisConfig.from_dict(dict(head_steps=6, n_test_seqs=256, **SGLD))
    result = tdi.analyze(series, work / "icl" / "report", config=config, progress=progress)
    task = make_task(series.meta["data"])
    wide = result.metrics[result.metrics["layer"].isna()].pivot_table(index="step", columns="metric", values="value")
    ln = result.metrics[result.metrics["metric"] == "ln_weight_norm"].pivot_table(index="step", columns="layer",
                                                                                   values="value")
    llc = result.llc[result.llc["scope"] == "model"].set_index("step")
    x, y, _ = task.sample(task.spec["n_test"], 2)
    ridge, dmmse = (float(((task.reference()[k] - y) ** 2).mean()) for k in ("ridge", "dmmse"))
    print(f"\n== in-context linear regression ({n_parameters(series)} parameters, {series.steps[-1]} steps)")
    print(f"loss of predicting 0: {float((y ** 2).mean()):.3f}; ridge: {ridge:.3f}; dMMSE: {dmmse:.3f} (Gaussian tasks:"
          f" dMMSE is ridge)")
    print("stages:", ", ".join(f"{s.start}-{s.end} {s.type}" for s in result.stages))
    at = sorted({s.start for s in result.stages} | {result.stages[-1].end})
    table = pd.DataFrame({"llc": llc["llc_mean"], "llc_se": llc["llc_se"]}).join(wide[[
        "loss", "loss_minus_ridge", "prediction_norm", "icl_score", "unembed_norm", "pos_effective_rank"]]).join(
        ln.add_prefix("ln_norm_L"))
    print(table.loc[at].round(3).to_string())
    low = wide["prediction_norm"].idxmin()
    print(f"prediction norm: {wide['prediction_norm'].iloc[0]:.3f} at step 0, lowest {wide['prediction_norm'][low]:.3f}"
          f" at step {low}, {wide['prediction_norm'].iloc[-1]:.3f} at the end")
    print(f"ICL score: {wide['icl_score'].iloc[0]:.3f} at step 0, {wide['icl_score'].iloc[-1]:.3f} at the end")

    panels = [("test loss", wide["loss"]), ("LLC (± SE)", llc["llc_mean"]), ("prediction norm", wide["prediction_norm"]),
              ("ICL score (loss at x_K − at x_1)", wide["icl_score"]), ("LayerNorm weight norm", None),
              ("effective rank of W_pos", wide["pos_effective_rank"])]
    icl_figure(panels, llc, ln, ridge, result.stages, series.steps[-1], "In-context linear regression "
               "(icl-regression-quick, 2 CPU cores); stages shaded (blue A, orange B)", docs / "icl_regression.png")


def icl_figure(panels: list[tuple[str, pd.Series | None]], llc: pd.DataFrame, ln: pd.DataFrame, ridge: float,
               stages: list[tdi.Stage], last: int, title: str, path: Path) -> None:
    """Six panels over log-step, stages shaded: each (name, curve); curve None: the LayerNorm-weight norm of each
    layer; the test loss with ridge's, the LLC with its SE band."""
    fig = Figure(figsize=(13, 6.5), layout="constrained")
    for ax, (name, curve) in zip(fig.subplots(2, 3).ravel(), panels):
        shade_stages(ax, stages)
        if curve is None:
            for layer in ln:
                ax.plot(ln.index, ln[layer], marker=".", label=f"layer {layer}" if layer < 2 else "final")
            ax.legend(fontsize=7)
        else:
            ax.plot(curve.index, curve.values, marker=".", color="black")
        if name == "test loss":
            ax.axhline(ridge, color="tab:green", ls="--", label="ridge = dMMSE")
            ax.legend(fontsize=7)
        if name.startswith("LLC"):
            ax.fill_between(llc.index, llc["llc_mean"] - llc["llc_se"], llc["llc_mean"] + llc["llc_se"], alpha=0.2,
                            color="black", lw=0)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(0, last * 1.1)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


def icl_long(work: Path, docs: Path, progress: bool) -> None:
    series = tdi.train(work / "icl-long" / "series", "icl-regression-long", progress=progress)
    task = make_task(series.meta["data"])
    train, test = task.data()
    store = work / "icl-long" / "store"
    llc = tdi.llc_over_series(series, train, tdi.SGLDConfig(**SGLD), loss_fn=task.sampler_loss, store_dir=store,
                              progress=progress).set_index("step")
    metrics = task.metrics_over_series(series, train, index_batch(test, slice(0, 256)), store_dir=store,
                                       progress=progress)
    stages = tdi.find_stages(llc.index.to_numpy(), llc["llc_mean"].to_numpy(), llc["llc_se"].to_numpy())
    wide = metrics[metrics["layer"].isna()].pivot_table(index="step", columns="metric", values="value")
    ln = metrics[metrics["metric"] == "ln_weight_norm"].pivot_table(index="step", columns="layer", values="value")
    x, y, _ = task.sample(task.spec["n_test"], 2)
    ridge = float(((task.reference()["ridge"] - y) ** 2).mean())
    print(f"\n== in-context linear regression, the quick run continued to {series.steps[-1]} steps "
          f"(icl-regression-long, {len(series.steps)} checkpoints; ridge {ridge:.3f})")
    print("stages:", ", ".join(f"{s.start}-{s.end} {s.type}" for s in stages))
    peak = int(llc["llc_mean"].idxmax())
    at = sorted({s.start for s in stages} | {stages[-1].end, peak, 1500})
    table = llc[["llc_mean", "llc_se"]].join(wide[["loss", "prediction_norm", "icl_score", "unembed_norm",
                                                   "pos_effective_rank"]]).join(ln.add_prefix("ln_norm_L"))
    print(table.loc[at].round(3).to_string())

    panels = [("test loss", wide["loss"]), ("LLC (± SE)", llc["llc_mean"]), ("LayerNorm weight norm", None),
              ("ICL score (loss at x_K − at x_1)", wide["icl_score"]), ("unembedding norm", wide["unembed_norm"]),
              ("effective rank of W_pos", wide["pos_effective_rank"])]
    icl_figure(panels, llc, ln, ridge, stages, series.steps[-1], "In-context linear regression continued to 12,000 "
               "steps (icl-regression-long, 2 CPU cores); stages shaded (blue A, orange B)",
               docs / "icl_regression_long.png")


def paper_scale() -> None:
    config = PRESETS["icl-regression"]
    model = make_task(config.data).build_model(config.model)
    print(f"\n== the icl-regression preset (the paper's run, for a GPU; not run here): "
          f"{sum(p.numel() for p in model.parameters())} parameters, {config.n_steps} steps of {config.batch_size}, "
          f"each of its {config.data['n_train']} training contexts seen "
          f"{config.n_steps * config.batch_size / config.data['n_train']:.0f} times")


def icl_stages(work: Path, progress: bool) -> None:
    base = PRESETS["icl-regression-quick"]
    grids = {"preset's grid": tdi.train(work / "icl" / "series", "icl-regression-quick", progress=progress),
             "dense grid": tdi.train(work / "icl-stages" / "series", progress=progress,
                                     config=dataclasses.replace(base, n_log_checkpoints=40))}
    grids = {f"{name} ({len(series.steps)} checkpoints)": series for name, series in grids.items()}
    print("\n== in-context linear regression: where the stage rule puts LR1's end (icl-regression-quick)")
    rows = []
    for (grid, series), chains in [(g, 3) for g in grids.items()] + [(list(grids.items())[1], 8)]:
        train, _ = make_task(series.meta["data"]).data()
        llc = tdi.llc_over_series(series, train, tdi.SGLDConfig(**{**SGLD, "num_chains": chains}),
                                  loss_fn=masked_mse, store_dir=work / "icl-stages" / "store", progress=progress)
        steps, values, se = (llc[c].to_numpy() for c in ("step", "llc_mean", "llc_se"))
        for first in (0, 1):
            for name, error in (("the chains' SE", se[first:]), ("the scatter along the curve", None),
                                ("the larger (analyze's)", stage_se(steps[first:], values[first:], se[first:]))):
                stages = tdi.find_stages(steps[first:], values[first:], error)
                rows.append({"grid": grid, "chains": chains, "from step": int(steps[first]), "SE": name,
                             "stages": ", ".join(f"{s.start}-{s.end} {s.type}" for s in stages)})
        if grid.startswith("dense") and chains == 3:  # the curve and the metrics up to LR2's rise
            task = make_task(series.meta["data"])
            metrics = task.metrics_over_series(series, train, index_batch(task.data()[1], slice(0, 256)),
                                               store_dir=work / "icl-stages" / "store", progress=progress)
            wide = metrics[metrics["layer"].isna()].pivot_table(index="step", columns="metric", values="value")
            early = llc.set_index("step")[["llc_mean", "llc_se", "loss_increase"]].join(
                wide[["prediction_norm", "icl_score"]])
            print(f"dense grid, 3 chains, to step 230:\n{early.loc[:230].round(3).to_string()}")
    print(pd.DataFrame(rows).to_string(index=False))


def plateau_end(series: tdi.CheckpointSeries) -> tuple[int | None, float]:
    """The first checkpoint whose test loss is below half the loss of predicting 0 (None: never), and that loss."""
    _, (_, targets, _) = make_task(series.meta["data"]).data()
    zero = float((targets[:, -1] ** 2).mean())
    losses = sorted((int(s), v["test"]) for s, v in series.meta["losses"].items())
    return next((s for s, v in losses if v < zero / 2), None), zero


def sparse(work: Path, docs: Path, progress: bool) -> None:
    base = PRESETS["sparse-regression-quick"]
    runs, curves = [], {}
    print("\n== sparse-attention regression: plateau length against sequence length T")
    for T in LENGTHS:
        for seed in SEEDS:
            config = dataclasses.replace(
                base, model=dataclasses.replace(base.model, n_ctx=T, seed=seed), seed=seed, n_steps=1200,
                n_log_checkpoints=0, n_linear_checkpoints=60, data={**base.data, "T": T, "seed": seed})
            series = tdi.train(work / "sparse" / f"T{T}-seed{seed}", config=config, progress=progress)
            end, zero = plateau_end(series)
            runs.append({"T": T, "seed": seed, "plateau_end": end, "loss_of_zero": zero,
                         "final_loss": series.meta["losses"][str(series.steps[-1])]["test"]})
            curves[(T, seed)] = sorted((int(s), v["test"]) for s, v in series.meta["losses"].items())
    runs = pd.DataFrame(runs)
    print(runs.to_string(index=False))
    mean = runs.groupby("T")["plateau_end"].mean()
    slope = np.polyfit(np.log(mean.index), np.log(mean.values), 1)[0]
    print(f"mean plateau end per T: {mean.to_dict()}; fit plateau ∝ T^{slope:.2f} "
          f"({'longer' if slope > 0 else 'shorter'} for longer sequences)")

    config = dataclasses.replace(base, model=dataclasses.replace(base.model, n_ctx=16), n_steps=1200,
                                 n_log_checkpoints=10, n_linear_checkpoints=24)
    series = tdi.train(work / "sparse" / "analysed", config=config, progress=progress)
    result = tdi.analyze(series, work / "sparse" / "report", config=tdi.AnalysisConfig.from_dict(dict(head_steps=6, **SGLD)),
                         progress=progress)
    llc = result.llc[result.llc["scope"] == "model"].set_index("step")
    heads = result.metrics[result.metrics["head"].notna()]
    test_loss = pd.Series({int(s): v["test"] for s, v in series.meta["losses"].items()}).sort_index()
    end, _ = plateau_end(series)
    print(f"T=16 analysed ({n_parameters(series)} parameters); stages:",
          ", ".join(f"{s.start}-{s.end} {s.type}" for s in result.stages))
    wide = heads.pivot_table(index="step", columns=["metric", "head"], values="value")
    print(pd.DataFrame({"test_loss": test_loss, "llc": llc["llc_mean"], "llc_se": llc["llc_se"]}).join(
        wide.set_axis([f"{m}_h{h}" for m, h in wide.columns], axis=1)).loc[
        sorted({s.start for s in result.stages} | {result.stages[-1].end, end})].round(3).to_string())

    fig = Figure(figsize=(13, 6.5), layout="constrained")
    (a, b, c), (d, e, f) = fig.subplots(2, 3)
    for (T, seed), curve in curves.items():
        steps, values = zip(*curve)
        a.plot(steps, values, color=f"C{LENGTHS.index(T)}", alpha=0.8, label=f"T={T}" if seed == 0 else None)
    a.set(title="test loss (2 seeds per T)", xlabel="step", yscale="log")
    a.legend(fontsize=7)
    b.loglog(runs["T"], runs["plateau_end"], "o", color="grey")
    b.loglog(mean.index, mean.values, "-", color="black", label=f"mean; fit ∝ T^{slope:.2f}")
    b.set(title="plateau length (loss < half of predicting 0)", xlabel="sequence length T", ylabel="step")
    b.set_xticks(LENGTHS, labels=[str(T) for T in LENGTHS], minor=False)
    b.set_xticks([], minor=True)
    b.legend(fontsize=7)
    for ax, (name, curve) in zip((c, d), (("LLC (T=16, ± SE)", llc["llc_mean"]), ("test loss (T=16)", test_loss))):
        shade_stages(ax, result.stages)
        ax.plot(curve.index, curve.values, marker=".", color="black")
        ax.set(title=name, xlabel="step", xscale="symlog", xlim=(0, series.steps[-1] * 1.1))
    c.fill_between(llc.index, llc["llc_mean"] - llc["llc_se"], llc["llc_mean"] + llc["llc_se"], alpha=0.2,
                   color="black", lw=0)
    for ax, metric in ((e, "relevant_attention"), (f, "attention_entropy")):
        shade_stages(ax, result.stages)
        for h, g in heads[heads["metric"] == metric].groupby("head"):
            ax.plot(g["step"], g["value"], marker=".", label=f"head {h}")
        ax.set(title=f"{metric} (T=16, last query)", xlabel="step", xscale="symlog", xlim=(0, series.steps[-1] * 1.1))
        ax.legend(fontsize=7)
    f.axhline(np.log(16), color="grey", ls="--")
    fig.suptitle("Sparse-attention regression (sparse-regression-quick architecture, 2 CPU cores); stages shaded")
    fig.savefig(docs / "sparse_regression.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="regression_settings", help="folder for the series and reports")
    parser.add_argument("--docs", default="docs", help="folder for the figures")
    parser.add_argument("--only", choices=("paper", "icl", "icl-long", "icl-stages", "sparse"), help="run one part")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    warnings.filterwarnings("ignore", category=tdi.SamplerWarning)  # reported in each report's diagnostics
    work, docs = Path(args.work), Path(args.docs)
    docs.mkdir(exist_ok=True)
    if args.only in (None, "paper"):
        paper_scale()
    if args.only in (None, "icl"):
        icl(work, docs, not args.quiet)
    if args.only in (None, "icl-long"):
        icl_long(work, docs, not args.quiet)
    if args.only in (None, "icl-stages"):
        icl_stages(work, not args.quiet)
    if args.only in (None, "sparse"):
        sparse(work, docs, not args.quiet)


if __name__ == "__main__":
    main()
