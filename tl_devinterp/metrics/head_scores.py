"""Head scores: what each attention head does, read from `blocks.{l}.attn.hook_pattern` on synthetic probes.

Three scores are attention at a fixed offset, averaged over the query positions where it is defined
(Olsson et al. 2022; Elhage et al. 2021):

- previous-token: on BOS + uniform random tokens, attention from position i to i - 1 (i >= 1);
- prefix-matching (induction): on BOS + r + r (|r| = h), attention from the second occurrence of a token,
  position q = h + j, to the position after its first occurrence, q - h + 1;
- duplicate-token: on the same input, attention from q = h + j to the first occurrence, q - h.

Each lies in [0, 1]; a head that attends uniformly scores about the mean of 1 / (q + 1) over its queries
(`uniform_baseline`). The copying score reads the OV circuit instead of attention: see `copying_scores`.
The probes have one fixed layout, so a model trained on exactly that layout can match a score by position
alone (a layer-0 head attending h - 1 back "prefix-matches"); a different `seq_len` tells the two apart.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import einops
import torch
from jaxtyping import Float, Int
from torch import nn

from ..data import repeated_random_tokens
from ..errors import InvalidValueError
from ..models import bos_token_id, check_model, model_device

Probe = Literal["random", "repeated"]


def probe_tokens(
    model: nn.Module, kind: Probe, *, n_seqs: int = 64, seq_len: int | None = None, seed: int = 0
) -> Int[torch.Tensor, "n_seqs seq"]:
    """The seeded inputs of the head scores: BOS + random tokens (`"random"`) or BOS + r + r (`"repeated"`).

    `seq_len` is the whole length including BOS (default `min(n_ctx, 128)`); for `"repeated"`,
    |r| = (seq_len - 1) // 2. Random tokens are uniform over the vocabulary without the model's BOS.
    """
    check_model(model)
    n_ctx, d_vocab = model.cfg.n_ctx, model.cfg.d_vocab
    seq_len = min(n_ctx, 128) if seq_len is None else seq_len
    if kind not in ("random", "repeated"):
        raise InvalidValueError(f"kind must be 'random' or 'repeated', got {kind!r}.")
    if not (2 if kind == "random" else 3) <= seq_len <= n_ctx:
        raise InvalidValueError(
            f"seq_len={seq_len} does not fit: it must be between {2 if kind == 'random' else 3} and the "
            f"model's n_ctx={n_ctx} (it counts BOS)."
        )
    if n_seqs < 1:
        raise InvalidValueError(f"n_seqs must be >= 1, got {n_seqs}.")
    half = (seq_len - 1) // 2 if kind == "repeated" else seq_len - 1
    rand = repeated_random_tokens(n_seqs, half, d_vocab, seed=seed, bos=None)  # r + r, tokens in 1..d_vocab-1
    rand = rand if kind == "repeated" else rand[:, :half]
    bos = bos_token_id(model)
    rand = torch.where(rand == bos, 0, rand)  # 0 is never drawn, so this keeps r uniform and free of BOS
    return torch.cat([torch.full((n_seqs, 1), bos), rand], dim=1)


def _offset_attention(
    model: nn.Module, tokens: Int[torch.Tensor, "batch seq"], first_query: int, offset: int, batch_size: int
) -> Float[torch.Tensor, "n_layers n_heads"]:
    """Mean attention from each query q >= first_query to key q - offset, per head, read by hooks."""
    cfg = model.cfg
    if batch_size < 1:
        raise InvalidValueError(f"batch_size must be >= 1, got {batch_size}.")
    q = torch.arange(first_query, tokens.shape[1], device=model_device(model))
    total = torch.zeros(cfg.n_layers, cfg.n_heads, dtype=torch.float64, device=model_device(model))

    def add(pattern: Float[torch.Tensor, "batch head q k"], hook, layer: int) -> None:
        total[layer] += pattern[:, :, q, q - offset].sum((0, 2)).double()

    hooks = [(f"blocks.{layer}.attn.hook_pattern", partial(add, layer=layer)) for layer in range(cfg.n_layers)]
    with torch.no_grad():
        for chunk in tokens.split(batch_size):
            model.run_with_hooks(chunk.to(model_device(model)), fwd_hooks=hooks)
    return (total / (len(tokens) * len(q))).float().cpu()


def uniform_baseline(first_query: int, seq_len: int) -> float:
    """The score of a head attending uniformly to all earlier positions: mean of 1 / (q + 1)."""
    return float((1.0 / torch.arange(first_query + 1, seq_len + 1, dtype=torch.float64)).mean())


def previous_token_scores(
    model: nn.Module, *, n_seqs: int = 64, seq_len: int | None = None, seed: int = 0, batch_size: int = 16
) -> Float[torch.Tensor, "n_layers n_heads"]:
    """Mean attention from position i to i - 1 on BOS + uniform random tokens, per head."""
    tokens = probe_tokens(model, "random", n_seqs=n_seqs, seq_len=seq_len, seed=seed)
    return _offset_attention(model, tokens, first_query=1, offset=1, batch_size=batch_size)


def prefix_matching_scores(
    model: nn.Module, *, n_seqs: int = 64, seq_len: int | None = None, seed: int = 0, batch_size: int = 16
) -> Float[torch.Tensor, "n_layers n_heads"]:
    """Induction: on BOS + r + r, mean attention from a repeated token to the one after its first occurrence."""
    tokens = probe_tokens(model, "repeated", n_seqs=n_seqs, seq_len=seq_len, seed=seed)
    half = (tokens.shape[1] - 1) // 2
    return _offset_attention(model, tokens, first_query=half + 1, offset=half - 1, batch_size=batch_size)


def duplicate_token_scores(
    model: nn.Module, *, n_seqs: int = 64, seq_len: int | None = None, seed: int = 0, batch_size: int = 16
) -> Float[torch.Tensor, "n_layers n_heads"]:
    """On BOS + r + r, mean attention from a repeated token to its first occurrence."""
    tokens = probe_tokens(model, "repeated", n_seqs=n_seqs, seq_len=seq_len, seed=seed)
    half = (tokens.shape[1] - 1) // 2
    return _offset_attention(model, tokens, first_query=half + 1, offset=half, batch_size=batch_size)


def copying_scores(model: nn.Module) -> Float[torch.Tensor, "n_layers n_heads"]:
    """Elhage et al.'s copying score: sum(λ) / sum(|λ|) over the eigenvalues λ of the full OV circuit
    W_E W_V W_O W_U `[d_vocab, d_vocab]`, per head; in [-1, 1].

    1 means every eigenvalue is positive: attending to a token raises that token's own logit (copying);
    -1 means it lowers it; a random circuit scores near 0. The circuit's nonzero eigenvalues are those of
    the small `[d_head, d_head]` matrix W_O W_U W_E W_V, so that is what is decomposed. Like the original,
    it ignores LayerNorm scales and positional embeddings; a head with a zero OV circuit scores 0.
    Under grouped-query attention each head reads the W_V of its key/value group.
    Weights only: no inputs are needed.
    """
    check_model(model)
    with torch.no_grad():
        unembed_embed = (model.W_U @ model.W_E).double()  # [d_model, d_model]
        W_V = model.W_V  # [layer, kv_head, d_model, d_head]: one per head, or one per group of heads
        W_V = einops.repeat(W_V, "layer kv m d -> layer (kv rep) m d", rep=model.cfg.n_heads // W_V.shape[1])
        small = einops.einsum(
            model.W_O.double(), unembed_embed, W_V.double(),
            "layer head dh_out m_out, m_out m_in, layer head m_in dh_in -> layer head dh_out dh_in",
        )
        eig = torch.linalg.eigvals(small)
        score = eig.sum(-1).real / eig.abs().sum(-1).clamp_min(1e-12)
    return score.float().cpu()
