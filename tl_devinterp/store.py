"""Per-checkpoint results on disk, so long runs over a series resume where they stopped.

A store is a folder per (kind of result, parameters): `ROOT/KIND-HASH/` holds `params.json` and one CSV per
finished step. The hash covers every parameter that changes the numbers, so a change of hyperparameters
starts a new folder and never reuses stale results. Files are written to a temporary name and renamed,
so an interrupted run leaves either a whole result or none.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return repr(x)


def fingerprint(*arrays) -> str:
    """A hash of arrays' shapes, dtypes and contents (tensors, sparse tensors or numpy arrays): part of a
    store's key wherever results depend on data, so other data never reuses them."""
    h = hashlib.sha256()
    for a in arrays:
        if hasattr(a, "is_sparse") and a.is_sparse:
            a = a.coalesce()
            parts = [a.indices(), a.values()]
        else:
            parts = [a]
        h.update(str((tuple(a.shape), str(a.dtype))).encode())
        for p in parts:
            p = p.detach().cpu().contiguous().numpy() if hasattr(p, "detach") else np.ascontiguousarray(p)
            h.update(p.tobytes())
    return h.hexdigest()[:16]


class ResultStore:
    """One CSV per checkpoint step under `root/kind-<hash of params>/`."""

    def __init__(self, root: str | os.PathLike, kind: str, params: dict[str, Any]):
        self.params = _jsonable(params)
        digest = hashlib.sha256(json.dumps(self.params, sort_keys=True).encode()).hexdigest()[:12]
        self.path = Path(root) / f"{kind}-{digest}"
        self.path.mkdir(parents=True, exist_ok=True)
        meta = self.path / "params.json"
        if not meta.exists():
            _atomic_write(meta, json.dumps({"kind": kind, "params": self.params}, indent=2))

    def _file(self, step: int) -> Path:
        return self.path / f"step_{int(step):09d}.csv"

    def has(self, step: int) -> bool:
        return self._file(step).exists()

    def load(self, step: int) -> pd.DataFrame:
        return pd.read_csv(self._file(step))

    def save(self, step: int, frame: pd.DataFrame) -> None:
        _atomic_write(self._file(step), frame.to_csv(index=False))

    def save_array(self, step: int, array: np.ndarray) -> None:
        """A per-step array beside the step's CSV (save it first: the CSV marks the step as done)."""
        tmp = self.path / f"step_{int(step):09d}.tmp.npy"
        np.save(tmp, array)
        os.replace(tmp, self.path / f"step_{int(step):09d}.npy")

    def load_array(self, step: int) -> np.ndarray:
        """The step's array, memory-mapped (not read into RAM)."""
        return np.load(self.path / f"step_{int(step):09d}.npy", mmap_mode="r")

    def steps(self) -> list[int]:
        return sorted(int(f.stem.split("_")[1]) for f in self.path.glob("step_*.csv"))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def map_series(
    series,
    compute: Callable[[int, Any], pd.DataFrame],
    *,
    store: ResultStore | None = None,
    steps: list[int] | None = None,
    desc: str = "checkpoints",
    progress: bool = True,
) -> pd.DataFrame:
    """Run `compute(step, model)` on each checkpoint (one model in memory at a time) and concatenate.

    With a `store`, finished steps are read back instead of recomputed and each new result is saved as
    soon as it is done. The returned frame always has a `step` column first.
    """
    todo = list(series.steps if steps is None else steps)
    missing = [s for s in todo if s not in set(series.steps)]
    if missing:
        raise ValueError(f"Steps {missing} are not in the series; available steps: {series.steps}.")
    frames = []
    for step in tqdm(todo, desc=desc, unit="ckpt", disable=not progress):
        if store is not None and store.has(step):
            frames.append(store.load(step))
            continue
        frame = compute(step, series.load(step))
        if "step" not in frame:
            frame.insert(0, "step", step)
        if store is not None:
            store.save(step, frame)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"step": []})
