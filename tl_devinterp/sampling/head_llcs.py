"""Per-head LLCs of every attention head at once (the rLLC of Wang et al.), sharing one pass over the data.

All heads and chains see the same batch at each step, so batches are drawn once and each batch's
checkpoint loss is computed once for every head; each head's chains move only that head's W_Q, W_K, W_V,
W_O and biases (under grouped-query attention, with its group's K/V: see `LLCResult.note`). The chains of
all heads of a layer run stacked in one batched forward+backward (`SGLDConfig.max_batched` at a time), from
the residual stream below the layer where the model can start there.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
from torch import nn

from ..models import all_heads, check_model, parse_heads
from .llc import LLCResult, sample_llcs
from .restrict import resolve_restriction
from .settings import SGLDConfig


def estimate_head_llcs(model: nn.Module, data, config: SGLDConfig | None = None, *,
                       heads: list[tuple[int, int] | str] | None = None, loss_fn: Callable | None = None,
                       progress: bool = True, **options) -> pd.DataFrame:
    """One row per head (all heads by default): `layer, head, llc_mean, llc_std, llc_se, d, init_loss`
    and the sampler diagnostics (`loss_increase, distance, prior_radius, likelihood_fraction, acceptance,
    regime`), the `forward` that ran and the head's `note`. Each row equals `estimate_llc(model, data, config, restrict=(layer, head))`.
    """
    check_model(model)
    config = SGLDConfig.build(config, **options)
    heads = all_heads(model) if heads is None else parse_heads(heads)
    results = sample_llcs(model, data, [resolve_restriction(model, head) for head in heads], config, loss_fn=loss_fn,
                          desc=f"LLC ({len(heads)} heads)", progress=progress)
    return pd.DataFrame([dict(layer=layer, head=h, **summary(r)) for (layer, h), r in zip(heads, results, strict=True)])


def summary(result: LLCResult) -> dict:
    """The columns a results table keeps of one estimate: the LLC, its diagnostics, the forward that ran
    ("fast", or why the model's own) and the restriction's note (e.g. a GQA head's shared K/V; "none": nothing
    to say, so a stored table reads back as written)."""
    return dict(llc_mean=result.mean, llc_std=result.std, llc_se=result.se, d=result.d, init_loss=result.init_loss,
                **result.diagnostics.as_row(), forward=result.forward, note=result.note or "none")
