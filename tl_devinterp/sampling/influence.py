"""Bayesian influence functions (Kreer et al. 2025): data attribution by posterior covariances, no Hessian.

Sample the posterior localised at w* on the training data and record, at each draw, the loss ℓ_i(w) of
every training sequence i and the per-token losses ℓ_j(w) of the query tokens j. Then

    BIF(i, j) = −Cov_posterior[ℓ_i(w), ℓ_j(w)] = d/dh E_{p_h}[ℓ_j] at h = 0,   p_h ∝ p·exp(−h·ℓ_i):

the first-order change of the query token's expected loss when sequence i is up-weighted in the
posterior. Negative: i helps j (their losses rise and fall together); positive: i and j pull apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from torch import nn

from ..errors import QueryOutOfRangeError
from .observables import MEMORY_LIMIT, ObservableTraces, posterior_covariance, sample_traces
from .restrict import resolve_restriction
from .settings import SGLDConfig


@dataclass
class BayesianInfluence:
    """BIF of each training sequence on each query token: `influence[i, q, t]` (t = 1 when not per token)."""

    influence: np.ndarray  # [train, query, positions]
    se: np.ndarray  # across chains, same shape
    traces: ObservableTraces  # "train" [chains, draws, train], "query" [chains, draws, query, positions]


def bayesian_influence(model: nn.Module, train_data, query_data, config: SGLDConfig | None = None, *,
                       restrict=None, per_token: bool = True, loss_fn: Callable | None = None, trace_dir=None,
                       memory_limit: int = MEMORY_LIMIT, progress: bool = True, **options) -> BayesianInfluence:
    """BIF(i, j) = −Cov[ℓ_i, ℓ_j] between training sequences i (sampled on, losses averaged over tokens)
    and query tokens j (per token; `per_token=False`: per query sequence). Options as `estimate_llc`."""
    config = SGLDConfig.build(config, **options)
    traces = sample_traces(model, train_data, [resolve_restriction(model, restrict)],
                           {"train": train_data, "query": query_data}, config, loss_fn=loss_fn, trace_dir=trace_dir,
                           memory_limit=memory_limit, desc="Bayesian influence", progress=progress)[0]
    train = traces.traces["train"]
    train = train.reshape(*train.shape[:3], -1).mean(-1)  # per sequence: [chains, draws, train]
    query = traces.traces["query"]
    query = query.reshape(*query.shape[:3], -1)  # [chains, draws, query, positions]
    if not per_token:
        query = query.mean(-1, keepdims=True)
    cov, se = posterior_covariance(train, query)
    shape = (train.shape[2], *query.shape[2:])
    return BayesianInfluence(-cov.reshape(shape), se.reshape(shape), traces)


def top_influences(result: BayesianInfluence, query: int, position: int = -1, k: int = 10) -> pd.DataFrame:
    """The k training sequences with the largest |BIF| on one query token (position −1: the last scored
    token): `train_index, influence, influence_se`, most influential first."""
    n_query, n_pos = result.influence.shape[1:]
    if not -n_query <= query < n_query or not -n_pos <= position < n_pos:
        raise QueryOutOfRangeError(f"Query ({query}, {position}) is outside the {n_query} queries × {n_pos} positions.")
    column, se = result.influence[:, query, position], result.se[:, query, position]
    order = np.argsort(-np.abs(column))[:k]
    return pd.DataFrame(dict(train_index=order, influence=column[order], influence_se=se[order]))
