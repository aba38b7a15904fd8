"""Behavioural metrics: how well a model predicts tokens, and which kinds of tokens.

All losses are next-token cross-entropies from `models.token_cross_entropy`: for tokens `[batch, pos]`,
loss entry `[b, i]` is the loss of predicting `tokens[b, i + 1]` from `tokens[b, :i + 1]`, so a loss
tensor has `pos - 1` columns and "the loss at token k" is column `k - 1`.

`data` (for the bigram table and frequent n-grams) is a token tensor `[batch, pos]` or `[pos]`, a list of
token lists, or a `datasets.Dataset` (or dict) with an `input_ids` column; rows may differ in length.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import nn

from ..errors import InvalidValueError
from ..models import check_model, eval_mode, model_device, token_cross_entropy
from ..sampling.batches import lm_batch


def _check_tokens(model: nn.Module, tokens: torch.Tensor, min_len: int = 2) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.dtype.is_floating_point:
        raise InvalidValueError(
            f"tokens must be an integer tensor [batch, pos], got "
            f"{type(tokens).__name__} {getattr(tokens, 'shape', '')}; stack sequences with torch.stack."
        )
    if tokens.shape[1] < min_len:
        raise InvalidValueError(f"tokens need at least {min_len} positions, got {tokens.shape[1]}.")
    if tokens.shape[1] > model.cfg.n_ctx:
        raise InvalidValueError(f"tokens have {tokens.shape[1]} positions but the model's n_ctx is {model.cfg.n_ctx}.")


def per_token_loss(
    model: nn.Module, tokens: Int[torch.Tensor, "batch pos"], *, batch_size: int = 32,
    attention_mask: Int[torch.Tensor, "batch pos"] | None = None,
) -> Float[torch.Tensor, "batch pos_minus_1"]:
    """Next-token loss at every position: entry `[b, i]` is the loss of predicting `tokens[b, i + 1]`; NaN
    where that target is padding (`attention_mask` 0, right padding as `sampling.batches.lm_batch` reads it).
    The model runs in eval mode (no dropout)."""
    check_model(model)
    _check_tokens(model, tokens)
    with torch.no_grad(), eval_mode(model):
        loss = torch.cat([
            token_cross_entropy(model(chunk.to(model_device(model))), chunk.to(model_device(model))).float().cpu()
            for chunk in tokens.split(batch_size)
        ])
    if attention_mask is None:
        return loss
    keep = lm_batch({"input_ids": tokens, "attention_mask": attention_mask})[1]
    return loss if keep is None else loss.masked_fill(~keep.cpu(), float("nan"))


def loss_difference(
    model_a: nn.Module, model_b: nn.Module, tokens: Int[torch.Tensor, "batch pos"], *, batch_size: int = 32
) -> Float[torch.Tensor, "batch pos_minus_1"]:
    """Per-token loss of `model_b` minus `model_a` on the same tokens: negative where the loss fell."""
    return per_token_loss(model_b, tokens, batch_size=batch_size) - per_token_loss(
        model_a, tokens, batch_size=batch_size
    )


def icl_positions(seq_len: int, early: int | None = None, late: int | None = None) -> tuple[int, int]:
    """The ICL score's token positions: given ones checked, else Olsson et al.'s 50th and 500th of 1024
    scaled to `seq_len` (clipped to 1 <= early < late <= seq_len - 1)."""
    if seq_len < 3:
        raise InvalidValueError(f"The ICL score needs sequences of at least 3 tokens, got {seq_len}.")
    early = min(max(1, round(seq_len * 50 / 1024)), seq_len - 2) if early is None else early
    late = min(max(early + 1, round(seq_len * 500 / 1024)), seq_len - 1) if late is None else late
    if not 1 <= early < late <= seq_len - 1:
        raise InvalidValueError(
            f"Need 1 <= early < late <= {seq_len - 1} (positions of predicted tokens in sequences of "
            f"{seq_len}); got early={early}, late={late}."
        )
    return early, late


def icl_from_loss(loss: Float[torch.Tensor, "batch pos_minus_1"], early: int | None = None,
                  late: int | None = None) -> float:
    """Mean loss at token `late` minus at token `early`, from a `per_token_loss` tensor."""
    early, late = icl_positions(loss.shape[1] + 1, early, late)
    return float(loss[:, late - 1].mean() - loss[:, early - 1].mean())


def icl_score(
    model: nn.Module, tokens: Int[torch.Tensor, "batch pos"], *, early: int | None = None,
    late: int | None = None, batch_size: int = 32,
) -> float:
    """In-context learning score: mean loss at token `late` minus at token `early` (negative = the model
    uses its context). Default positions: the paper's 500th vs 50th of 1024, scaled to the sequence length."""
    icl_positions(tokens.shape[-1], early, late)  # fail before running the model
    return icl_from_loss(per_token_loss(model, tokens, batch_size=batch_size), early, late)


def repeat_positions(
    tokens: Int[torch.Tensor, "batch pos"], *, min_len: int = 4
) -> tuple[Bool[torch.Tensor, "batch pos"], Bool[torch.Tensor, "batch pos"]]:
    """Where each sequence repeats a span of at least `min_len` tokens: (first copy, second copy) masks of
    the tokens predictable from the copy's previous token (so each copy's first token is left out).

    The second copy's tokens can be predicted from context (induction); the first copy's, the same tokens
    after the same previous tokens, only from statistics. Planted repeats (`data.plant_repeats`) are found
    this way, as are any natural ones."""
    if min_len < 2:
        raise InvalidValueError(f"min_len must be >= 2 (a repeat needs a previous token to predict from), got {min_len}.")
    n, seq = tokens.shape
    first = torch.zeros(n, seq, dtype=torch.bool)
    second = torch.zeros(n, seq, dtype=torch.bool)
    t = tokens.cpu()
    for lag in range(1, seq - min_len + 1):  # copies `lag` tokens apart: position p matches p - lag
        same = t[:, lag:] == t[:, :-lag]
        if same.shape[1] < min_len:
            break
        window = same.unfold(1, min_len, 1).all(-1)  # min_len matches in a row start here
        run = torch.zeros_like(same)
        for k in range(min_len):
            run[:, k:k + window.shape[1]] |= window
        second[:, lag:] |= run
        first[:, :-lag] |= run
    predictable = lambda m: m & torch.cat([torch.zeros(n, 1, dtype=torch.bool), m[:, :-1]], 1)  # noqa: E731
    return predictable(first), predictable(second)


def repeat_icl_score(loss: Float[torch.Tensor, "batch pos_minus_1"], tokens: Int[torch.Tensor, "batch pos"], *,
                     min_len: int = 4) -> float:
    """In-context learning on repeats: mean loss on the second copies' tokens minus on the first copies'
    (`repeat_positions`), from a `per_token_loss` tensor. The tokens and their previous tokens are the same
    in both copies, so only the use of context separates them: ≈ 0 for a bigram model, negative once
    induction works. NaN when `tokens` hold no repeat."""
    first, second = (m[:, 1:] for m in repeat_positions(tokens, min_len=min_len))  # loss[:, i-1] is token i
    if not second.any():
        return float("nan")
    return float(loss[second].mean() - loss[first].mean())


# --------------------------------------------------------------------------------------------------
# n-gram statistics of a dataset


def _rows(data: Any) -> Iterable[torch.Tensor]:
    """The token rows of `data`; a row with an `attention_mask` (a dict or dataset) cut to its real tokens
    (padding on the right, as `sampling.batches.lm_batch` reads it)."""
    mask = None
    if isinstance(data, torch.Tensor):
        rows: Any = data[None] if data.ndim == 1 else data
    elif isinstance(data, (list, tuple)):
        rows = data
    else:
        try:
            rows = data["input_ids"]
        except (KeyError, TypeError, IndexError) as err:
            raise InvalidValueError(
                f"data must be a token tensor, a list of token lists, or a dataset with an 'input_ids' "
                f"column; got {type(data).__name__}."
            ) from err
        columns = getattr(data, "column_names", None) or list(data.keys())
        mask = data["attention_mask"] if "attention_mask" in columns else None
    rows = (torch.as_tensor(row, dtype=torch.long).flatten() for row in rows)
    return rows if mask is None else (row[: int(torch.as_tensor(m).sum())] for row, m in zip(rows, mask, strict=True))


def _ngram_counts(data: Any, n: int) -> tuple[Int[torch.Tensor, "k n"], Int[torch.Tensor, " k"]]:
    """Every distinct n-gram of `data` (windows within a row) and how often it occurs."""
    if n < 1:
        raise InvalidValueError(f"n must be >= 1, got {n}.")
    windows = [row.unfold(0, n, 1) for row in _rows(data) if len(row) >= n]
    if not windows:
        raise InvalidValueError(f"data has no sequence of at least {n} tokens.")
    return torch.unique(torch.cat(windows), dim=0, return_counts=True)


def bigram_table(data: Any, d_vocab: int, *, dense_max: int = 2**24) -> Float[torch.Tensor, "d_vocab d_vocab"]:
    """Empirical next-token distribution `P[prev, next]` of `data`; a row is 0 where `prev` never occurs
    before another token. Dense when d_vocab² <= dense_max, else a coalesced sparse COO tensor."""
    grams, counts = _ngram_counts(data, 2)
    if grams.min() < 0 or grams.max() >= d_vocab:
        raise InvalidValueError(f"data has tokens outside [0, {d_vocab}); pass the model's d_vocab.")
    prev, nxt = grams.T
    totals = torch.bincount(prev, weights=counts.double(), minlength=d_vocab)
    probs = (counts / totals[prev]).float()
    if d_vocab * d_vocab <= dense_max:
        return torch.zeros(d_vocab, d_vocab).index_put_((prev, nxt), probs)
    return torch.sparse_coo_tensor(torch.stack([prev, nxt]), probs, (d_vocab, d_vocab), check_invariants=True).coalesce()


def bigram_score(
    model: nn.Module, tokens: Int[torch.Tensor, "batch pos"], table: Float[torch.Tensor, "d_vocab d_vocab"],
    *, kl: bool = False, batch_size: int = 32,
) -> float:
    """Mean cross-entropy from the bigram distribution of each token to the model's next-token
    distribution there (with `kl=True`, the KL divergence: 0 when the model is exactly the bigram model).
    Positions whose token has no bigram statistics are skipped."""
    check_model(model)
    _check_tokens(model, tokens)
    d_vocab = model.cfg.d_vocab
    if tuple(table.shape) != (d_vocab, d_vocab):
        raise InvalidValueError(f"table has shape {tuple(table.shape)}, the model needs ({d_vocab}, {d_vocab}).")
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in tokens.split(batch_size):
            logp = model(chunk.to(model_device(model)))[:, :-1].log_softmax(-1).flatten(0, 1).double()
            rows = table.index_select(0, chunk[:, :-1].flatten().cpu())
            rows = (rows.to_dense() if rows.is_sparse else rows).to(logp.device).double()
            loss = -(rows * logp).sum(-1) + (torch.xlogy(rows, rows).sum(-1) if kl else 0)
            seen = rows.sum(-1) > 0
            total, count = total + float(loss[seen].sum()), count + int(seen.sum())
    if count == 0:
        raise InvalidValueError("No token of `tokens` has bigram statistics in the table; build it from matching data.")
    return total / count


def frequent_ngrams(data: Any, n: int, *, top_k: int = 100) -> Int[torch.Tensor, "k n"]:
    """The `top_k` most frequent n-grams of `data`, most frequent first (ties in token order)."""
    grams, counts = _ngram_counts(data, n)
    order = torch.sort(counts, descending=True, stable=True).indices[:top_k]
    return grams[order]


def ngram_relative_loss(
    loss: Float[torch.Tensor, "batch pos_minus_1"], tokens: Int[torch.Tensor, "batch pos"],
    ngrams: Int[torch.Tensor, "k n"],
) -> float:
    """Mean loss on tokens that complete one of `ngrams`, minus the mean loss over all tokens
    (negative = the model predicts those n-grams better than average; NaN if none occurs)."""
    n = ngrams.shape[1]
    if n < 2:
        raise InvalidValueError(f"n-grams must have n >= 2 (a completing token needs context), got n={n}.")
    hits = []
    for rows in tokens.cpu().split(64):  # bounded memory: [64, pos, k, n] comparisons at a time
        windows = rows.unfold(1, n, 1)  # window s = tokens[s : s + n], completed by predicting token s + n - 1
        hits.append((windows[:, :, None, :] == ngrams).all(-1).any(-1))
    completing = loss[:, n - 2:][torch.cat(hits)]
    return float(completing.mean() - loss.mean()) if len(completing) else float("nan")


def ngram_scores(
    model: nn.Module, tokens: Int[torch.Tensor, "batch pos"], data: Any, *, n: int | Sequence[int] = (2, 3),
    top_k: int = 100, batch_size: int = 32,
) -> dict[int, float]:
    """For each n: the mean loss on tokens of `tokens` that complete one of the `top_k` most frequent
    n-grams of `data`, minus the mean loss on all tokens (`ngram_relative_loss`)."""
    ns = [n] if isinstance(n, int) else list(n)
    grams = {k: frequent_ngrams(data, k, top_k=top_k) for k in ns}
    loss = per_token_loss(model, tokens, batch_size=batch_size)
    return {k: ngram_relative_loss(loss, tokens, g) for k, g in grams.items()}
