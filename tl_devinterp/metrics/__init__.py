"""Metrics per checkpoint: head scores read through hooks, behavioural metrics, and both over a series."""

from .behaviour import (
    bigram_score,
    bigram_table,
    frequent_ngrams,
    icl_score,
    loss_difference,
    ngram_scores,
    per_token_loss,
    repeat_icl_score,
    repeat_positions,
)
from .classify import classify_heads
from .head_scores import (
    copying_scores,
    duplicate_token_scores,
    prefix_matching_scores,
    previous_token_scores,
    probe_tokens,
    uniform_baseline,
)
from .metrics_series import metrics_over_series

__all__ = [
    "bigram_score", "bigram_table", "classify_heads", "copying_scores", "duplicate_token_scores",
    "frequent_ngrams", "icl_score", "loss_difference", "repeat_icl_score", "repeat_positions", "metrics_over_series", "ngram_scores",
    "per_token_loss", "prefix_matching_scores", "previous_token_scores", "probe_tokens", "uniform_baseline",
]
