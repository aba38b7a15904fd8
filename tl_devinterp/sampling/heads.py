"""Per-head LLCs of every attention head at once (the rLLC of Wang et al.), sharing one pass over the data.

All heads and chains see the same batch at each step, so batches are drawn once and each batch's
checkpoint loss is computed once for every head; each head's chains move only that head's W_Q, W_K, W_V,
W_O, b_Q, b_K, b_V, and no other parameter computes a gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import torch
from torch import nn

from ..models import all_heads, check_model
from .llc import DEFAULTS, LLCResult, sample_llcs
from .restrict import resolve_restriction


def estimate_head_llcs(
    model: nn.Module,
    data,
    *,
    heads: list[tuple[int, int]] | None = None,
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
    """One row per head (all heads by default): `layer, head, llc_mean, llc_std, llc_se, d, init_loss`.

    Each row equals `estimate_llc(model, data, restrict=(layer, head), ...)` with the same seed.
    """
    check_model(model)
    heads = all_heads(model) if heads is None else list(heads)
    results = sample_llcs(
        model, data, [resolve_restriction(model, head) for head in heads], epsilon=epsilon, gamma=gamma,
        nbeta=nbeta, num_chains=num_chains, num_draws=num_draws, num_burnin=num_burnin, batch_size=batch_size,
        loss_fn=loss_fn, seed=seed, device=device, desc=f"LLC ({len(heads)} heads)",
    )
    return pd.DataFrame([dict(layer=layer, head=h, **summary(r)) for (layer, h), r in zip(heads, results, strict=True)])


def summary(result: LLCResult) -> dict:
    """The columns a results table keeps of one estimate."""
    return dict(llc_mean=result.mean, llc_std=result.std, llc_se=result.se, d=result.d, init_loss=result.init_loss)
