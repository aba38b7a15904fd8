"""The one runner of every per-checkpoint pass (LLCs, head scores, essential dynamics' features,
susceptibilities): `map_series(series, compute, store=, steps=, executor=, device=, progress=)`.

For each checkpoint, in step order:
1. its weights' fingerprint: the source's own hash (a file's sha256), or a hash of the model loaded for it;
2. with a store, its entry: reused when whole and computed for these weights, else recomputed (a stale
   entry is named in a `StoreWarning`);
3. the model loaded once (onto `device`) and `compute(step, model)` run, here or as a job on the executor
   (`parallel.map_steps`: processes or a Dask cluster); `compute` returns a frame, or a (frame, array)
   pair whose array the store keeps beside the frame;
4. each result saved as it arrives, on the driver, so the store stays the single source of truth.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from concurrent.futures import Executor
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .errors import InvalidValueError
from .parallel import map_steps
from .store import REUSABLE, ResultStore, StoreWarning

Computed = pd.DataFrame | tuple[pd.DataFrame, np.ndarray]


def map_series(
    series,
    compute: Callable[[int, Any], Computed],
    *,
    store: ResultStore | None = None,
    steps: list[int] | None = None,
    desc: str = "checkpoints",
    executor: Executor | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Run `compute(step, model)` on each checkpoint (one model in memory at a time) and concatenate the frames:
    a `step` column first, rows in step order. See the module docstring for the store and the executor;
    each job's result equals the serial run's. With a store, `store.load_array(step, series.fingerprint(step))`
    reads a step's array back."""
    todo = list(series.steps if steps is None else steps)
    missing = [s for s in todo if s not in set(series.steps)]
    if missing:
        raise InvalidValueError(f"Steps {missing} are not in the series; available steps: {series.steps}.")
    series.verify(todo)  # every file checked before the first result: a damaged one fails now, not hours in
    frames: dict[int, pd.DataFrame] = {}
    weights: dict[int, str] = {}
    loaded: dict[int, Any] = {}  # a model loaded to hash it, handed to its computation (serial runs)

    # 1-2. each step's weights, and its stored result where one is whole and current
    def stored(step: int) -> bool:
        if store is None:
            return False
        fp = series.known_fingerprint(step)
        if fp is None:  # no hash yet: hash the loaded model (and keep it for the computation here)
            model = series.load(step)
            fp = series.fingerprint(step)
            if executor is None:
                loaded[step] = model
        if fp in weights.values():
            first = next(s for s, f in weights.items() if f == fp)
            warnings.warn(f"The checkpoints at steps {first} and {step} have identical weights "
                          f"(fingerprint {fp[:16]}): check the series' source.", StoreWarning, stacklevel=4)
        weights[step] = fp
        status = store.status(step, fp)
        if status == REUSABLE:
            frames[step] = store.load(step, fp)
            loaded.pop(step, None)
        elif status.reason:
            warnings.warn(f"{status.reason}; recomputing step {step}.", StoreWarning, stacklevel=4)
        return status == REUSABLE

    # 3. compute the rest here, one model at a time, or as jobs on the executor
    job = partial(at_step, compute, series, device)
    if executor is None:
        results = ((step, job(step, loaded.pop(step, None)))
                   for step in tqdm(todo, desc=desc, unit="ckpt", disable=not progress) if not stored(step))
    else:
        results = map_steps(job, [step for step in todo if not stored(step)], executor, desc=desc, progress=progress)
    # 4. save each result as it arrives
    for step, result in results:
        frame, array = result if isinstance(result, tuple) else (result, None)
        if "step" not in frame:
            frame.insert(0, "step", step)
        if store is not None:
            store.save(step, weights[step], frame, array)
        frames[step] = frame
    return pd.concat([frames[s] for s in todo], ignore_index=True) if todo else pd.DataFrame({"step": []})


def at_step(compute: Callable[[int, Any], Computed], series, device, step: int, model=None) -> Computed:
    """`compute(step, model)` on the step's model (loaded unless given, moved to `device`); an error says which
    checkpoint it came from."""
    try:
        model = series.load(step) if model is None else model
        return compute(step, model if device is None else model.to(device))
    except Exception as e:
        if hasattr(e, "add_note"):  # Python >= 3.11
            e.add_note(f"(at checkpoint step {step})")
        raise
