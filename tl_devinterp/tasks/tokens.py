"""Token tasks: next-token prediction on token sequences (the demo's bigrams with repeats, the standard
library corpus, a transformers Trainer run or any token data given to `analyze`).

The data are `data.make_data` specs (`markov`, `stdlib`) or tokens given directly; the model is a TL model
reading the tokens; the loss is next-token cross-entropy (the sampler's own LM loss, so its fast forward
applies); essential dynamics reads the true next token's logit; the metrics are the library's head scores and
behavioural metrics (`metrics.metrics_over_series`).
"""

from __future__ import annotations

import os
from concurrent.futures import Executor
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..data import BOS, make_data, spec_tokenizer, token_tensor
from ..errors import InvalidValueError
from ..metrics import metrics_over_series, per_token_loss
from ..models import ModelConfig, token_cross_entropy
from .base import Task, integer, number, register


class TokenTask(Task):
    """Next-token prediction on token sequences `[n, seq]` (BOS first). Built from a spec (the subclasses
    below) or from tokens directly (`TokenTask.of_tokens`, e.g. a Trainer run's text tokenized by its model)."""

    kind = "tokens"

    def __init__(self, spec: dict[str, Any] | None = None, *, tokens: tuple[torch.Tensor, torch.Tensor] | None = None,
                 tokenizer: Any = None, bos: int = BOS):
        self.spec = self.check_spec(spec) if spec is not None else None
        self._tokens, self.tokenizer, self.bos = tokens, tokenizer, bos

    @classmethod
    def of_tokens(cls, train: torch.Tensor, test: torch.Tensor, *, tokenizer: Any = None, bos: int = BOS) -> TokenTask:
        """A token task on given tokens (no spec: nothing to regenerate)."""
        return cls(tokens=(token_tensor(train), token_tensor(test)), tokenizer=tokenizer, bos=bos)

    def data(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tokens is None:
            splits = make_data(self.spec)
            self._tokens = token_tensor(splits["train"]), token_tensor(splits["test"])
        return self._tokens

    def check_model(self, config: ModelConfig) -> None:
        if self.spec is not None and self.spec.get("seq_len") != config.n_ctx:
            raise InvalidValueError(f"data seq_len ({self.spec.get('seq_len')}) must equal the model's n_ctx ({config.n_ctx}).")
        train, test = self.data()
        vocab = int(max(train.max(), test.max())) + 1
        if vocab > config.d_vocab:
            raise InvalidValueError(f"The data uses {vocab} token ids but the model's d_vocab is {config.d_vocab}.")

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return token_cross_entropy(model(batch), batch).mean()

    @property
    def sampler_loss(self) -> None:
        return None  # the sampler's lm_loss: the same loss, through its verified fast forward

    def probes(self, test: torch.Tensor, n: int) -> tuple[torch.Tensor, str]:
        return test[:n], "true_logit"

    def metrics_over_series(self, series, train: torch.Tensor, test: torch.Tensor, *,
                            store_dir: str | os.PathLike | None = None, n_seqs: int = 64, seed: int = 0,
                            executor: Executor | None = None, progress: bool = True) -> pd.DataFrame:
        return metrics_over_series(series, tokens=test, data=train, store_dir=store_dir, n_seqs=n_seqs, seed=seed,
                                   executor=executor, progress=progress)

    def position_losses(self, model: nn.Module, sample: torch.Tensor) -> tuple[np.ndarray, list[str], np.ndarray]:
        return np.arange(1, len(sample)), self.labels(sample)[1:], per_token_loss(model, sample[None])[0].numpy()

    def labels(self, sample: torch.Tensor) -> list[str]:
        decode = (lambda i: str(i)) if self.tokenizer is None else (lambda i: self.tokenizer.decode([i]))
        return ["<bos>" if i == self.bos else decode(i) for i in sample.tolist()]


_SPAN = dict(repeat_fraction=number(0.0, 0.0), min_len=integer(1, 4), max_len=integer(1, 16), seed=integer(0, 0))


@register
class MarkovTokens(TokenTask):
    """`{"kind": "markov", ...}`: a global Markov chain over tokens (alpha=0: uniform) with in-context repeats
    planted (`data.make_data`); the demo's bigrams with repeats."""

    kind = "markov"
    OPTIONS = dict(d_vocab=integer(3), seq_len=integer(2), n_train=integer(1), n_test=integer(1),
                   alpha=number(0.0, 0.0), **_SPAN)


@register
class StdlibTokens(TokenTask):
    """`{"kind": "stdlib", ...}`: the Python standard library's source, BPE-tokenized (`data.make_data`)."""

    kind = "stdlib"
    OPTIONS = dict(vocab_size=integer(3), seq_len=integer(2), max_files=integer(1, None), **_SPAN)

    def __init__(self, spec: dict[str, Any]):
        super().__init__(spec)
        self.tokenizer = spec_tokenizer(self.spec)

