"""Susceptibilities (Baker et al. 2025): how a component's posterior responds to a shift in the data.

Shift the data distribution q toward q' by h, q_h = (1 − h)·q + h·q', and sample the posterior localised
at w* on a component C (a head, a layer: the other weights held at w*),
p_h(w) ∝ exp(−nβ·L_{q_h}(w) − (γ/2)·‖w − w*‖²). With the component's observable
φ_C(w) = nβ·(L_q(w) − L_q(w*)) (the quantity whose mean is the component's LLC) and the loss shift
ΔL(w) = L_{q'}(w) − L_q(w), the susceptibility is

    χ_C = (1/nβ)·d/dh E_{p_h}[φ_C] at h = 0 = −Cov_{p_0}[φ_C(w), ΔL(w)] = −nβ·Cov[L_q(w), L_{q'}(w) − L_q(w)].

Sign: χ < 0 when moving the data toward q' lowers the component's expected loss increase, i.e. when
the directions in which C raises L_q are also those in which L_{q'} rises faster than L_q (C is more
tightly constrained by q' than by q); χ > 0 in the opposite case. A shift can also be a per-token
weighting ρ of the base data, with L_{q'} = Σ ρ·ℓ / Σ ρ.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Executor
from functools import partial

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..errors import InvalidTypeError, InvalidValueError
from ..files import fingerprint
from ..models import all_heads, is_supported_model, parse_heads
from ..results import HEAD, MODEL
from ..runner import map_series
from ..store import ResultStore, callable_key
from .batches import data_fingerprint
from .observables import MEMORY_LIMIT, ObservableTraces, posterior_covariance, sample_traces
from .restrict import resolve_restriction
from .settings import SGLDConfig


def susceptibilities(model: nn.Module, data, shifts: dict, config: SGLDConfig | None = None, *, restrict=None,
                     heads: bool | list = False, loss_fn: Callable | None = None, trace_dir=None,
                     memory_limit: int = MEMORY_LIMIT, progress: bool = True, **options) -> pd.DataFrame:
    """One row per restriction × shift: `scope, restrict, layer, head, shift, susceptibility, susceptibility_se,
    llc_mean, d` (χ as in the module docstring; SE across chains), and the diagnostics of the restriction's
    chains (`loss_increase, distance, prior_radius, likelihood_fraction, acceptance, regime`): χ is about the
    model only where `regime == "likelihood"`.

    `data` is the base distribution q (sampled, and evaluated at each draw); `shifts` maps a name to the
    shifted data q' (same form as `data`) or to per-token weights of the base data ([N, seq−1], or [N] for a
    model with its own loss). The restrictions: `restrict` (None: the whole model), and with `heads=True`
    every head (or a list of heads) besides; all share one pass over the batches.
    """
    config = SGLDConfig.build(config, **options)
    _check_shifts(shifts)
    specs = [restrict] + ([] if heads is False else all_heads(model) if heads is True else parse_heads(heads))
    restrictions = [resolve_restriction(model, spec) for spec in specs]
    observables = {"base": data} | {f"shift/{name}": q for name, q in shifts.items() if not _is_weighting(q)}
    traces = sample_traces(model, data, restrictions, observables, config, loss_fn=loss_fn, trace_dir=trace_dir,
                           memory_limit=memory_limit, desc=f"susceptibilities ({len(restrictions)} restrictions)", progress=progress)
    rows = []
    for i, (spec, t) in enumerate(zip(specs, traces, strict=True)):
        head = (None, None) if i == 0 else spec
        for name, q in shifts.items():
            chi, se = susceptibility(t, q if _is_weighting(q) else f"shift/{name}")
            rows.append(dict(scope=MODEL if i == 0 else HEAD, restrict=t.restrict,
                             layer=pd.NA if head[0] is None else head[0], head=pd.NA if head[1] is None else head[1],
                             shift=name, susceptibility=chi, susceptibility_se=se, llc_mean=t.llc.mean, d=t.llc.d,
                             **t.llc.diagnostics.as_row()))
    return pd.DataFrame(rows).astype({"layer": "Int64", "head": "Int64"})


def susceptibility(traces: ObservableTraces, shift: str | torch.Tensor | np.ndarray) -> tuple[float, float]:
    """χ = −Cov[nβ·L_q(w), L_{q'}(w) − L_q(w)] and its SE, from traces with the base losses under "base" and
    the shift either a trace name (its mean loss is L_{q'}) or per-item weights of the base losses."""
    base = _mean_loss(traces.traces["base"])
    if isinstance(shift, str):
        shifted = _mean_loss(traces.traces[shift])
    else:
        weights = np.asarray(shift, dtype=np.float64)
        if weights.shape != traces.shapes["base"]:
            raise InvalidValueError(f"Shift weights of shape {weights.shape} do not match the base losses {traces.shapes['base']}.")
        shifted = _mean_loss(traces.traces["base"], weights / weights.sum())
    cov, se = posterior_covariance(traces.llc.config.nbeta * base[..., None], (shifted - base)[..., None])
    return -float(cov[0, 0]), float(se[0, 0])


def _mean_loss(trace: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """[chains, draws]: the mean (or ρ-weighted) loss over the items, read one chain at a time."""
    flat = trace.reshape(*trace.shape[:2], -1)
    if weights is None:
        return np.stack([np.asarray(flat[c], dtype=np.float64).mean(1) for c in range(len(flat))])
    return np.stack([np.asarray(flat[c], dtype=np.float64) @ weights.ravel() for c in range(len(flat))])


def _is_weighting(q) -> bool:
    """Float weights over the base items (token data is integer)."""
    return isinstance(q, (torch.Tensor, np.ndarray)) and np.issubdtype(np.asarray(q).dtype, np.floating)


def _check_shifts(shifts) -> None:
    if not isinstance(shifts, dict) or not shifts:
        raise InvalidTypeError(f"shifts must be a non-empty dict name -> shifted data or token weights, got {type(shifts).__name__}.")
    for name, q in shifts.items():
        if _is_weighting(q) and (np.asarray(q) < 0).any():
            raise InvalidValueError(f"shifts[{name!r}]: token weights must be >= 0.")


def susceptibilities_over_series(series, data, shifts: dict, config: SGLDConfig | None = None, *,
                                 heads: bool | list = True, store_dir: str | os.PathLike | None = None,
                                 steps: list[int] | None = None, loss_fn: Callable | None = None,
                                 device: str | torch.device | None = None, progress: bool = True,
                                 executor: Executor | None = None, key: str | None = None,
                                 **options) -> pd.DataFrame:
    """`susceptibilities` of the whole model and each head (all by default) at every checkpoint: the frame
    with a `step` column first; resumable through a ResultStore with `store_dir` (a `loss_fn` that is not a
    module-level function needs a `key=` naming it, as in `llc_over_series`). The run options (`executor`,
    `device`, `progress`) are those of every pass over a series (`runner.map_series`)."""
    config = SGLDConfig.build(config, **options).resolve(data)
    _check_shifts(shifts)
    head_spec = heads if isinstance(heads, bool) else parse_heads(heads)

    compute = partial(_checkpoint_susceptibilities, data=data, shifts=shifts, config=config, head_spec=head_spec,
                      loss_fn=loss_fn, progress=progress and executor is None)  # one bar per checkpoint, if serial
    store = None
    if store_dir is not None:
        params = dict(config.to_dict(), heads=head_spec, data=data_fingerprint(data),
                      shifts={n: fingerprint(q) if _is_weighting(q) else data_fingerprint(q) for n, q in shifts.items()},
                      loss_fn=callable_key(loss_fn, key=key))
        store = ResultStore(store_dir, "susceptibility", params)
    frame = map_series(series, compute, store=store, steps=steps, desc="susceptibilities over checkpoints",
                       executor=executor, device=device, progress=progress)
    return frame.astype({"layer": "Int64", "head": "Int64"})


def _checkpoint_susceptibilities(step: int, model, *, data, shifts, config, head_spec, loss_fn,
                                 progress: bool) -> pd.DataFrame:
    """One checkpoint's rows (a module-level function, so jobs pickle)."""
    return susceptibilities(model, data, shifts, config, heads=head_spec if is_supported_model(model) else False,
                            loss_fn=loss_fn, progress=progress)

