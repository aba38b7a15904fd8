"""Bursty few-shot classification on a CPU: prints the numbers the README's section quotes and draws
docs/bursty.png.

Trains the `bursty-classification-quick` preset (4096 Gaussian-cluster classes, 8 labels, contexts of 4 pairs,
bursty with p = 0.9; a 2-layer, 4-head attention-only model) for `--n-steps`, then at every checkpoint: ICL
accuracy on held-out classes and with swapped labels, IWL accuracy, each head's induction (prefix-matching)
score, and the LLC (stages from it). Reddy 2023 and Singh et al. 2024 report an abrupt rise of ICL accuracy with
the formation of an induction head (query -> label after the matching exemplar), preceded by a previous-token
head (label -> exemplar); Singh et al. 2023's transience (ICL fading as IWL grows) needs far longer training
than a CPU allows here.

    OMP_NUM_THREADS=1 python benchmarks/bursty_icl.py --out /tmp/bursty --n-steps 1500   # ~5 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from tl_devinterp import SamplerWarning, find_stages, llc_over_series, train
from tl_devinterp.tasks import make_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bursty-run"))
    parser.add_argument("--n-steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figure", type=Path, default=Path(__file__).parent.parent / "docs" / "bursty.png")
    args = parser.parse_args()
    torch.set_num_threads(1)

    series = train(args.out, preset="bursty-classification-quick", n_steps=args.n_steps, seed=args.seed,
                   n_log_checkpoints=16, n_linear_checkpoints=10, progress=False)
    task = make_task(series.meta["data"])
    train_data, test = task.data()
    metrics = task.metrics_over_series(series, train_data, test, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SamplerWarning)
        llc = llc_over_series(series, train_data, num_chains=3, num_draws=60, num_burnin=20, seed=args.seed,
                              loss_fn=task.sampler_loss,
                              progress=False)
    stages = find_stages(llc.step.to_numpy(), llc.llc_mean.to_numpy(), llc.llc_se.to_numpy())

    model = metrics[metrics["head"].isna()].pivot_table(index="step", columns="metric", values="value")
    heads = metrics[metrics["head"].notna()]
    induction = heads[heads.metric == "prefix_matching"].pivot_table(index="step", columns=["layer", "head"], values="value")
    previous = heads[heads.metric == "previous_token"].pivot_table(index="step", columns=["layer", "head"], values="value")
    table = model[["loss", "icl_accuracy", "icl_swapped_accuracy", "iwl_accuracy"]].assign(
        max_induction=induction.max(axis=1), top_induction_head=induction.idxmax(axis=1).map(lambda h: f"L{h[0]}H{h[1]}"),
        max_previous_token=previous.max(axis=1), llc=llc.set_index("step").llc_mean)
    print(table.round(3).to_string())
    rise = model.icl_accuracy.diff().idxmax()
    print(f"\nlargest ICL rise: to step {rise} ({model.icl_accuracy.shift().loc[rise]:.2f} -> "
          f"{model.icl_accuracy.loc[rise]:.2f}); final ICL {model.icl_accuracy.iloc[-1]:.2f}, swapped "
          f"{model.icl_swapped_accuracy.iloc[-1]:.2f}, IWL {model.iwl_accuracy.iloc[-1]:.2f} (chance 1/L = "
          f"{1 / task.spec['L']:.3f})")
    print("stages:", ", ".join(f"{s.start}-{s.end} {s.type}" for s in stages))

    steps = np.maximum(model.index.to_numpy(), 1)
    fig, (a, b, c) = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    for name, style in (("icl_accuracy", "b.-"), ("icl_swapped_accuracy", "c.--"), ("iwl_accuracy", "r.-")):
        a.plot(steps, model[name], style, label=name, ms=3)
    a.axhline(1 / task.spec["L"], color="grey", ls=":", lw=0.8)
    a.set_ylabel("accuracy (chance dotted)")
    a.legend(fontsize=8)
    for col in induction:
        b.plot(steps, induction[col], lw=1, label=f"L{col[0]}H{col[1]} induction")
    for col in previous:
        b.plot(steps, previous[col], lw=0.8, ls="--", label=f"L{col[0]}H{col[1]} prev-token")
    b.set_ylabel("head scores")
    b.legend(fontsize=6, ncol=4)
    c.errorbar(steps, llc.llc_mean, yerr=llc.llc_se, fmt="k.-", ms=3)
    for s in stages[1:]:
        for ax in (a, b, c):
            ax.axvline(max(s.start, 1), color="red", lw=0.6, alpha=0.6)
    c.set_ylabel("LLC (stages red)")
    c.set_xlabel("step")
    c.set_xscale("log")
    fig.suptitle("Bursty few-shot classification (4096 classes, quick preset)")
    fig.tight_layout()
    fig.savefig(args.figure, dpi=110)
    print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
