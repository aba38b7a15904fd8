"""LLCs over a checkpoint series (whole model, optionally every head), resumable through a ResultStore."""

from __future__ import annotations

import os
from collections.abc import Callable

import pandas as pd
import torch

from ..models import all_heads
from ..store import ResultStore, map_series
from .heads import summary
from .llc import DEFAULTS, data_fingerprint, resolve_batching, sample_llcs
from .restrict import resolve_restriction


def llc_over_series(
    series,
    data,
    *,
    heads: bool | list[tuple[int, int]] = False,
    store_dir: str | os.PathLike | None = None,
    steps: list[int] | None = None,
    epsilon: float = DEFAULTS["epsilon"],
    gamma: float = DEFAULTS["gamma"],
    nbeta: float | None = None,
    num_chains: int = DEFAULTS["num_chains"],
    num_draws: int = DEFAULTS["num_draws"],
    num_burnin: int = DEFAULTS["num_burnin"],
    batch_size: int = DEFAULTS["batch_size"],
    loss_fn: Callable | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> pd.DataFrame:
    """Tidy frame: `step, scope ("model" | "head"), layer, head, llc_mean, llc_std, llc_se, d, init_loss`.

    The whole model and the heads of one checkpoint share batches and checkpoint losses. With `store_dir`,
    each checkpoint is saved when done and read back on a rerun with the same hyperparameters and data.
    """
    batch_size, nbeta = resolve_batching(data, batch_size, nbeta)
    hp = dict(epsilon=epsilon, gamma=gamma, nbeta=nbeta, num_chains=num_chains, num_draws=num_draws,
              num_burnin=num_burnin, batch_size=batch_size, seed=seed)

    def compute(step: int, model) -> pd.DataFrame:
        head_list = all_heads(model) if heads is True else list(heads or [])
        restrictions = [resolve_restriction(model, None)] + [resolve_restriction(model, h) for h in head_list]
        results = sample_llcs(model, data, restrictions, loss_fn=loss_fn, device=device, desc=f"step {step}", **hp)
        rows = [dict(scope="model", layer=pd.NA, head=pd.NA, **summary(results[0]))]
        rows += [dict(scope="head", layer=layer, head=h, **summary(r)) for (layer, h), r in zip(head_list, results[1:], strict=True)]
        return pd.DataFrame(rows)

    store = None
    if store_dir is not None:
        key = dict(hp, heads=heads, data=data_fingerprint(data), loss_fn=getattr(loss_fn, "__qualname__", repr(loss_fn)))
        store = ResultStore(store_dir, "llc", key)
    frame = map_series(series, compute, store=store, steps=steps, desc="LLC over checkpoints")
    return frame.astype({"layer": "Int64", "head": "Int64"})
