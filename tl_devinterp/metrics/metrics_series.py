"""Head scores and behavioural metrics at every checkpoint of a series, as one tidy frame, resumable."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Executor
from functools import partial
from typing import Any

import pandas as pd
import torch
from jaxtyping import Int

from ..errors import InvalidValueError
from ..files import fingerprint
from ..results import METRIC_COLUMNS
from ..runner import map_series
from ..store import ResultStore
from .behaviour import (
    bigram_score,
    bigram_table,
    frequent_ngrams,
    icl_from_loss,
    ngram_relative_loss,
    per_token_loss,
    repeat_icl_score,
    repeat_positions,
)
from .head_scores import copying_scores, duplicate_token_scores, prefix_matching_scores, previous_token_scores

HEAD_METRICS = {
    "previous_token": previous_token_scores,
    "prefix_matching": prefix_matching_scores,
    "duplicate_token": duplicate_token_scores,
    "copying": copying_scores,
}
"""Per-head metrics: one row per (layer, head)."""
MODEL_METRICS = ("loss", "icl_score", "repeat_icl_score", "bigram_score", "ngram_score")
"""Model-level metrics (layer and head empty); `ngram_score` gives one metric `ngram_score_{n}` per n."""


def metrics_over_series(
    series,
    *,
    metrics: Sequence[str] | None = None,
    tokens: Int[torch.Tensor, "batch pos"] | None = None,
    data: Any = None,
    store_dir: str | os.PathLike | None = None,
    steps: Sequence[int] | None = None,
    n_seqs: int = 64,
    seq_len: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    early: int | None = None,
    late: int | None = None,
    ngram_n: Sequence[int] = (2, 3),
    top_k: int = 100,
    executor: Executor | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Compute `metrics` at each checkpoint -> one frame with columns step, metric, layer, head, value.

    Head metrics (`HEAD_METRICS`) use the library's seeded probes (`n_seqs`, `seq_len`, `seed`);
    `loss` (mean per-token loss), `icl_score` (`early`, `late`) and `repeat_icl_score` (second vs first
    copy of the repeats in `tokens`, NaN without repeats) need `tokens`; `bigram_score` and
    `ngram_score` (`ngram_n`, `top_k`) also need `data`, whose bigram table and frequent n-grams are built
    once. Default `metrics`: the head metrics, plus loss and ICL score given `tokens` (and the repeat ICL
    score where they hold repeats), plus bigram and n-gram scores given `data` too. With `store_dir`, each checkpoint's rows are saved as soon as they are
    done, keyed by every option that changes the numbers, so rerunning resumes a stopped run. With an
    `executor`, the checkpoints are parallel jobs (see `tl_devinterp.parallel`).
    """
    if metrics is None:
        metrics = list(HEAD_METRICS) + (["loss", "icl_score"] if tokens is not None else []) + (
            ["repeat_icl_score"] if tokens is not None and repeat_positions(tokens)[1].any() else []) + (
            ["bigram_score", "ngram_score"] if tokens is not None and data is not None else [])
    metrics = list(metrics)
    unknown = [m for m in metrics if m not in HEAD_METRICS and m not in MODEL_METRICS]
    if unknown:
        raise InvalidValueError(f"Unknown metrics {unknown}; choose from {list(HEAD_METRICS) + list(MODEL_METRICS)}.")
    model_metrics = [m for m in metrics if m in MODEL_METRICS]
    if model_metrics and tokens is None:
        raise InvalidValueError(f"Metrics {model_metrics} need `tokens` (an integer tensor [batch, pos]) to evaluate on.")
    needs_data = [m for m in metrics if m in ("bigram_score", "ngram_score")]
    if needs_data and data is None:
        raise InvalidValueError(f"Metrics {needs_data} need `data` (the training tokens or dataset) for their statistics.")

    table = None
    if "bigram_score" in metrics:
        table = bigram_table(data, series.load(series.steps[0]).cfg.d_vocab)
    ngrams = {n: frequent_ngrams(data, n, top_k=top_k) for n in ngram_n} if "ngram_score" in metrics else {}
    probe = dict(n_seqs=n_seqs, seq_len=seq_len, seed=seed, batch_size=batch_size)

    compute = partial(_checkpoint_metrics, metrics=metrics, probe=probe, tokens=tokens, batch_size=batch_size,
                      early=early, late=late, ngrams=ngrams, table=table)
    store = None
    if store_dir is not None:
        params = dict(metrics=metrics, n_seqs=n_seqs, seq_len=seq_len, seed=seed, early=early, late=late,
                      ngram_n=list(ngram_n) if "ngram_score" in metrics else None, top_k=top_k,
                      tokens=fingerprint(tokens) if tokens is not None else None,
                      table=fingerprint(table) if table is not None else None,
                      ngrams={n: fingerprint(g) for n, g in ngrams.items()})
        store = ResultStore(store_dir, "metrics", params)
    frame = map_series(series, compute, store=store, steps=None if steps is None else list(steps), desc="metrics",
                       executor=executor, progress=progress)
    frame = frame.reindex(columns=METRIC_COLUMNS)
    return frame.astype({"step": "int64", "metric": "string", "layer": "Int64", "head": "Int64", "value": "float64"})


def _checkpoint_metrics(step: int, model, *, metrics: list[str], probe: dict, tokens, batch_size: int, early, late,
                        ngrams: dict, table) -> pd.DataFrame:
    """One checkpoint's rows (a module-level function, so jobs pickle)."""
    rows = []
    for name in metrics:
        if name in HEAD_METRICS:
            scores = HEAD_METRICS[name](model) if name == "copying" else HEAD_METRICS[name](model, **probe)
            rows += [(name, layer, head, float(scores[layer, head]))
                     for layer in range(scores.shape[0]) for head in range(scores.shape[1])]
    if {"loss", "icl_score", "repeat_icl_score", "ngram_score"} & set(metrics):
        loss = per_token_loss(model, tokens, batch_size=batch_size)
        if "loss" in metrics:
            rows.append(("loss", None, None, float(loss.mean())))
        if "icl_score" in metrics:
            rows.append(("icl_score", None, None, icl_from_loss(loss, early, late)))
        if "repeat_icl_score" in metrics:
            rows.append(("repeat_icl_score", None, None, repeat_icl_score(loss, tokens)))
        rows += [(f"ngram_score_{n}", None, None, ngram_relative_loss(loss, tokens, g)) for n, g in ngrams.items()]
    if "bigram_score" in metrics:
        rows.append(("bigram_score", None, None, bigram_score(model, tokens, table, batch_size=batch_size)))
    return pd.DataFrame(rows, columns=METRIC_COLUMNS[1:])
