"""Checkpoints of a series computed in parallel on any `concurrent.futures.Executor`.

A job is one checkpoint: the worker loads the model itself from the series (its files; an in-memory series
is pickled and shipped), runs `compute(step, model)` and sends back a frame. `runner.map_series` writes each
frame to its store on the driver as it arrives, so the store stays the single source of truth: a driver killed
mid-run loses only the jobs in flight, and the rerun skips every finished checkpoint. Results equal the
serial run's, since each checkpoint's random stream depends only on the seed and the data.

Executors: `distributed.Client(...).get_executor()` (a Dask cluster: `LocalCluster` on one machine,
`dask_jobqueue.SLURMCluster` on a cluster, `dask_cuda.LocalCUDACluster` for one worker per GPU), a
`ProcessPoolExecutor`, or any other. `compute` and the series must pickle (module-level functions and
`functools.partial`, not closures). `dask_executor` builds the Dask one for `tl-devinterp analyze --workers`
and `--scheduler`.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import torch
from tqdm.auto import tqdm

from .errors import InvalidValueError, MissingDependencyError, WorkersLostError

JOBS_PER_SLOT = 2  # jobs in flight per worker thread: workers never wait, the driver holds few job payloads
POLL_SECONDS = 10  # how often we look for workers that joined (a SLURM cluster starts while we run)



def map_steps(job: Callable[[int], Any], steps: list[int], executor: Executor, *, desc: str = "checkpoints",
              progress: bool = True) -> Iterator[tuple[int, Any]]:
    """Yield `(step, job(step))` for each of `steps` as its job finishes (any order); `job` must pickle (e.g.
    a `functools.partial` of `runner.at_step`, which loads the step's model on the worker).

    A worker killed mid-job: Dask reruns the job on another worker (up to its `allowed-failures`; give
    `get_executor(retries=n)` to also retry jobs that raise). A `ProcessPoolExecutor` breaks for good, so we
    yield every finished result and then raise `WorkersLostError` naming the steps not done.
    """
    todo, running = list(steps), {}
    try:
        with tqdm(total=len(todo), desc=desc, unit="ckpt", disable=not progress) as bar:
            while todo or running:
                # keep every worker busy (a cluster may grow while we run), then hand back whatever finished
                per_host, slots = _slots(executor)
                while todo and len(running) < JOBS_PER_SLOT * slots:
                    step = todo.pop(0)
                    running[executor.submit(_job, job, step, per_host)] = step
                finished, _ = wait(running, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
                lost = []
                for future in sorted(finished, key=running.get):
                    step = running.pop(future)
                    try:
                        frame, caught = future.result()
                    except BrokenProcessPool:
                        lost.append(step)
                        continue
                    for message, category in caught:  # the sampler's diagnostics reach the user, as in a serial run
                        warnings.warn(message, category, stacklevel=2)
                    bar.update()
                    yield step, frame
                if lost:
                    missing = sorted([*lost, *running.values(), *todo])
                    raise WorkersLostError(
                        f"Worker processes died (out of memory, or killed) before steps {missing} were computed; "
                        f"the other steps are done (and saved, given a store_dir). Rerun with the same store_dir to "
                        f"compute only these, or use a Dask executor, which reruns the jobs of lost workers.")
    finally:  # an error or a stopped driver: drop the jobs nobody will read
        for future in running:
            future.cancel()


def _job(job: Callable[[int], Any], step: int, per_host: int) -> tuple[Any, list[tuple[str, type]]]:
    """One checkpoint on a worker: share the host's cores between its workers, pin a GPU, load, compute; the
    frame comes back with the warnings raised, for the driver to show."""
    torch.set_num_threads(max(1, _cores() // per_host))
    undo_malloc_trim()
    if "CUDA_VISIBLE_DEVICES" not in os.environ and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        torch.cuda.set_device(_worker_index() % torch.cuda.device_count())  # "cuda" now means this GPU
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = job(step)
    return frame, [(str(w.message), w.category) for w in caught]


def undo_malloc_trim() -> bool:
    """In a process started with `MALLOC_TRIM_THRESHOLD_` set (Dask's nanny sets it for every worker on any
    cluster), give glibc's allocator back the mmap threshold it would have: with the variable set, every
    allocation above 128 KiB is a fresh mmap, and torch on the CPU runs about 1.5-2x slower. The threshold is
    set to glibc's dynamic maximum (32 MiB) and trimming to twice that, as `mallopt` allows at run time.
    Returns whether it acted; warns once where the variable is set and this libc has no `mallopt`."""
    global _MALLOC_DONE
    if _MALLOC_DONE or "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        return False
    _MALLOC_DONE = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20) == 1
    except (OSError, AttributeError):
        ok = False
    if not ok:
        warnings.warn("MALLOC_TRIM_THRESHOLD_ is set in this worker (Dask's default) and this C library cannot be "
                      "told otherwise: torch may run about 2x slower here. Set distributed.nanny.pre-spawn-environ."
                      "MALLOC_TRIM_THRESHOLD_: null in the Dask config.", RuntimeWarning, stacklevel=2)
    return ok


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_MALLOC_DONE = False  # once per process


def _cores() -> int:
    """Cores this process may use (a SLURM allocation, a container's CPU set), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _slots(executor: Executor) -> tuple[int, int]:
    """(most worker threads on one host, worker threads in all) of a Dask or process-pool executor."""
    client = getattr(executor, "_client", None)
    if client is not None:  # distributed's ClientExecutor
        nthreads = client.nthreads()  # {"tcp://host:port": threads}
        hosts: dict[str, int] = {}
        for address, n in nthreads.items():
            host = address.rsplit(":", 1)[0]
            hosts[host] = hosts.get(host, 0) + n
        return max(hosts.values(), default=1), max(1, sum(nthreads.values()))
    workers = getattr(executor, "_max_workers", None) or _cores()
    return workers, workers


def _worker_index() -> int:
    """This worker's number on its host: Dask names workers 0, 1, ... (LocalCluster) or JOB-0, JOB-1
    (jobqueue); a process pool numbers its processes from 1."""
    try:
        from distributed import get_worker

        name = str(get_worker().name)
        return int(name.rsplit("-", 1)[-1]) if name.rsplit("-", 1)[-1].isdigit() else 0
    except (ImportError, ValueError):  # not in a Dask worker
        identity = multiprocessing.current_process()._identity
        return identity[0] - 1 if identity else 0


@contextlib.contextmanager
def dask_executor(*, workers: int | None = None, scheduler: str | None = None,
                  retries: int = 2) -> Iterator[Executor | None]:
    """An executor on a local Dask cluster of `workers` single-thread processes, or on the running scheduler at
    `scheduler` (e.g. tcp://10.0.0.1:8786); None with neither (serial). Closes what it started."""
    if workers is None and scheduler is None:
        yield None
        return
    if workers is not None and scheduler is not None:
        raise InvalidValueError("Give --workers (a local cluster) or --scheduler (an existing one), not both.")
    if workers is not None and workers < 1:
        raise InvalidValueError(f"--workers must be >= 1, got {workers}.")
    try:
        from distributed import Client
    except ImportError:
        raise MissingDependencyError("Running on Dask needs distributed: pip install 'tl_devinterp[dask]'.") from None
    with contextlib.ExitStack() as stack:
        if scheduler is None:
            scheduler = stack.enter_context(local_cluster(workers))
        client = stack.enter_context(Client(scheduler))
        yield client.get_executor(pure=False, retries=retries)


def local_cluster(workers: int):
    """A Dask `LocalCluster` of `workers` single-thread processes, without the `MALLOC_TRIM_THRESHOLD_` that
    Dask sets for its workers by default: it makes torch on the CPU about 2x slower (every tensor allocation
    becomes an mmap). On other clusters each job undoes it in its worker (`undo_malloc_trim`)."""
    import dask
    from distributed import LocalCluster

    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
