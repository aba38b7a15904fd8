"""LLCs over a checkpoint series (whole model, optionally every head), resumable through a ResultStore."""

from __future__ import annotations

import os
from collections.abc import Callable

import pandas as pd
import torch

from ..models import all_heads
from ..store import ResultStore, map_series
from .batches import data_fingerprint
from .heads import _head_list, summary
from .llc import SGLDConfig, sample_llcs
from .restrict import resolve_restriction


def llc_over_series(series, data, config: SGLDConfig | None = None, *,
                    heads: bool | list[tuple[int, int] | str] = False, store_dir: str | os.PathLike | None = None,
                    steps: list[int] | None = None, loss_fn: Callable | None = None,
                    device: str | torch.device | None = None, progress: bool = True, **options) -> pd.DataFrame:
    """Tidy frame: `step, scope ("model" | "head"), layer, head, llc_mean, llc_std, llc_se, d, init_loss`
    and the sampler diagnostics (see `estimate_head_llcs`).

    The whole model and the heads of one checkpoint share batches and checkpoint losses. Each checkpoint
    is loaded (onto `device`), sampled and released before the next. With `store_dir`, each checkpoint is
    saved when done and read back on a rerun with the same settings and data.
    """
    config = SGLDConfig.build(config, **options).resolve(data)
    head_spec = heads if isinstance(heads, bool) else _head_list(heads)

    def compute(step: int, model) -> pd.DataFrame:
        if device is not None:
            model = model.to(device)
        head_list = all_heads(model) if head_spec is True else list(head_spec or [])
        restrictions = [resolve_restriction(model, None)] + [resolve_restriction(model, h) for h in head_list]
        results = sample_llcs(model, data, restrictions, config, loss_fn=loss_fn, desc=f"step {step}", progress=progress)
        rows = [dict(scope="model", layer=pd.NA, head=pd.NA, **summary(results[0]))]
        rows += [dict(scope="head", layer=layer, head=h, **summary(r)) for (layer, h), r in zip(head_list, results[1:], strict=True)]
        return pd.DataFrame(rows)

    store = None
    if store_dir is not None:
        key = dict(config.to_dict(), heads=head_spec, data=data_fingerprint(data),
                   loss_fn=getattr(loss_fn, "__qualname__", repr(loss_fn)))
        store = ResultStore(store_dir, "llc", key)
    frame = map_series(series, compute, store=store, steps=steps, desc="LLC over checkpoints", progress=progress)
    return frame.astype({"layer": "Int64", "head": "Int64"})
