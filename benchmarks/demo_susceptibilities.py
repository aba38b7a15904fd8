"""Per-head susceptibilities of the demo series to planted repeats, over training (issue 13, item 5).

    python benchmarks/demo_susceptibilities.py SERIES_DIR [--steps 1071 1500 ...] [--workers 14] [--quiet]

Base distribution q: the series' own training data (`make_data(series.meta["data"])`: a Markov chain with one
planted repeat in every sequence), the first `--n-sequences` training rows. Shift q': the same rows without the
planted repeat (the same spec with repeat_fraction=0: the same chain and draws, only the copied span differs),
so the shift is exactly "repeats -> none". For each head C (and the whole model),

    χ_C = −nβ·Cov[L_q(w), L_q'(w) − L_q(w)]   over SGLD draws localised at the checkpoint, moving only C

(`tl_devinterp.sampling.susceptibility`). χ > 0: moving the data toward "no repeat" loosens C's posterior
(C is constrained more by the repeats than by the plain chain); by linearity in the shift, the susceptibility
toward *more* repeats is −χ. Steps default to the window where the best layer-1 prefix-matching score first
reaches 0.3 (two checkpoints before, that one, one after), an early, a middle and the last checkpoint.

Writes the tidy table (with each head's prefix-matching score and the sampler diagnostics) to --csv and the
over-training figure to --png. With --workers > 1, steps × layers run in parallel processes (one thread each).
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tl_devinterp import CheckpointSeries, make_data, plot_susceptibilities, prefix_matching_scores
from tl_devinterp.data import token_tensor
from tl_devinterp.models import all_heads
from tl_devinterp.sampling import SGLDConfig, susceptibilities_over_series

FORMED = 0.3  # best layer-1 prefix-matching score at which the induction heads count as formed


def repeat_shift(series: CheckpointSeries, n_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(with repeats, without): the first n training rows of the series' data, and the same rows unplanted."""
    spec = series.meta["data"]
    if spec.get("kind") != "markov" or not spec.get("repeat_fraction"):
        raise ValueError(f"The series' data spec {spec} is not Markov data with planted repeats (the demo's).")
    with_repeat = token_tensor(make_data(spec)["train"])[:n_sequences]
    without = token_tensor(make_data(dict(spec, repeat_fraction=0.0))["train"])[:n_sequences]
    return with_repeat, without


def prefix_matching(series: CheckpointSeries) -> pd.DataFrame:
    """step, layer, head, prefix_matching at every checkpoint."""
    rows = []
    for step, model in series:
        scores = prefix_matching_scores(model)
        rows += [dict(step=step, layer=layer, head=h, prefix_matching=float(scores[layer, h]))
                 for layer, h in all_heads(model)]
    return pd.DataFrame(rows)


def default_steps(steps: list[int], best: pd.Series) -> tuple[list[int], int | None]:
    """The formation window around the first step whose best layer-1 score reaches FORMED, plus an early,
    a middle and the last checkpoint; and that step (None: never formed, then spread evenly)."""
    formed = best[best >= FORMED]
    if formed.empty:
        return [steps[i] for i in np.linspace(0, len(steps) - 1, 6).round().astype(int)], None
    c = steps.index(int(formed.index[0]))
    window = steps[max(c - 2, 0): c + 2]
    nearest = [min(steps, key=lambda s, t=t: abs(s - t)) for t in (steps[c] / 2, (window[-1] + steps[-1]) / 2)]
    return sorted({*window, *nearest, steps[-1]}), steps[c]


def run(task: tuple) -> pd.DataFrame:
    """One (step, heads) cell in a worker process."""
    series_dir, step, heads, data, shifts, config, device, progress = task
    torch.set_num_threads(1)
    return susceptibilities_over_series(CheckpointSeries.from_dir(series_dir), data, shifts, config, heads=heads,
                                        steps=[step], device=device, progress=progress)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("series", metavar="SERIES_DIR", help="the demo series (`tl-devinterp train --preset demo`)")
    p.add_argument("--steps", type=int, nargs="*", help="checkpoints (default: around the induction heads' formation)")
    p.add_argument("--n-sequences", type=int, default=256, help="training rows for q and q' (default 256)")
    p.add_argument("--epsilon", type=float, default=1e-3)
    p.add_argument("--gamma", type=float, default=300.0)
    p.add_argument("--nbeta", type=float, default=100.0)
    p.add_argument("--num-chains", type=int, default=4)
    p.add_argument("--num-draws", type=int, default=200)
    p.add_argument("--num-burnin", type=int, default=100)
    p.add_argument("--draws-every", type=int, default=2, help="evaluate q and q' on every k-th draw")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=1, help="parallel processes over steps x layers")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument("--csv", default="docs/demo_susceptibilities.csv")
    p.add_argument("--png", default="docs/demo_susceptibilities.png")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args()

    series = CheckpointSeries.from_dir(args.series)
    with_repeat, without = repeat_shift(series, args.n_sequences)
    shifts = {"no_repeat": without}
    config = SGLDConfig(epsilon=args.epsilon, gamma=args.gamma, nbeta=args.nbeta, num_chains=args.num_chains,
                        num_draws=args.num_draws, num_burnin=args.num_burnin, batch_size=args.batch_size,
                        draws_every=args.draws_every)
    scores = prefix_matching(series.subset(args.steps) if args.steps else series)
    best = scores[scores.layer == 1].groupby("step").prefix_matching.max()
    steps, formed = (args.steps, None) if args.steps else default_steps(series.steps, best)
    print(f"steps {steps}; best layer-1 prefix matching first >= {FORMED} at step {formed}; {config}")

    started = time.perf_counter()
    layers = sorted({layer for layer, _ in all_heads(series.load(steps[0]))})
    tasks = [(args.series, s, [(layer, h) for lay, h in all_heads(series.load(s)) if lay == layer], with_repeat,
              shifts, config, args.device, not args.quiet and args.workers == 1) for s in steps for layer in layers]
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as pool:
            frames = list(pool.map(run, tasks))
    else:
        frames = [run(t) for t in tasks]
    # every task repeats the whole-model row (same seed, same batches: the same numbers): keep one per step
    frame = pd.concat(frames, ignore_index=True).drop_duplicates(["step", "scope", "layer", "head", "shift"])
    frame = frame.merge(scores.astype({"layer": "Int64", "head": "Int64"}), on=["step", "layer", "head"], how="left") \
        .sort_values(["step", "scope", "layer", "head"])
    print(f"{len(steps)} checkpoints in {time.perf_counter() - started:.0f} s")

    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.csv, index=False, float_format="%.5g")
    fig = plot_susceptibilities(frame)
    if formed is not None:
        fig.axes[0].axvline(formed, color="grey", ls="--", lw=0.8)
        fig.axes[0].annotate(f"layer-1 prefix matching ≥ {FORMED}", (formed, 0), xytext=(4, 4),
                             textcoords="offset points", fontsize=7, color="grey")
    fig.savefig(args.png, dpi=110)
    table = frame[frame.scope == "head"].assign(chi=lambda f: [f"{c:+.3g} ± {s:.2g}" for c, s in
                                                               zip(f.susceptibility, f.susceptibility_se, strict=True)])
    print(table.pivot(index="step", columns=["layer", "head"], values="chi").to_string())
    print(frame.groupby("step")["regime"].value_counts().unstack(fill_value=0).to_string())


if __name__ == "__main__":
    main()
