"""Benchmark checkpoints as parallel jobs: 2 single-thread Dask workers against the serial run, on a plain
`distributed.LocalCluster` as users start one (what the README's SLURM example amounts to: Dask sets
`MALLOC_TRIM_THRESHOLD_` for its workers, which each job undoes, `parallel.undo_malloc_trim`) and on the
library's `local_cluster` (which never sets it).

    python benchmarks/bench_scale.py [--repeats 3] [--num-draws 40] [--checkpoints 8]

Trains the `quick` preset series (10 checkpoints) into a temporary folder, then times the whole-model LLC
over its first `--checkpoints` (a) serially in this process with torch at 1 thread and (b) on each running
2-worker cluster (started once, outside the timing: the start-up is paid once per analysis), interleaved so
a change of load hits all. Target on a 2-core machine: parallel / serial near 0.55 on both clusters (2
workers, and a little overhead). Timings are medians over repeats; the load average is printed, since other
processes take cores from every run: on a shared machine the ratios mean little.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

import pandas as pd
import torch
from distributed import Client, LocalCluster

from tl_devinterp.data import make_data, token_tensor
from tl_devinterp.parallel import local_cluster
from tl_devinterp.sampling import llc_over_series
from tl_devinterp.sampling.settings import SGLDConfig
from tl_devinterp.training import train


def timed(fn) -> tuple[float, pd.DataFrame]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-draws", type=int, default=40)
    ap.add_argument("--checkpoints", type=int, default=8)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        series = train(os.path.join(tmp, "series"), "quick", progress=False)
        tokens = token_tensor(make_data(series.meta["data"])["train"])
        config = SGLDConfig(num_chains=2, num_draws=args.num_draws, num_burnin=20)
        run = dict(data=tokens, config=config, steps=series.steps[: args.checkpoints], progress=False)
        print(f"{series}, first {args.checkpoints} checkpoints, whole-model LLC, {config.num_chains} chains x "
              f"{config.num_draws} draws; load average before: {os.getloadavg()}", flush=True)
        plain = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
        with plain, local_cluster(2) as ours, Client(plain) as c_plain, Client(ours) as c_ours:
            executors = {"plain LocalCluster": c_plain.get_executor(pure=False),
                         "local_cluster": c_ours.get_executor(pure=False)}
            times: dict[str, list[float]] = {"serial": [], **{k: [] for k in executors}}
            for _ in range(args.repeats):  # interleaved, so a change of load hits every run
                t, serial = timed(lambda: llc_over_series(series, **run))
                times["serial"].append(t)
                for name, executor in executors.items():
                    t, frame = timed(lambda executor=executor: llc_over_series(series, executor=executor, **run))
                    times[name].append(t)
                    pd.testing.assert_frame_equal(serial, frame)
    median = {k: statistics.median(v) for k, v in times.items()}
    s = median["serial"]
    print(f"serial              {s:6.2f} s  ({s / args.checkpoints:.2f} s per checkpoint)  runs "
          f"{[round(x, 2) for x in times['serial']]}")
    for name in executors:
        print(f"2 workers, {name:18s} {median[name]:6.2f} s = {median[name] / s:.2f}x the serial time (target near "
              f"0.55)  runs {[round(x, 2) for x in times[name]]}  (results identical)")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
