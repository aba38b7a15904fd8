"""Checkpoints as parallel jobs (tl_devinterp.parallel): same results as serial, nothing lost or duplicated
when a worker or the driver dies."""

import os
import pickle
import warnings
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
import torch

from tl_devinterp import CheckpointSeries
from tl_devinterp.data import make_data, token_tensor
from tl_devinterp.dynamics import essential_dynamics
from tl_devinterp.metrics import metrics_over_series
from tl_devinterp.parallel import WorkersLostError, local_cluster
from tl_devinterp.runner import map_series
from tl_devinterp.sampling import llc_over_series
from tl_devinterp.sampling.settings import SGLDConfig
from tl_devinterp.store import ResultStore

distributed = pytest.importorskip("distributed")

TINY = SGLDConfig(num_chains=2, num_draws=4, num_burnin=2, batch_size=16)


@pytest.fixture(scope="module")
def executor():
    """A Dask LocalCluster of 2 single-thread worker processes, closed after the module."""
    with local_cluster(2) as cluster, distributed.Client(cluster) as client:
        yield client.get_executor(pure=False)


@pytest.fixture(scope="module")
def series(quick_series_dir):
    return CheckpointSeries.from_dir(quick_series_dir)


@pytest.fixture(scope="module")
def tokens(series):
    return token_tensor(make_data(series.meta["data"])["train"])[:64]


def weight_sum(step: int, model, *, log_dir: Path, die_at: int | None = None) -> pd.DataFrame:
    """A cheap per-checkpoint result that logs each computation (one file per call) and, at `die_at`, kills
    its worker process once (a marker file remembers it did)."""
    marker = log_dir / "died"
    if step == die_at and not marker.exists():
        marker.touch()
        os._exit(1)
    (log_dir / f"{step}-{os.getpid()}-{len(list(log_dir.iterdir()))}").touch()
    warnings.warn(f"summed the weights of step {step}", stacklevel=1)
    return pd.DataFrame({"value": [float(sum(p.detach().double().sum() for p in model.parameters()))]})


def computed(log_dir: Path) -> list[int]:
    return sorted(int(f.name.split("-")[0]) for f in log_dir.iterdir() if f.name != "died")


def test_series_pickle_with_their_loaders(series):
    """A series is shipped to workers: a closure loader (the old from_dir / from_models) would not pickle."""
    step = series.steps[-1]
    for s in (series, CheckpointSeries.from_models([series.load(step)], [step])):
        again = pickle.loads(pickle.dumps(s))
        assert again.steps == s.steps
        for a, b in zip(again.load(step).state_dict().values(), s.load(step).state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow
def test_parallel_equals_serial(series, tokens, executor, tmp_path):
    """LLCs (model and a head), metrics and ED features from 2 workers equal the serial run's, rows in step order
    (catches a random stream that depends on the worker or the order, and rows in completion order)."""
    steps = series.steps[-2:]
    serial = llc_over_series(series, tokens, TINY, heads=["l1h0"], steps=steps, progress=False)
    parallel = llc_over_series(series, tokens, TINY, heads=["l1h0"], steps=steps, progress=False, executor=executor,
                               store_dir=tmp_path)
    pd.testing.assert_frame_equal(parallel, serial)
    assert list(parallel["step"].unique()) == steps

    kwargs = dict(metrics=["previous_token", "loss"], tokens=tokens[:8], n_seqs=4, steps=steps, progress=False)
    pd.testing.assert_frame_equal(metrics_over_series(series, executor=executor, **kwargs),
                                  metrics_over_series(series, **kwargs))

    ed = dict(n_components=2, steps=series.steps[-4:], progress=False)
    a, b = essential_dynamics(series, tokens[:16], **ed), essential_dynamics(series, tokens[:16], executor=executor, **ed)
    torch.testing.assert_close(torch.as_tensor(b.scores), torch.as_tensor(a.scores), rtol=0, atol=0)


@pytest.mark.slow
def test_killed_worker_job_is_rerun_once(series, executor, tmp_path):
    """A worker that dies mid-job: Dask reruns the job elsewhere; every step is stored once and the frame is whole
    (catches a lost step, or a result saved twice), and the jobs' warnings reach the driver."""
    log = tmp_path / "log"
    log.mkdir()
    store = ResultStore(tmp_path, "test", {})
    steps = series.steps[:6]
    with pytest.warns(UserWarning, match="summed the weights of step") as caught:  # relayed to the driver
        frame = map_series(series, partial(weight_sum, log_dir=log, die_at=steps[2]), store=store, steps=steps,
                           executor=executor, progress=False)
    assert len([w for w in caught if "summed" in str(w.message)]) == len(steps)
    assert (log / "died").exists()
    # a finished result still held by the dead worker is computed again (Dask), but reaches the store once
    assert list(frame["step"]) == steps and set(computed(log)) == set(steps) and store.steps() == steps


@pytest.mark.slow
def test_broken_process_pool_reports_missing_steps(series, tmp_path):
    """A process pool cannot rerun a lost job: the error names the missing steps, the finished ones stay stored,
    and a rerun computes only the missing ones."""
    log = tmp_path / "log"
    log.mkdir()
    store = ResultStore(tmp_path, "test", {})
    steps = series.steps[:6]
    with ProcessPoolExecutor(2) as pool, pytest.raises(WorkersLostError, match=r"before steps \[") as error:
        map_series(series, partial(weight_sum, log_dir=log, die_at=steps[3]), store=store, steps=steps,
                   executor=pool, progress=False)
    done = store.steps()
    assert steps[3] not in done and all(str(s) in str(error.value) for s in steps if s not in done)
    first = computed(log)
    frame = map_series(series, partial(weight_sum, log_dir=log), store=store, steps=steps, progress=False)
    assert list(frame["step"]) == steps
    assert sorted(set(computed(log)) - set(first)) == sorted(set(steps) - set(done))


@pytest.mark.slow
def test_killed_driver_rerun_computes_only_the_rest(series, executor, tmp_path, monkeypatch):
    """The driver dies after saving 2 results (simulated in the store's save); the rerun computes only the
    checkpoints that were not saved (catches results written on workers only, or a resume that recomputes)."""
    log = tmp_path / "log"
    log.mkdir()
    steps = series.steps[:6]
    save, saved = ResultStore.save, []

    def dying_save(self, step, weights, frame, array=None):
        if len(saved) == 2:
            raise KeyboardInterrupt
        save(self, step, weights, frame, array)
        saved.append(step)

    monkeypatch.setattr(ResultStore, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        map_series(series, partial(weight_sum, log_dir=log), store=ResultStore(tmp_path, "test", {}), steps=steps,
                   executor=executor, progress=False)
    monkeypatch.setattr(ResultStore, "save", save)
    rerun = tmp_path / "rerun"  # jobs of the killed run may still finish into `log`
    rerun.mkdir()
    frame = map_series(series, partial(weight_sum, log_dir=rerun), store=ResultStore(tmp_path, "test", {}),
                       steps=steps, executor=executor, progress=False)
    assert list(frame["step"]) == steps
    assert computed(rerun) == sorted(set(steps) - set(saved))


def test_cli_refuses_workers_with_scheduler(quick_series_dir, tmp_path, capsys):
    """--workers starts a local cluster and --scheduler joins one: both at once is an input error, not a hang."""
    from tl_devinterp.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["analyze", str(quick_series_dir), "--out", str(tmp_path), "--workers", "2", "--scheduler", "tcp://x:1"])
    assert stop.value.code == 2 and "--workers" in capsys.readouterr().err


MMAPS = """
import ctypes, sys
import torch
from tl_devinterp.parallel import undo_malloc_trim

class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
acted = undo_malloc_trim() if sys.argv[1] == "undo" else False
before = libc.mallinfo2().hblks
kept = [torch.ones(256 * 1024) for _ in range(8)]  # 1 MiB each
print(acted, libc.mallinfo2().hblks - before, undo_malloc_trim())
"""


@pytest.mark.skipif(not Path("/lib/x86_64-linux-gnu/libc.so.6").exists() and not Path("/lib64/libc.so.6").exists(),
                    reason="glibc only")
def test_a_dask_worker_gets_the_usual_mmap_threshold_back(tmp_path):
    """Catches: jobs on a Dask cluster other than ours (SLURM, a user's LocalCluster) running with Dask's
    MALLOC_TRIM_THRESHOLD_, which turns every tensor of more than 128 KiB into its own mmap (torch ~2x slower)."""
    import subprocess
    import sys

    def run(mode: str, env: dict) -> list[str]:
        out = subprocess.run([sys.executable, "-c", MMAPS, mode], env={**os.environ, **env}, capture_output=True,
                             text=True, check=True, timeout=120)
        return out.stdout.split()

    assert run("plain", {"MALLOC_TRIM_THRESHOLD_": "65536"}) == ["False", "8", "True"]  # one mmap per tensor
    assert run("undo", {"MALLOC_TRIM_THRESHOLD_": "65536"}) == ["True", "0", "False"]  # from the heap; once
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_TRIM_THRESHOLD_"}
    out = subprocess.run([sys.executable, "-c", MMAPS, "undo"], env=env, capture_output=True, text=True, check=True,
                         timeout=120)
    assert out.stdout.split()[0] == "False"  # nothing to undo
