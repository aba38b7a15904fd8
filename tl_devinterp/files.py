"""Files: content hashes, whole-or-nothing writes, and a lock on a working folder.

Every file the package writes goes through `atomic_write`: a unique temporary name in the same folder,
fsync, rename. A crash, a full disk or a second writer leaves whole files or none under final names.
`folder_lock` keeps two processes from working in one output folder at once. `fingerprint` hashes arrays
(weights, data) and `file_sha256` files, so results are keyed by content.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from .errors import FolderInUseError, WriteError

TMP_SUFFIX = ".tl-tmp"  # temporary files of atomic_write: `.NAME.RANDOM.tl-tmp`
LOCK = ".tl_devinterp.lock"
_UMASK = os.umask(0)
os.umask(_UMASK)


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


def remove_file(path: str | os.PathLike) -> None:
    """Remove `path` (one of our files); already gone is fine, so a resumed cleanup can repeat it."""
    Path(path).unlink(missing_ok=True)


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
