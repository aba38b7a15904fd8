"""Token data: synthetic tasks, the Python standard library as a local corpus, and any text dataset.

Convention: token 0 is BOS in all data made here (synthetic tasks and our tokenizer).
"""

from __future__ import annotations

import torch
from jaxtyping import Int

BOS = 0


def repeated_random_tokens(
    n_seqs: int, half_len: int, d_vocab: int, *, seed: int = 0, bos: int | None = BOS
) -> Int[torch.Tensor, "n_seqs seq"]:
    """`[BOS] + r + r` with r uniform random tokens (never BOS): the classic induction probe.

    Sequence length is `2 * half_len + 1` (or `2 * half_len` with `bos=None`).
    """
    if d_vocab < 3:
        raise ValueError(f"d_vocab must be >= 3 for random tokens besides BOS, got {d_vocab}.")
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(1, d_vocab, (n_seqs, half_len), generator=g)
    parts = [r, r] if bos is None else [torch.full((n_seqs, 1), bos), r, r]
    return torch.cat(parts, dim=1)
