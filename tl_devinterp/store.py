"""Per-checkpoint results on disk, so long runs over a series resume where they stopped, and safe file writes.

A store is a folder per (kind of result, parameters): `ROOT/KIND-HASH/` holds `params.json` and, per
finished checkpoint, `step_STEP-WEIGHTS.csv` (+ `.npy` for arrays) and `step_STEP-WEIGHTS.json`, the record
of those files' sha256 and the checkpoint's full fingerprint, written last: it marks the entry as done.
HASH covers every parameter that changes the numbers; WEIGHTS is the checkpoint's content fingerprint
(`series.fingerprint(step)`), so results are never reused for other weights, and a retrained series'
entries sit beside the old ones. Entries that are damaged (empty, cut, edited) fail their checksum and are
named and recomputed.

Every file goes through `atomic_write`: a unique temporary name in the same folder, fsync, rename. A crash,
a full disk or a second writer leaves whole files or none under final names. `folder_lock` keeps two
processes from working in one output folder at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .errors import FolderInUseError, InvalidTypeError, InvalidValueError, WriteError

TMP_SUFFIX = ".tl-tmp"  # temporary files of atomic_write: `.NAME.RANDOM.tl-tmp`
LOCK = ".tl_devinterp.lock"
_UMASK = os.umask(0)
os.umask(_UMASK)


class StoreWarning(UserWarning):
    """A stored result was not reused (computed for other weights, or damaged) and is recomputed."""



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
    store's key wherever results depend on data or weights, so others never reuse them."""
    h = hashlib.sha256()
    for a in arrays:
        if hasattr(a, "is_sparse") and a.is_sparse:
            a = a.coalesce()
            parts = [a.indices(), a.values()]
        else:
            parts = [a]
        h.update(str((tuple(a.shape), str(a.dtype))).encode())
        for p in parts:
            if isinstance(p, torch.Tensor):  # raw bytes: also for dtypes numpy lacks (bfloat16)
                p = p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            h.update(np.ascontiguousarray(p).tobytes())
    return h.hexdigest()[:16]


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


_file_hashes: dict[str, tuple[int, int, str]] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, cached by (size, mtime_ns): an unchanged file is hashed once per process."""
    st = os.stat(path)
    key = str(Path(path).resolve())
    cached = _file_hashes.get(key)
    if cached is not None and cached[:2] == (st.st_size, st.st_mtime_ns):
        return cached[2]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    _file_hashes[key] = (st.st_size, st.st_mtime_ns, h.hexdigest())
    return h.hexdigest()


def atomic_write(path: str | os.PathLike, content: str | bytes | Callable[[BinaryIO], None]) -> None:
    """Write `path` whole or not at all: a unique temporary file beside it, fsynced, then renamed over it.

    `content` is text, bytes, or a function writing to a binary file. On any failure the temporary file is
    removed and an OSError names `path` (disk full, read-only folder, ...).
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        with contextlib.suppress(OSError):  # make the rename durable (not possible on every platform)
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except OSError as e:
        raise WriteError(e.errno, e.strerror or str(e), str(path)) from e  # name the final file, not the temporary
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, purpose: str) -> Iterator[None]:
    """Hold an advisory lock on `folder` (created if needed) for `purpose`; refuse if another process holds it."""
    folder = Path(folder)
    file = folder / LOCK
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(file, "a+")
    except OSError as e:  # a read-only or unwritable folder, a full disk
        raise WriteError(e.errno, e.strerror or str(e), str(e.filename or file)) from e
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no advisory locks on this platform
        with lock:
            yield
        return
    with lock as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise FolderInUseError(
                f"{folder} is in use by {holder} (lock file {file}); wait for it to finish, or choose another folder."
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"tl_devinterp {purpose} (pid {os.getpid()})")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class ResultStore:
    """One entry (CSV, optional array, checksum record) per (checkpoint step, weights) under
    `root/kind-<hash of params>/`.

    `fingerprints[step]` is the content fingerprint of the weights the store is working on at that step
    (`map_series` sets it from `series.fingerprint(step)`); every method keys the step's files by it.
    """

    def __init__(self, root: str | os.PathLike, kind: str, params: dict[str, Any]):
        self.params = _jsonable(params)
        digest = hashlib.sha256(json.dumps(self.params, sort_keys=True).encode()).hexdigest()[:12]
        self.path = Path(root) / f"{kind}-{digest}"
        self.path.mkdir(parents=True, exist_ok=True)
        self.fingerprints: dict[int, str] = {}
        self._arrays: dict[int, Path] = {}  # arrays saved for a step whose CSV is not saved yet
        meta = self.path / "params.json"
        if not meta.exists():
            atomic_write(meta, json.dumps({"kind": kind, "params": self.params}, indent=2))

    def _file(self, step: int, suffix: str) -> Path:
        fp = self.fingerprints.get(int(step))
        return self.path / (f"step_{int(step):09d}" + (f"-{fp[:16]}" if fp else "") + suffix)

    def problem(self, step: int) -> str | None:
        """Why the step's entry cannot be reused: "" when there is none, a sentence when one exists but
        was computed for other weights or is damaged; None when it is whole and current."""
        record_file = self._file(step, ".json")
        if not record_file.exists():
            if any(self.path.glob(f"step_{int(step):09d}-*.json")):
                return f"the stored result for step {step} in {self.path} was computed for other weights"
            legacy = self.path / f"step_{int(step):09d}.csv"
            if legacy != self._file(step, ".csv") and legacy.exists():
                return f"{legacy} has no checksum or weights record (written by an older tl_devinterp)"
            return ""  # none, or one interrupted before its record
        try:
            record = json.loads(record_file.read_text())
            files, fp = dict(record["sha256"]), record["fingerprint"]
        except (ValueError, KeyError, TypeError) as e:
            return f"{record_file} is damaged ({type(e).__name__}: {e})"
        if fp != self.fingerprints.get(int(step), fp):
            return f"{record_file} was computed for other weights (fingerprint {fp[:16]})"
        for name, digest in files.items():
            file = self.path / name
            if not file.exists():
                return f"{file} is missing"
            if file_sha256(file) != digest:
                return f"{file} is damaged (its checksum differs from {record_file}: empty, cut or edited)"
        return None

    def has(self, step: int) -> bool:
        """Whether the step has a whole, undamaged entry for its current weights."""
        return self.problem(step) is None

    def load(self, step: int) -> pd.DataFrame:
        return pd.read_csv(self._file(step, ".csv"))

    def save(self, step: int, frame: pd.DataFrame) -> None:
        """Write the step's CSV, then the record of its files' checksums, which marks the step as done."""
        csv = self._file(step, ".csv")
        text = frame.to_csv(index=False)
        atomic_write(csv, text)
        files = {csv.name: hashlib.sha256(text.encode()).hexdigest()}
        array = self._arrays.pop(int(step), None)
        if array is not None:
            files[array.name] = file_sha256(array)
        record = {"step": int(step), "fingerprint": self.fingerprints.get(int(step), ""), "sha256": files}
        atomic_write(self._file(step, ".json"), json.dumps(record, indent=2))

    def save_array(self, step: int, array: np.ndarray) -> None:
        """A per-step array beside the step's CSV (save it first: the CSV's record marks the step as done)."""
        buffer = io.BytesIO()
        np.save(buffer, array)
        file = self._file(step, ".npy")
        atomic_write(file, buffer.getvalue())
        self._arrays[int(step)] = file

    def load_array(self, step: int) -> np.ndarray:
        """The step's array, memory-mapped (not read into RAM)."""
        return np.load(self._file(step, ".npy"), mmap_mode="r")

    def steps(self) -> list[int]:
        """Steps with a finished entry (for any weights)."""
        found = (re.fullmatch(r"step_(\d+)(-[0-9a-f]+)?", f.stem) for f in self.path.glob("step_*.json"))
        return sorted({int(m.group(1)) for m in found if m})


def map_series(
    series,
    compute: Callable[[int, Any], pd.DataFrame],
    *,
    store: ResultStore | None = None,
    steps: list[int] | None = None,
    desc: str = "checkpoints",
    executor: Executor | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Run `compute(step, model)` on each checkpoint (one model in memory at a time) and concatenate.

    With a `store`, a step's stored result is read back instead of recomputed when it was computed for the
    same weights (`series.fingerprint(step)`) and is undamaged; otherwise it is recomputed, with a
    `StoreWarning` saying why. With an `executor` (see `tl_devinterp.parallel`), the steps to do run as
    parallel jobs; each result is saved here, on the driver, as it arrives. The returned frame has a `step`
    column first, rows in step order.
    """
    todo = list(series.steps if steps is None else steps)
    missing = [s for s in todo if s not in set(series.steps)]
    if missing:
        raise InvalidValueError(f"Steps {missing} are not in the series; available steps: {series.steps}.")
    series.verify(todo)  # every file checked before the first result: a damaged one fails now, not hours in
    frames: dict[int, pd.DataFrame] = {}
    seen: dict[str, int] = {}

    def stored(step: int) -> bool:
        """Whether the store holds a whole result for this checkpoint's weights (then read into `frames`)."""
        if store is None:
            return False
        # 1. key the step's entry by the checkpoint's content; identical checkpoints are a known hazard
        fp = series.fingerprint(step)
        if fp in seen:
            warnings.warn(f"The checkpoints at steps {seen[fp]} and {step} have identical weights "
                          f"(fingerprint {fp[:16]}): check the series' source.", StoreWarning, stacklevel=3)
        seen[fp] = step
        store.fingerprints[step] = fp
        # 2. reuse a whole, current entry; say why any other is not reused
        problem = store.problem(step)
        if problem is None:
            frames[step] = store.load(step)
        elif problem:
            warnings.warn(f"{problem}; recomputing step {step}.", StoreWarning, stacklevel=3)
        return problem is None

    # 3. compute the rest, here (one model at a time, fingerprinted just before) or as jobs on the executor;
    # each result is saved as it arrives
    if executor is None:
        results = ((step, _at_step(compute, step, series))
                   for step in tqdm(todo, desc=desc, unit="ckpt", disable=not progress) if not stored(step))
    else:
        from .parallel import map_steps

        results = map_steps(series, compute, [step for step in todo if not stored(step)], executor, desc=desc,
                            progress=progress)
    for step, frame in results:
        if "step" not in frame:
            frame.insert(0, "step", step)
        if store is not None:
            store.save(step, frame)
        frames[step] = frame
    return pd.concat([frames[s] for s in todo], ignore_index=True) if todo else pd.DataFrame({"step": []})


def _at_step(compute: Callable[[int, Any], pd.DataFrame], step: int, series) -> pd.DataFrame:
    """`compute(step, model)`; an error says which checkpoint it came from."""
    try:
        return compute(step, series.load(step))
    except Exception as e:
        if hasattr(e, "add_note"):  # Python >= 3.11
            e.add_note(f"(at checkpoint step {step})")
        raise
