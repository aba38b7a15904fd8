"""The toy model of superposition against Chen et al. 2023 (arXiv:2310.06301): prints every number the README's
TMS section quotes and draws docs/tms.png.

1. The k-gons' closed-form losses (tasks.tms.kgon_loss at the optimal length and bias) against the paper's.
2. The LLC estimated at planted k-gons (estimate_llc on 50 000 samples) against the paper's λ, at the task's
   default nβ = 3000 and at nβ = 100 000.
3. SGD runs of the `tms` preset (the paper's protocol: 1000 samples, batch 20, lr 0.005, 225 000 steps), analysed
   by `tl_devinterp.analyze`: the k-gon plateaus each run passes through, the loss drop at each change, and the
   LLC on each plateau.

    OMP_NUM_THREADS=1 python benchmarks/tms_kgons.py --out /tmp/tms --seeds 0 1 2 3   # ~15 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from tl_devinterp import SamplerWarning, analyze, estimate_llc, train
from tl_devinterp.tasks.tms import PAPER_KGONS, PAPER_LLC, TMSData, kgon, kgon_loss, optimal_kgon
from tl_devinterp.training import PRESETS

KGONS = {"4": (4, 0), "4+": (4, 1), "4++": (4, 2), "5": (5, 0), "5+": (5, 1), "6": (6, 0)}


def closed_forms() -> pd.DataFrame:
    rows = []
    for name, (k, positive) in KGONS.items():
        length, bias, _ = optimal_kgon(k)
        paper = PAPER_KGONS.get(k) if positive == 0 else None
        rows.append(dict(kgon=name, length=length, bias=bias, loss=kgon_loss(k, 6, length, bias, positive),
                         paper_loss=paper[2] if paper else np.nan))
    return pd.DataFrame(rows)


def planted_llcs(nbetas=(3000.0, 100_000.0)) -> pd.DataFrame:
    x = TMSData(50_000, seed=1).sample()
    rows = []
    for nbeta in nbetas:
        settings = (dict(epsilon=1e-4, gamma=10.0, num_draws=600, num_burnin=300, batch_size=2000) if nbeta <= 3000 else
                    dict(epsilon=3e-6, gamma=1.0, num_draws=2000, num_burnin=500, batch_size=5000))
        for name, (k, positive) in KGONS.items():
            if nbeta > 3000 and name not in PAPER_LLC:
                continue
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", SamplerWarning)
                r = estimate_llc(kgon(k, positive=positive), x, nbeta=nbeta, num_chains=4, progress=False, **settings)
            rows.append(dict(kgon=name, nbeta=nbeta, llc=r.mean, se=r.se, paper=PAPER_LLC.get(name, np.nan),
                             warnings=len(caught)))
    frame = pd.DataFrame(rows)
    frame["relative_error"] = frame.llc / frame.paper - 1
    return frame


def plateaus(metrics: pd.DataFrame, llc: pd.DataFrame) -> pd.DataFrame:
    """Runs of checkpoints at one k^σ-gon whose loss is within 0.015 of its closed form: the critical points
    SGD visits, with the loss and the LLC there."""
    m = metrics.pivot_table(index="step", columns="metric", values="value")
    m = m.join(llc[llc.scope == "model"].set_index("step")[["llc_mean", "llc_se"]])
    m["name"] = [f"{int(k)}" + "+" * int(s) for k, s in zip(m.k, m.positive_dead)]
    near = (m.loss - m.kgon_loss).abs() < 0.015
    rows, current = [], None
    for step, row in m[near].iterrows():
        if current is None or row["name"] != current["kgon"]:
            current = dict(kgon=row["name"], first_step=step, last_step=step, loss=row.loss, closed_form=row.kgon_loss,
                           llc=[row.llc_mean])
            rows.append(current)
        else:
            current.update(last_step=step, loss=row.loss)
            current["llc"].append(row.llc_mean)
    for r in rows:
        r["llc"] = float(np.median(r["llc"]))
    return pd.DataFrame(rows)


def sgd_runs(out: Path, seeds: list[int]) -> dict[int, tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]]:
    runs = {}
    for seed in seeds:
        series_dir, report = out / f"series-{seed}", out / f"analysis-{seed}"
        model = dataclasses.replace(PRESETS["tms"].model, seed=seed)  # the initialisation's seed (TrainConfig.seed: batches)
        train(series_dir, preset="tms", seed=seed, model=model, progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SamplerWarning)  # early checkpoints are no critical points
            result = analyze(series_dir, report, progress=False, n_clusters=0)
        runs[seed] = (result.llc, result.metrics, result.stages)
    return runs


def figure(runs, seed: int, path: Path) -> None:
    llc, metrics, stages = runs[seed]
    m = metrics.pivot_table(index="step", columns="metric", values="value")
    model = llc[llc.scope == "model"].set_index("step")
    steps = np.maximum(m.index.to_numpy(), 1)
    fig, (a, b, c) = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    a.plot(steps, m.loss, "k.-", label="population loss")
    for name, (k, positive) in KGONS.items():
        level = kgon_loss(k, 6, *optimal_kgon(k)[:2], positive)
        a.axhline(level, ls=":", lw=0.8, color="grey")
        a.text(steps[-1] * 1.05, level, name, va="center", fontsize=8)
    a.set_ylim(0.04, 0.2)
    a.set_ylabel("loss (closed-form k-gons dotted)")
    a.set_xscale("log")
    b.step(steps, m.k, where="post", label="k (vertices)")
    b.step(steps, m.positive_dead, where="post", label="σ (positive dead biases)")
    b.set_ylabel("k-gon")
    b.legend(fontsize=8)
    c.errorbar(steps, model.llc_mean.reindex(m.index), yerr=model.llc_se.reindex(m.index), fmt="b.-", ms=3)
    for name in PAPER_LLC:
        c.axhline(PAPER_LLC[name], ls=":", lw=0.8, color="grey")
    for s in stages[1:]:
        for ax in (a, b, c):
            ax.axvline(max(s.start, 1), color="red", lw=0.6, alpha=0.6)
    c.set_ylim(-2, 12)
    c.set_ylabel("LLC (paper's λ dotted; stages red)")
    c.set_xlabel("SGD step")
    fig.suptitle(f"TMS, 6 features in 2 dimensions, the paper's SGD (seed {seed})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tms-runs"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--figure-seed", type=int, default=None, help="the run drawn (default: the one with most plateaus)")
    parser.add_argument("--figure", type=Path, default=Path(__file__).parent.parent / "docs" / "tms.png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pd.set_option("display.width", 200)

    print("1. k-gon losses, closed form vs the paper (c = 6)")
    print(closed_forms().round(5).to_string(index=False))
    print("\n2. LLC at planted k-gons vs the paper's λ (4 chains)")
    print(planted_llcs().round(3).to_string(index=False))
    print("\n3. SGD runs of the tms preset (the paper's protocol), analysed")
    runs = sgd_runs(args.out, args.seeds)
    found = {}
    for seed, (llc, metrics, stages) in runs.items():
        found[seed] = plateaus(metrics, llc)
        table = found[seed].assign(loss_drop=lambda f: f.loss.shift() - f.loss)
        print(f"seed {seed}: " + " -> ".join(table.kgon) + "; stages from the LLC: "
              + ", ".join(f"{s.start}-{s.end} {s.type}" for s in stages))
        print(table.round(4).to_string(index=False))
    seed = args.figure_seed if args.figure_seed is not None else max(found, key=lambda s: len(found[s]))
    figure(runs, seed, args.figure)
    print(f"\nfigure: {args.figure} (seed {seed})")


if __name__ == "__main__":
    main()
