"""LLCs over a checkpoint series (whole model, optionally every head), resumable through a ResultStore."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Executor
from functools import partial

import pandas as pd
import torch

from ..errors import InvalidValueError
from ..models import all_heads, parse_heads
from ..results import HEAD, MODEL
from ..runner import map_series
from ..store import ResultStore, callable_key
from .batches import data_fingerprint
from .head_llcs import summary
from .llc import sample_llcs
from .restrict import resolve_restriction
from .settings import SGLDConfig


def llc_over_series(series, data, config: SGLDConfig | None = None, *,
                    heads: bool | list[tuple[int, int] | str] = False, model: bool = True, store_dir: str | os.PathLike | None = None,
                    steps: list[int] | None = None, loss_fn: Callable | None = None,
                    device: str | torch.device | None = None, progress: bool = True,
                    executor: Executor | None = None, key: str | None = None, **options) -> pd.DataFrame:
    """Tidy frame: `step, scope ("model" | "head"), layer, head, llc_mean, llc_std, llc_se, d, init_loss`
    and the sampler diagnostics (see `estimate_head_llcs`).

    The whole model (unless `model=False`) and the heads of one checkpoint share batches and checkpoint
    losses; a head's numbers do not depend on whether the model is sampled beside it. Each checkpoint
    is loaded (onto `device`), sampled and released before the next. With `store_dir`, each checkpoint is
    saved when done and read back on a rerun with the same settings and data. With an `executor`, the
    checkpoints are parallel jobs (see `tl_devinterp.parallel`), with the same results. A stored result is
    keyed by what `loss_fn` computes: a module-level function by name and code; give any other (a lambda, a
    closure) a `key=` naming it, or it is refused before any sampling.
    """
    config = SGLDConfig.build(config, **options).resolve(data)
    head_spec = heads if isinstance(heads, bool) else parse_heads(heads)
    if not model and not head_spec:
        raise InvalidValueError("llc_over_series with model=False needs heads (True or a list): nothing to sample.")
    compute = partial(_checkpoint_llcs, data=data, config=config, head_spec=head_spec, with_model=model, loss_fn=loss_fn,
                      progress=progress and executor is None)  # one bar per checkpoint, if serial
    store = None
    if store_dir is not None:
        params = dict(config.to_dict(), heads=head_spec, data=data_fingerprint(data),
                      loss_fn=callable_key(loss_fn, key=key), **({} if model else {"model": False}))
        store = ResultStore(store_dir, "llc", params)
    frame = map_series(series, compute, store=store, steps=steps, desc="LLC over checkpoints", executor=executor,
                       device=device, progress=progress)
    return frame.astype({"layer": "Int64", "head": "Int64"})


def _checkpoint_llcs(step: int, model, *, data, config: SGLDConfig, head_spec, with_model: bool, loss_fn,
                     progress: bool) -> pd.DataFrame:
    """One checkpoint's rows: the whole model (if `with_model`), then each head (a module-level function, so
    jobs pickle)."""
    head_list = all_heads(model) if head_spec is True else list(head_spec or [])
    restrictions = [resolve_restriction(model, None)] * with_model + [resolve_restriction(model, h) for h in head_list]
    results = sample_llcs(model, data, restrictions, config, loss_fn=loss_fn, desc=f"step {step}", progress=progress)
    rows = [dict(scope=MODEL, layer=pd.NA, head=pd.NA, **summary(results[0]))] * with_model
    rows += [dict(scope=HEAD, layer=layer, head=h, **summary(r))
             for (layer, h), r in zip(head_list, results[with_model:], strict=True)]
    return pd.DataFrame(rows)
