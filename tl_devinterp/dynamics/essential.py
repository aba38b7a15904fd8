"""Essential dynamics: the training trajectory in function space, reduced by PCA, and where it turns.

Each checkpoint's model is summarised by a functional proxy evaluated on a fixed input set (default: the
logit of the true next token at one fixed position per sequence), giving a row of the matrix X
(checkpoints × features). Centred PCA of X gives the trajectory's principal components; each is smoothed
over checkpoints with a Gaussian, and every pair of components is a 2-D curve whose osculating circles,
evolute and cusps `geometry` computes. A cusp that recurs at the same checkpoint in several PC pairs marks a
turn of the whole trajectory, a candidate stage boundary.

Memory stays bounded however many checkpoints there are: one model is loaded at a time, each row of X is
written to a float32 `np.memmap` on disk, and the PCA comes from the T × T Gram matrix of the centred rows,
accumulated over column chunks of X and eigendecomposed. That is the exact PCA (unlike IncrementalPCA,
which approximates it batch by batch) and needs O(T² + T·chunk) memory: T is the number of checkpoints,
the small side of X.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int

from ..data import token_tensor
from ..errors import InvalidValueError
from ..files import fingerprint
from ..runner import map_series
from ..store import ResultStore, callable_key
from .geometry import curvature_extrema, osculating_circles

PROXIES = ("true_logit", "outputs")
GRAM_CHUNK_BYTES = 32 * 2**20  # float64 bytes of X read at once while forming the Gram matrix


@dataclass
class EDResult:
    """Essential dynamics of one series; arrays are indexed by checkpoint (T) and PC pair (P)."""

    steps: Int[np.ndarray, "T"]
    scores: Float[np.ndarray, "T k"]  # PC scores of each checkpoint
    explained_variance_ratio: Float[np.ndarray, "k"]
    smoothed: Float[np.ndarray, "T k"]  # scores after Gaussian smoothing over checkpoints
    sigma: Float[np.ndarray, "T"]  # smoothing width (in checkpoints) used at each checkpoint
    pairs: list[tuple[int, int]]  # PC pairs (0-based), one per curve
    curvature: Float[np.ndarray, "P T"]
    radius: Float[np.ndarray, "P T"]
    centres: Float[np.ndarray, "P T 2"]  # the evolute of each pair's curve
    cusps: list[np.ndarray]  # per pair, the steps of its evolute's cusps
    consistent_cusps: Int[np.ndarray, "C"]  # steps where cusps recur in >= min_pairs PC pairs
    proxy_mean: Float[np.ndarray, "T"] = field(default_factory=lambda: np.array([]))  # mean feature per step

    def frame(self) -> pd.DataFrame:
        """Tidy table: one row per (PC pair, checkpoint) with the raw and smoothed point, curvature, radius,
        centre, and whether the checkpoint is a cusp of that pair / a consistent cusp."""
        rows = []
        consistent = np.isin(self.steps, self.consistent_cusps)
        for p, (i, j) in enumerate(self.pairs):
            rows.append(pd.DataFrame({
                "step": self.steps, "pc_x": i + 1, "pc_y": j + 1,
                "x": self.scores[:, i], "y": self.scores[:, j],
                "smoothed_x": self.smoothed[:, i], "smoothed_y": self.smoothed[:, j],
                "curvature": self.curvature[p], "radius": self.radius[p],
                "centre_x": self.centres[p, :, 0], "centre_y": self.centres[p, :, 1],
                "cusp": np.isin(self.steps, self.cusps[p]), "consistent_cusp": consistent,
            }))
        return pd.concat(rows, ignore_index=True)



# --------------------------------------------------------------------------------------------------
# Features: one row of X per checkpoint, streamed to disk.


def fixed_positions(
    n_seqs: int, seq_len: int, position: int | Sequence[int] | None, *, seed: int = 0
) -> Int[np.ndarray, "n_seqs"]:
    """The position read in each sequence: `position` (an int, negative counting from the end, or one per
    sequence), or with None one drawn uniformly per sequence with `seed`. A position p predicts token p+1,
    so p must lie in [0, seq_len - 2]."""
    if position is None:
        return np.random.default_rng(seed).integers(0, seq_len - 1, size=n_seqs)
    pos = np.broadcast_to(np.asarray(position, dtype=int), (n_seqs,)).copy() if np.ndim(position) == 0 \
        else np.asarray(position, dtype=int)
    if pos.shape != (n_seqs,):
        raise InvalidValueError(f"position must be an int or one int per sequence ({n_seqs}); got shape {pos.shape}.")
    pos = np.where(pos < 0, pos + seq_len, pos)
    if (pos < 0).any() or (pos > seq_len - 2).any():
        raise InvalidValueError(
            f"position must lie in [0, {seq_len - 2}] (or [-{seq_len}, -2]) so that a next token exists "
            f"in sequences of length {seq_len}; got {position}."
        )
    return pos


def _proxy_features(proxy, tokens: torch.Tensor, pos: np.ndarray, batch_size: int, device) -> Callable:
    """`features(model) -> np.ndarray [F]` for the chosen proxy (a partial of module-level functions, so that
    it pickles for parallel jobs)."""
    if callable(proxy):
        return partial(_called_proxy, proxy, tokens, device)
    if proxy not in PROXIES:
        raise InvalidValueError(f"proxy must be one of {PROXIES} or a callable(model, inputs) -> features; got {proxy!r}.")
    return partial(_logit_features, proxy, tokens, torch.as_tensor(pos), batch_size, device)


@torch.no_grad()
def _called_proxy(proxy: Callable, inputs, device, model) -> np.ndarray:
    moved = inputs.to(device) if isinstance(inputs, torch.Tensor) else tuple(t.to(device) for t in inputs)
    return torch.as_tensor(proxy(model, moved)).detach().float().cpu().numpy().ravel()


@torch.no_grad()
def _logit_features(proxy: str, tokens: torch.Tensor, pos_t: torch.Tensor, batch_size: int, device,
                    model) -> np.ndarray:
    out = []
    for b in range(0, len(tokens), batch_size):
        toks, p = tokens[b : b + batch_size].to(device), pos_t[b : b + batch_size].to(device)
        rows = torch.arange(len(toks), device=device)
        logits = model(toks)[rows, p]  # [batch, vocab] at each sequence's position
        out.append(logits[rows, toks[rows, p + 1]] if proxy == "true_logit" else logits)
    return torch.cat(out).float().cpu().numpy().ravel()


def _feature_row(features: Callable, step: int, model) -> tuple[pd.DataFrame, np.ndarray]:
    """One checkpoint's features, kept by the store beside its row (a module-level function, so jobs pickle)."""
    f = features(model)
    return pd.DataFrame({"proxy_mean": [f.mean()]}), f


def _stream_features(series, steps, features: Callable, path: Path, device, store: ResultStore,
                     executor: Executor | None, progress: bool) -> tuple[np.memmap, np.ndarray]:
    """Write features(model) of each checkpoint as one row of a float32 memmap at `path`.

    Each row is first saved per step in `store`, and rows saved by an earlier run are read back instead of
    recomputed; the memmap is then filled from the store, one row in memory at a time.
    """
    map_series(series, partial(_feature_row, features), steps=steps, store=store, desc="essential dynamics",
               executor=executor, device=device, progress=progress)
    X: np.memmap | None = None
    means = np.empty(len(steps))
    for i, step in enumerate(steps):
        f = store.load_array(step, series.fingerprint(step))
        if X is None:
            X = np.memmap(path, dtype=np.float32, mode="w+", shape=(len(steps), f.size))
        elif f.size != X.shape[1]:
            raise InvalidValueError(f"The proxy gave {f.size} features at step {step} but {X.shape[1]} before; "
                                    f"it must give the same number at every checkpoint.")
        X[i], means[i] = f, f.mean()
    X.flush()
    return X, means


def gram_pca(
    X: Float[np.ndarray, "T F"], n_components: int
) -> tuple[Float[np.ndarray, "T k"], Float[np.ndarray, "k"]]:
    """Scores and explained-variance ratios of the centred PCA of X, from its T × T Gram matrix.

    X is read in column chunks (it may be a disk memmap). Each score column is signed so the trajectory
    moves in its positive direction from the first to the last checkpoint.
    """
    T, F = X.shape
    chunk = max(1, GRAM_CHUNK_BYTES // (8 * T))
    G = np.zeros((T, T))
    for a in range(0, F, chunk):
        block = np.asarray(X[:, a : a + chunk], dtype=np.float64)
        block -= block.mean(0)
        G += block @ block.T
        del block  # free it before the next chunk is read, so one chunk is in memory at a time
    evals, evecs = np.linalg.eigh(G)
    order = np.argsort(evals)[::-1][:n_components]
    evals, evecs = np.clip(evals[order], 0, None), evecs[:, order]
    scores = evecs * np.sqrt(evals)
    scores *= np.where(scores[-1] >= scores[0], 1.0, -1.0)
    total = np.trace(G)
    return scores, evals / total if total > 0 else np.zeros_like(evals)


# --------------------------------------------------------------------------------------------------
# Smoothing and cusps.


def sigma_per_index(sigma: float | Sequence[float] | Callable, T: int) -> Float[np.ndarray, "T"]:
    """σ at each of T indices: a scalar, an array of length T, or a function of the index array."""
    s = sigma(np.arange(T)) if callable(sigma) else sigma
    s = np.broadcast_to(np.asarray(s, dtype=float), (T,)) if np.ndim(s) == 0 else np.asarray(s, dtype=float)
    if s.shape != (T,):
        raise InvalidValueError(f"sigma must be a scalar, {T} values (one per checkpoint) or a function of the index; "
                                f"got shape {s.shape}.")
    if not np.isfinite(s).all() or (s < 0).any():
        raise InvalidValueError("sigma must be finite and >= 0 everywhere.")
    return s.copy()


def gaussian_smooth(
    y: Float[np.ndarray, "T *rest"], sigma: float | Sequence[float] | Callable
) -> Float[np.ndarray, "T *rest"]:
    """Gaussian kernel average along axis 0 with a width σ_t (in indices) that may vary with the index t.

    Output t is Σ_s w_ts y_s / Σ_s w_ts with w_ts = exp(−(s − t)² / 2σ_t²): the kernel is cut at the ends and
    renormalised (no reflected or padded values); σ_t = 0 leaves y_t as it is.
    """
    y = np.asarray(y, dtype=float)
    s = sigma_per_index(sigma, len(y))
    idx = np.arange(len(y))
    d2 = (idx[None, :] - idx[:, None]) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        W = np.exp(-d2 / (2 * s[:, None] ** 2))
    W[s == 0] = np.eye(len(y))[s == 0]
    W /= W.sum(1, keepdims=True)
    return np.tensordot(W, y, axes=1)


def consistent_cusps(cusps: Sequence[np.ndarray], *, window: int = 2, min_pairs: int) -> np.ndarray:
    """Indices where cusps of at least `min_pairs` different curves fall within ±`window` indices.

    Cusps that qualify and lie within `window` of each other form one event, reported at the median index
    of its cusps (rounded down).
    """
    pool = sorted((int(t), p) for p, c in enumerate(cusps) for t in c)
    good = [t for t, _ in pool if len({p for u, p in pool if abs(u - t) <= window}) >= min_pairs]
    events: list[list[int]] = []
    for t in good:
        if events and t - events[-1][-1] <= window:
            events[-1].append(t)
        else:
            events.append([t])
    return np.array([int(np.median(e)) if len(e) % 2 else e[len(e) // 2 - 1] for e in events], dtype=int)


def _pair_cusps(smoothed: np.ndarray, pairs, min_prominence: float):
    circles = [osculating_circles(smoothed[:, [i, j]]) for i, j in pairs]
    return circles, [curvature_extrema(c.signed_curvature, min_prominence=min_prominence) for c in circles]


def essential_dynamics_of_features(
    X: Float[np.ndarray, "T F"],
    steps: Sequence[int] | None = None,
    *,
    n_components: int = 3,
    sigma: float | Sequence[float] | Callable | None = None,
    min_prominence: float = 0.5,
    window: int | None = None,
    min_pairs: int | None = None,
    persistence: float | None = 2.0,
    proxy_mean: np.ndarray | None = None,
) -> EDResult:
    """Essential dynamics of a ready feature matrix (rows: checkpoints in training order).

    PCA to `n_components`; Gaussian smoothing with `sigma` (in checkpoints: a scalar, one per checkpoint, or
    a function of the index; default max(2, T/60), a width that grows with the series so that a random walk's
    slow ends do not read as turns); per PC pair the osculating circles and the evolute cusps (extrema of the signed
    curvature with prominence >= `min_prominence` × its 5-95 percentile spread, see `geometry`).

    A cusp is consistent when (1) cusps of at least `min_pairs` PC pairs (default: all pairs) fall within
    ±`window` checkpoints of it (default: the median σ rounded up, at least 2), and (2) it persists at the
    coarser scale `persistence` × σ: a consistent cusp, found the same way, lies within `persistence` ×
    `window` there (None turns this off). Noise makes turns at every scale, at places that move as the
    smoothing changes; a real turn of the trajectory stays put. Measured with the defaults on Gaussian random
    walks (200 checkpoints × 1000 dims, 100 × 300, 60 × 300; 16 seeds each): a consistent cusp in 0, 2 and 1
    seeds (with all pairs but no persistence: 10 of 16 at 200 × 1000); a corner planted in such a walk where the
    trajectory turns in all three PCs is found every time. A turn confined to one plane (a rank-2 path, PC3
    noise) does not bend the PC1-PC3 curve, so it needs `min_pairs=2`, at a false-alarm rate of about half
    the random walks.
    """
    T = X.shape[0]
    steps = np.arange(T) if steps is None else np.asarray(steps, dtype=int)
    if X.ndim != 2 or steps.shape != (T,):
        raise InvalidValueError(f"X must be [checkpoints, features] with one step per row; got X {X.shape}, "
                                f"steps {steps.shape}.")
    if not 2 <= n_components <= T - 1:
        raise InvalidValueError(f"n_components must be between 2 (one PC pair) and T - 1 = {T - 1} (the rank of "
                                f"{T} centred checkpoints); got {n_components}.")
    pairs = list(itertools.combinations(range(n_components), 2))
    min_pairs = len(pairs) if min_pairs is None else min_pairs
    if not 1 <= min_pairs <= len(pairs):
        raise InvalidValueError(f"min_pairs must be between 1 and the number of PC pairs ({len(pairs)}); got {min_pairs}.")
    if persistence is not None and persistence < 1:
        raise InvalidValueError(f"persistence is a smoothing scale factor >= 1 (or None); got {persistence}.")
    scores, evr = gram_pca(X, n_components)
    s = sigma_per_index(max(2.0, T / 60) if sigma is None else sigma, T)
    window = max(2, int(np.ceil(np.median(s)))) if window is None else int(window)
    smoothed = gaussian_smooth(scores, s)
    circles, cusp_idx = _pair_cusps(smoothed, pairs, min_prominence)
    events = consistent_cusps(cusp_idx, window=window, min_pairs=min_pairs)
    if persistence is not None and len(events):
        coarse = consistent_cusps(_pair_cusps(gaussian_smooth(scores, persistence * s), pairs, min_prominence)[1],
                                  window=int(np.ceil(persistence * window)), min_pairs=min_pairs)
        events = np.array([t for t in events if len(coarse) and np.abs(coarse - t).min() <= persistence * window],
                          dtype=int)
    return EDResult(
        steps=steps, scores=scores, explained_variance_ratio=evr, smoothed=smoothed, sigma=s, pairs=pairs,
        curvature=np.stack([c.curvature for c in circles]), radius=np.stack([c.radius for c in circles]),
        centres=np.stack([c.centre for c in circles]), cusps=[steps[c] for c in cusp_idx],
        consistent_cusps=steps[events],
        proxy_mean=np.full(T, np.nan) if proxy_mean is None else np.asarray(proxy_mean, dtype=float),
    )


def essential_dynamics(
    series,
    inputs,
    *,
    n_components: int = 3,
    proxy: str | Callable = "true_logit",
    position: int | Sequence[int] | None = None,
    sigma: float | Sequence[float] | Callable | None = None,
    min_prominence: float = 0.5,
    window: int | None = None,
    min_pairs: int | None = None,
    persistence: float | None = 2.0,
    batch_size: int = 64,
    steps: Sequence[int] | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    features_dir: str | os.PathLike | None = None,
    store_dir: str | os.PathLike | None = None,
    executor: Executor | None = None,
    progress: bool = True,
    key: str | None = None,
) -> EDResult:
    """Essential dynamics of a checkpoint series on a fixed input set.

    `inputs`: token tensor `[n, seq]` or a dataset with `input_ids`, or with a callable proxy any tensor or
    tuple of tensors it reads (a task's probes, `tl_devinterp.tasks`). `proxy`: "true_logit" (the logit of the
    true next token at one fixed position per sequence; `position` as in `fixed_positions`, default one
    random position per sequence drawn with `seed`), "outputs" (all logits at that position, flattened), or
    `callable(model, inputs) -> tensor` (flattened). Features go to `features_dir/features.f32` (kept) or a
    temporary file (deleted). With `store_dir`, each checkpoint's features are saved as it finishes and a
    rerun reads them back; a callable proxy is keyed by its module-level name and code, or by `key=` (needed
    for a lambda or closure, which is otherwise refused). With an `executor`, the checkpoints' features are parallel jobs (see
    `tl_devinterp.parallel`). The rest is `essential_dynamics_of_features`.
    """
    if batch_size < 1:
        raise InvalidValueError(f"batch_size must be >= 1, got {batch_size}.")
    steps = list(series.steps if steps is None else steps)
    if callable(proxy) and (isinstance(inputs, tuple) or (isinstance(inputs, torch.Tensor) and inputs.is_floating_point())):
        tokens, pos = inputs, np.zeros(0, dtype=int)  # a task's probes: the proxy reads them as they are
        features = partial(_called_proxy, proxy, inputs, device)
    else:
        tokens = token_tensor(inputs)
        if tokens.ndim != 2 or tokens.shape[1] < 2:
            raise InvalidValueError(f"inputs must be token sequences [n, seq] with seq >= 2; got shape {tuple(tokens.shape)}.")
        pos = fixed_positions(len(tokens), tokens.shape[1], position, seed=seed)
        features = _proxy_features(proxy, tokens, pos, batch_size, device)
    name = proxy if isinstance(proxy, str) and key is None else (
        callable_key(proxy, key=key, option="proxy") if store_dir is not None else "unstored")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp if features_dir is None else features_dir)
        folder.mkdir(parents=True, exist_ok=True)
        store = ResultStore(tmp if store_dir is None else store_dir, "ed-features",
                            {"proxy": name, "inputs": fingerprint(*(tokens if isinstance(tokens, tuple) else (tokens,)),
                                                                   pos)})
        X, means = _stream_features(series, steps, features, folder / "features.f32", device, store, executor,
                                    progress)
        result = essential_dynamics_of_features(
            X, steps, n_components=n_components, sigma=sigma, min_prominence=min_prominence, window=window,
            min_pairs=min_pairs, persistence=persistence, proxy_mean=means,
        )
        del X
    return result
