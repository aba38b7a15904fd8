"""Benchmark checkpoints as parallel jobs: 2 single-thread local Dask workers against the serial run.

    python benchmarks/bench_scale.py [--repeats 3] [--num-draws 100]

Trains the `quick` preset series (10 checkpoints) into a temporary folder, then times the whole-model LLC
over all its checkpoints (a) serially in this process with torch at 1 thread and (b) on a running
`local_cluster(2)` (2 single-thread processes, started once, outside the timing: the start-up is paid
once per analysis). Target on a 2-core machine: serial / parallel >= 1.5. Timings are medians over repeats;
the machine's load average is printed, since other processes take cores from both runs.
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
from distributed import Client

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
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        series = train(os.path.join(tmp, "series"), "quick", progress=False)
        tokens = token_tensor(make_data(series.meta["data"])["train"])
        config = SGLDConfig(num_chains=2, num_draws=args.num_draws, num_burnin=20)
        run = dict(data=tokens, config=config, progress=False)
        print(f"{series}, whole-model LLC, {config.num_chains} chains x {config.num_draws} draws; "
              f"load average before: {os.getloadavg()}")
        with local_cluster(2) as cluster, Client(cluster) as client:
            executor = client.get_executor(pure=False)
            serial, parallel = [], []
            for _ in range(args.repeats):  # interleaved, so a change of load hits both
                t, a = timed(lambda: llc_over_series(series, **run))
                serial.append(t)
                t, b = timed(lambda: llc_over_series(series, executor=executor, **run))
                parallel.append(t)
                pd.testing.assert_frame_equal(a, b)
    s, p = statistics.median(serial), statistics.median(parallel)
    print(f"serial   {s:6.2f} s  ({s / len(series):.2f} s per checkpoint)  runs {[round(x, 2) for x in serial]}")
    print(f"2 workers {p:6.2f} s  runs {[round(x, 2) for x in parallel]}  (results identical)")
    print(f"speed-up {s / p:.2f}x (target >= 1.5)  load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
