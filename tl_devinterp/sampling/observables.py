"""Observables: quantities evaluated at the posterior draws of SGLD, and their posterior moments.

An observable is either a callable `f(model) -> tensor` (evaluated with the draw's weights through the
same functional call the sampler uses, so the model itself is never modified), or an evaluation dataset,
whose per-item losses are recorded: per token ([N, seq−1]) for a TransformerLens model with the LM loss,
per row ([N]) otherwise. A padded dataset's padding (attention_mask 0, labels -100) records 0, a constant. Each observable's trace is an array [chains, draws, *shape] over the thinned
draws (`SGLDConfig.draws_every`); traces beyond `memory_limit` bytes live in a numpy memmap on disk.

Posterior moments pool the chains: each chain's covariance over its draws (ddof=1) is averaged over
chains, and the spread across chains gives a standard error.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from torch import nn

from ..errors import InvalidTypeError, InvalidValueError
from ..models import is_supported_model, model_device, sampled_parameters, token_cross_entropy
from .batches import as_tensors, batch_stream, lm_batch
from .llc import LLCResult, sample_llcs
from .objective import Objective, choose_forward, resolve_loss
from .restrict import Restriction, resolve_restriction
from .settings import SGLDConfig

MEMORY_LIMIT = 2**28
"""Bytes of traces kept in memory (256 MiB); larger traces go to a memmap on disk."""


@dataclass
class ObservableTraces:
    """The observables at the draws of one restriction's chains: name -> [chains, draws, *shape]."""

    traces: dict[str, np.ndarray]
    llc: LLCResult  # the run's LLC estimate and settings
    restrict: str = "all"
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def mean(self, name: str) -> np.ndarray:
        """The posterior expectation E[f(w)], shape of one evaluation."""
        return np.asarray(self.traces[name].mean(axis=(0, 1), dtype=np.float64))

    def cov(self, a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
        """Cov[f_a(w), f_b(w)] over the flattened entries of a and b, and its standard error: [a, b] each."""
        return posterior_covariance(self.traces[a], self.traces[b])


def posterior_covariance(x: Float[np.ndarray, "chains draws ..."], y: Float[np.ndarray, "chains draws ..."],
                         chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Posterior covariance of every entry of x with every entry of y: ([m, k], its standard error), with
    m, k the flattened trailing sizes. Per chain over draws (ddof=1), then the mean and SE over chains;
    x is read `chunk` entries at a time, so it may be a memmap larger than memory."""
    chains, draws = x.shape[:2]
    if y.shape[:2] != (chains, draws) or draws < 2:
        raise InvalidValueError(f"Traces of shapes {x.shape} and {y.shape} need the same [chains, draws >= 2] leading shape.")
    x, y = x.reshape(chains, draws, -1), y.reshape(chains, draws, -1)
    yc = [y[c].astype(np.float64) - y[c].mean(0, dtype=np.float64) for c in range(chains)]
    cov = np.empty((x.shape[2], y.shape[2]))
    se = np.empty_like(cov)
    for lo in range(0, x.shape[2], chunk):
        per_chain = []
        for c in range(chains):
            xc = np.asarray(x[c, :, lo:lo + chunk], dtype=np.float64)
            per_chain.append((xc - xc.mean(0)).T @ yc[c] / (draws - 1))  # this chain's covariance
        per_chain = np.stack(per_chain)
        cov[lo:lo + chunk] = per_chain.mean(0)
        se[lo:lo + chunk] = per_chain.std(0, ddof=1) / math.sqrt(chains) if chains > 1 else np.nan
    return cov, se


def sample_observables(model: nn.Module, data, observables: dict[str, Callable | object], config: SGLDConfig | None = None,
                       *, restrict=None, loss_fn: Callable | None = None, trace_dir: str | os.PathLike | None = None,
                       memory_limit: int = MEMORY_LIMIT, progress: bool = True, **options) -> ObservableTraces:
    """Sample the posterior around the model's weights on `data` (as `estimate_llc` does, same options)
    and record each observable at every `draws_every`-th draw.

    `observables` maps a name to a callable `f(model) -> tensor` or an evaluation dataset (its per-token
    losses, or per-row losses for a model with its own loss). With `trace_dir`, large traces are kept in
    files there (`<restrict>-<name>.f32`); otherwise in anonymous temporary files freed with the arrays.
    """
    config = SGLDConfig.build(config, **options)
    return sample_traces(model, data, [resolve_restriction(model, restrict)], observables, config, loss_fn=loss_fn,
                         trace_dir=trace_dir, memory_limit=memory_limit, desc="observables", progress=progress)[0]


def sample_traces(model: nn.Module, data, restrictions: list[Restriction], observables: dict, config: SGLDConfig, *,
                  loss_fn: Callable | None = None, trace_dir=None, memory_limit: int = MEMORY_LIMIT,
                  desc: str = "observables", progress: bool = True) -> list[ObservableTraces]:
    """`sample_observables` for several restrictions in one pass (shared batches, as `sample_llcs`)."""
    if not observables:
        raise InvalidValueError("observables is empty: pass a dict name -> callable f(model) or evaluation dataset.")
    config = config.resolve(data)
    device = model_device(model)
    sampling = choose_forward(model, loss_fn, config, next(batch_stream(data, config.batch_size, config.seed, device))[1])
    evaluate = {name: _evaluator(model, obs, loss_fn, config.batch_size, name, sampling[0])
                for name, obs in observables.items()}
    at_star = {n: p.detach() for n, p in sampled_parameters(model).items()}
    with torch.no_grad():
        shapes = {name: tuple(f(at_star).shape) for name, f in evaluate.items()}
    draws = len(range(0, config.num_draws, config.draws_every))
    budget = [memory_limit]
    traces = [{name: _allocate((config.num_chains, draws, *shape), budget, trace_dir, f"{r.label}-{name}")
               for name, shape in shapes.items()} for r in restrictions]

    def observe(r: int, c: int, k: int, values: dict[str, torch.Tensor]) -> None:
        for name, f in evaluate.items():
            traces[r][name][c, k] = f(values).float().cpu().numpy()

    results = sample_llcs(model, data, restrictions, config, loss_fn=loss_fn, desc=desc, progress=progress, observe=observe,
                          sampling_forward=sampling)
    return [ObservableTraces(t, res, r.label, shapes) for t, res, r in zip(traces, results, restrictions, strict=True)]


def _evaluator(model: nn.Module, observable, loss_fn: Callable | None, batch_size: int, name: str,
               forward: Callable | None = None):
    """`f(values) -> tensor`: the observable at the weights `values` (canonical name -> tensor); per-token
    losses through `forward` (the sampler's fast forward) where given."""
    if callable(observable) and not isinstance(observable, (torch.Tensor, torch.utils.data.DataLoader)):
        target = Objective(model, lambda m, _: observable(m))
        return lambda values: torch.as_tensor(target.at(values, None))
    try:
        rows = as_tensors(observable)
    except TypeError as e:
        raise InvalidTypeError(f"observables[{name!r}] is neither a callable f(model) nor a dataset: {e}") from None
    if isinstance(rows, torch.utils.data.DataLoader):
        raise InvalidTypeError(f"observables[{name!r}] is a DataLoader: pass its tensors, so each draw sees the same items.")
    device = model_device(model)
    if isinstance(rows, dict):  # Hugging Face's form: padding (attention_mask 0, labels -100) contributes 0
        rows = {k: t.to(device) for k, t in rows.items()}
        n, tokens, keep = len(rows["input_ids"]), *lm_batch(rows)
        row = lambda i, j: {k: t[i:j] for k, t in rows.items()}  # noqa: E731
    else:
        rows = tuple(t.to(device) for t in rows)
        n, tokens, keep = len(rows[0]), rows[0], None
        row = lambda i, j: rows[0][i:j] if len(rows) == 1 else tuple(t[i:j] for t in rows)  # noqa: E731
    if loss_fn is None and is_supported_model(model):  # per-token next-token losses
        target = Objective(model, lambda m, toks: token_cross_entropy(forward(toks) if forward else m(toks), toks))
        counted = (lambda losses: losses) if keep is None else (lambda losses: torch.where(keep, losses, 0.0))
        return lambda values: counted(torch.cat([target.at(values, tokens[i:i + batch_size])
                                                 for i in range(0, n, batch_size)]))
    target = Objective(model, resolve_loss(model, loss_fn))  # per-row losses of the model's own loss
    return lambda values: torch.stack([target.at(values, row(i, i + 1)) for i in range(n)])


def _allocate(shape: tuple[int, ...], budget: list[int], trace_dir, label: str) -> np.ndarray:
    """A float32 array in memory while the budget lasts, else a memmap on disk."""
    nbytes = 4 * math.prod(shape)
    if nbytes <= budget[0]:
        budget[0] -= nbytes
        return np.zeros(shape, np.float32)
    if trace_dir is None:
        return np.memmap(tempfile.TemporaryFile(), np.float32, "w+", shape=shape)  # unlinked file, freed with the array
    path = Path(trace_dir) / (label.replace("/", "_") + ".f32")
    path.parent.mkdir(parents=True, exist_ok=True)
    return np.memmap(path, np.float32, "w+", shape=shape)
