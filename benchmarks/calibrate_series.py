"""calibrate_llc on one checkpoint of a trained series: the README's numbers on why (or whether) a setting
exists for the demo's language model.

    python benchmarks/calibrate_series.py SERIES_DIR [--step N] [--max-steps N] [--batch-size N]

SERIES_DIR: a series written by `tl-devinterp train` (its manifest names the task and data). Prints one row
per calibration run (nβ, ε, burn-in, draws, λ̂ ± SE, the likelihood's share of the pull, the prior share, the
discretisation share, R-hat, the rule's verdict), then the recommendation or the reason there is none, and the
seconds taken (one thread).
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from tl_devinterp.analysis import AnalysisConfig, task_data
from tl_devinterp.sampling import SGLDConfig, calibrate_llc
from tl_devinterp.series import CheckpointSeries

COLUMNS = ["nbeta", "epsilon", "num_burnin", "num_draws", "llc_mean", "llc_se", "likelihood_fraction", "prior_share",
           "discretisation", "r_hat", "verdict"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("series")
    parser.add_argument("--step", type=int, default=None, help="checkpoint (default: the last)")
    parser.add_argument("--max-steps", type=int, default=20_000, help="calibrate_llc's budget (SGLD steps per chain)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    series = CheckpointSeries.from_dir(args.series)
    step = series.steps[-1] if args.step is None else args.step
    task, train_data, _ = task_data(series, None, AnalysisConfig(), progress=False)
    start = time.perf_counter()
    cal = calibrate_llc(series.load(step), train_data, SGLDConfig(batch_size=args.batch_size),
                        loss_fn=task.sampler_loss, max_steps=args.max_steps, progress=False)
    pd.set_option("display.width", 200)
    print(f"step {step}: d = {int(cal.table['d'].dropna().iloc[0]) if 'd' in cal.table else '?'}")
    print(cal.table[[c for c in COLUMNS if c in cal.table]].to_string(index=False, float_format="{:.4g}".format))
    print(f"recommended: {cal.choice} (λ̂ {cal.llc:.4g})" if cal.choice else f"no recommendation: {cal.reason}")
    print(f"{cal.steps} SGLD steps per chain, {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
