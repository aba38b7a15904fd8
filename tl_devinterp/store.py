"""Per-checkpoint results on disk, so long runs over a series resume where they stopped.

A store is a folder per (kind of result, parameters): `ROOT/KIND-HASH/` holds `params.json` and, per
finished checkpoint, `step_STEP-WEIGHTS.csv` (+ `.npy` for an array) and `step_STEP-WEIGHTS.json`, the
record of those files' sha256 and the checkpoint's full fingerprint, written last: it marks the entry as
done. HASH covers every parameter that changes the numbers (a callable by `callable_key`); WEIGHTS is the
checkpoint's content fingerprint, so results are never reused for other weights, and a retrained series'
entries sit beside the old ones. A step's entry is reusable, missing, or stale (computed for other weights,
damaged: empty, cut, edited), and a stale one is named and recomputed. Files are written by
`files.atomic_write`; `runner.map_series` reads and fills stores.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .errors import InvalidTypeError, InvalidValueError
from .files import atomic_write, file_sha256, fingerprint


class StoreWarning(UserWarning):
    """A stored result was not reused (computed for other weights, or damaged) and is recomputed."""


@dataclass(frozen=True)
class Status:
    """What a store holds for a step: "reusable", "missing" or "stale" (with the reason it is not reused)."""

    kind: str
    reason: str = ""

    @classmethod
    def stale(cls, reason: str) -> Status:
        return cls("stale", reason)


REUSABLE, MISSING = Status("reusable"), Status("missing")


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return repr(x)


def callable_key(fn: Callable | None, *, key: str | None = None, option: str = "loss_fn") -> str | None:
    """What a store keys a callable by: `key` when the caller names it; else a module-level function's
    `module:qualname` and a hash of its code (a `functools.partial` adds its arguments); None for None.

    An anonymous function (lambda), a nested function or closure, a bound method or a callable object has no
    identity a store can establish (every lambda is `<lambda>`, two nested `loss` functions share a name):
    it is refused with a ValueError that says how to name it, so no stored result is ever reused for
    another function.
    """
    if key is not None:
        if not isinstance(key, str) or not key:
            raise InvalidTypeError(f"key must be a non-empty string naming what {option} computes, got {key!r}.")
        return f"key:{key}"
    if fn is None:
        return None
    return _callable_identity(fn, option)


def _callable_identity(fn: Callable, option: str) -> str:
    if isinstance(fn, functools.partial):
        args = [_value_identity(a, option) for a in fn.args]
        kwargs = {k: _value_identity(v, option) for k, v in sorted(fn.keywords.items())}
        return f"partial({_callable_identity(fn.func, option)}, {args}, {kwargs})"
    qualname, code = getattr(fn, "__qualname__", None), getattr(fn, "__code__", None)
    if qualname is None or code is None or "<" in qualname or getattr(fn, "__closure__", None):
        what = ("an anonymous function (lambda)" if qualname and "<lambda>" in qualname
                else "a nested function or closure" if qualname and code is not None
                else f"a {type(fn).__name__} object")
        raise InvalidValueError(
            f"{option}={getattr(fn, '__qualname__', repr(fn))} is {what}, which a result store cannot tell apart "
            f"from another one: define it at module level, or name what it computes with key= (e.g. "
            f"key='100x lm_loss'); a new key gets new results.")
    h = hashlib.sha256()
    _hash_code(h, code)
    h.update(repr(_value_identity(fn.__defaults__ or (), option)).encode())
    h.update(repr(_value_identity(fn.__kwdefaults__ or {}, option)).encode())
    return f"{fn.__module__}:{qualname}:{h.hexdigest()[:16]}"


def _hash_code(h, code) -> None:
    """Bytecode, names and constants (nested code objects too), not line numbers or file names."""
    h.update(code.co_code)
    h.update(repr((code.co_names, code.co_varnames, code.co_freevars)).encode())
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            _hash_code(h, const)
        else:
            h.update(repr(const).encode())


def _value_identity(x: Any, option: str) -> Any:
    """A partial's argument or a default as a key: plain values, arrays by content, functions by identity."""
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, (list, tuple)):
        return [_value_identity(v, option) for v in x]
    if isinstance(x, dict):
        return {str(k): _value_identity(v, option) for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))}
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return f"array:{fingerprint(x)}"
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {type(x).__qualname__: _value_identity(dataclasses.asdict(x), option)}
    if callable(x):
        return _callable_identity(x, option)
    raise InvalidValueError(f"{option} is bound to a {type(x).__name__} argument, which a result store cannot key by: "
                            f"name what it computes with key= (e.g. key='my loss, v2').")


class ResultStore:
    """One entry (CSV, optional array, checksum record) per (checkpoint step, weights) under
    `root/kind-<hash of params>/`. Every method takes the fingerprint of the weights it is about
    (`series.fingerprint(step)`, handed in by the runner), which keys the step's files.
    """

    def __init__(self, root: str | os.PathLike, kind: str, params: dict[str, Any]):
        self.params = _jsonable(params)
        digest = hashlib.sha256(json.dumps(self.params, sort_keys=True).encode()).hexdigest()[:12]
        self.path = Path(root) / f"{kind}-{digest}"
        self.path.mkdir(parents=True, exist_ok=True)
        meta = self.path / "params.json"
        if not meta.exists():
            atomic_write(meta, json.dumps({"kind": kind, "params": self.params}, indent=2))

    def _file(self, step: int, weights: str, suffix: str) -> Path:
        return self.path / f"step_{int(step):09d}-{weights[:16]}{suffix}"

    def status(self, step: int, weights: str) -> Status:
        """REUSABLE when the step's entry for these weights is whole; MISSING when there is none (or one
        interrupted before its record); stale, with the reason, when one exists for other weights or is
        damaged."""
        record_file = self._file(step, weights, ".json")
        if not record_file.exists():
            if any(self.path.glob(f"step_{int(step):09d}-*.json")):
                return Status.stale(f"the stored result for step {step} in {self.path} was computed for other weights")
            return MISSING
        try:
            record = json.loads(record_file.read_text())
            files, fp = dict(record["sha256"]), record["fingerprint"]
        except (ValueError, KeyError, TypeError) as e:
            return Status.stale(f"{record_file} is damaged ({type(e).__name__}: {e})")
        if fp != weights:
            return Status.stale(f"{record_file} was computed for other weights (fingerprint {fp[:16]})")
        for name, digest in files.items():
            file = self.path / name
            if not file.exists():
                return Status.stale(f"{file} is missing")
            if file_sha256(file) != digest:
                return Status.stale(f"{file} is damaged (its checksum differs from {record_file}: empty, cut or "
                                    f"edited)")
        return REUSABLE

    def load(self, step: int, weights: str) -> pd.DataFrame:
        return pd.read_csv(self._file(step, weights, ".csv"))

    def load_array(self, step: int, weights: str) -> np.ndarray:
        """The step's array, memory-mapped (not read into RAM)."""
        return np.load(self._file(step, weights, ".npy"), mmap_mode="r")

    def save(self, step: int, weights: str, frame: pd.DataFrame, array: np.ndarray | None = None) -> None:
        """Write the step's CSV (and array), then the record of their checksums, which marks the step as done."""
        files = {}
        if array is not None:
            buffer = io.BytesIO()
            np.save(buffer, array)
            npy = self._file(step, weights, ".npy")
            atomic_write(npy, buffer.getvalue())
            files[npy.name] = hashlib.sha256(buffer.getvalue()).hexdigest()
        csv = self._file(step, weights, ".csv")
        text = frame.to_csv(index=False)
        atomic_write(csv, text)
        files[csv.name] = hashlib.sha256(text.encode()).hexdigest()
        record = {"step": int(step), "fingerprint": weights, "sha256": files}
        atomic_write(self._file(step, weights, ".json"), json.dumps(record, indent=2))

    def steps(self) -> list[int]:
        """Steps with a finished entry (for any weights)."""
        found = (re.fullmatch(r"step_(\d+)(-[0-9a-f]+)?", f.stem) for f in self.path.glob("step_*.json"))
        return sorted({int(m.group(1)) for m in found if m})
