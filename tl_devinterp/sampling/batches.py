"""Data for SGLD: every accepted form (a datasets.Dataset, token tensors, a tuple (x, y), a dict of tensors
as a tokenizer returns them, a DataLoader, also a Trainer's of dict batches) becomes an endless stream of
batches that every chain and restriction shares, plus a content fingerprint for result stores.

Hugging Face conventions hold for language-model batches (`lm_batch`): `input_ids` are the tokens, an
`attention_mask` of 0 marks padding and `labels` of -100 mark positions left out of the loss, so a padded
batch gives the loss of its unpadded rows. Padding must be on the right (a tokenizer's default for causal
LMs other than generation): a left-padded row would shift every position of the real tokens."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Int

from ..data import data_form, token_column, token_tensor
from ..errors import InvalidTypeError, InvalidValueError
from ..files import fingerprint

LM_COLUMNS = ("input_ids", "attention_mask", "labels")
"""The columns of Hugging Face language-model data that sampling reads; any other column is left aside."""


def as_tensors(data) -> tuple[torch.Tensor, ...] | dict[str, torch.Tensor] | torch.utils.data.DataLoader:
    """`data` as a tuple of tensors sharing the first dimension, a dict of them (`input_ids`, with
    `attention_mask` and `labels` where given), or the DataLoader itself."""
    form = data_form(data)
    if form == "loader":
        return data
    if form == "tensor":
        return (data,)
    if form == "mapping":  # a dict, or a tokenizer's BatchEncoding
        if "input_ids" not in data:
            raise InvalidValueError(f"The data dict has no 'input_ids' (keys: {sorted(data.keys())}); pass what the "
                                    f"tokenizer returned, or a token tensor [N, seq].")
        out = {k: torch.as_tensor(data[k]) for k in LM_COLUMNS if k in data}
        if len({len(t) for t in out.values()}) != 1:
            raise InvalidValueError(f"The tensors in data have different lengths {({k: len(t) for k, t in out.items()})}.")
        return out if len(out) > 1 else (out["input_ids"],)
    if form == "tensors":
        if len({len(t) for t in data}) != 1:
            raise InvalidValueError(f"The tensors in data have different lengths {[len(t) for t in data]}.")
        return tuple(data)
    if form in ("dataset", "text dataset"):  # a text dataset: token_column says to tokenize it first
        column = token_column(data)
        try:
            out = {"input_ids": token_tensor(data)}
            out |= {k: torch.as_tensor(np.asarray(data.with_format("numpy")[k])) for k in LM_COLUMNS[1:]
                    if k in data.column_names}
        except ValueError as e:
            raise InvalidValueError(f"The dataset's {column!r} rows have different lengths: pad them to one length (with an "
                                    f"attention_mask, as tokenizer(..., padding='max_length') gives) or chunk them.") from e
        return out if len(out) > 1 else (out["input_ids"],)
    raise InvalidTypeError(
        f"Cannot sample from data of type {type(data).__name__}: pass a datasets.Dataset with 'input_ids' (or "
        f"TransformerLens's 'tokens'), a token tensor [N, seq], a tuple of tensors (x, y), a dict with 'input_ids' "
        f"(and 'attention_mask'), or a torch DataLoader."
    )


def batch_stream(data, batch_size: int, seed: int, device) -> Iterator[tuple[int | None, Any]]:
    """Endless `(key, batch)` pairs. Tensor data is split once (with `seed`) into fixed batches, visited in
    a new random order each epoch (the ragged tail is dropped); `key` names the batch, so per-batch results
    such as the checkpoint loss are computed once. A DataLoader is cycled as it is, with key None."""
    source = as_tensors(data)
    if isinstance(source, torch.utils.data.DataLoader):
        while True:
            for batch in source:
                yield None, _to(batch, device)
    if isinstance(source, dict):
        keys, source = list(source), tuple(source.values())
        for key, batch in batch_stream(source, batch_size, seed, device):
            yield key, dict(zip(keys, batch if isinstance(batch, tuple) else (batch,), strict=True))
    n = len(source[0])
    if batch_size > n:
        raise InvalidValueError(f"batch_size={batch_size} is larger than the data ({n} rows); lower batch_size.")
    source = tuple(t.to(device) for t in source)
    g = torch.Generator().manual_seed(seed)
    chunks = torch.randperm(n, generator=g)[: n - n % batch_size].to(device).split(batch_size)
    while True:
        for k in torch.randperm(len(chunks), generator=g).tolist():
            yield k, source[0][chunks[k]] if len(source) == 1 else tuple(t[chunks[k]] for t in source)


def lm_batch(batch) -> tuple[Int[torch.Tensor, "batch pos"], Bool[torch.Tensor, "batch pos_minus_1"] | None]:
    """(tokens, which next-token targets count) of a language-model batch: a token tensor, a tuple whose
    first entry is the tokens, or a dict with `input_ids` (Hugging Face's form: `attention_mask` 0 on
    padding, `labels` -100 where the loss leaves a position out). The mask is None where every target counts;
    entry [b, i] says whether predicting tokens[b, i + 1] counts, as in `models.token_cross_entropy`."""
    if not isinstance(batch, Mapping):
        return (batch[0] if isinstance(batch, (tuple, list)) else batch), None
    if "input_ids" not in batch:
        raise InvalidValueError(f"A dict batch needs 'input_ids' (it has {sorted(batch)}): the tokens, as a tokenizer or a "
                                f"Trainer's data collator gives them.")
    tokens, keep = batch["input_ids"], None
    attention = batch.get("attention_mask")
    if attention is not None:
        attention = attention.bool()
        if (attention[:, 1:] & ~attention[:, :-1]).any():  # a real token after padding
            raise InvalidValueError("The batch is padded on the left (attention_mask 0 before 1): pad on the right for "
                                    "losses (tokenizer.padding_side = 'right'), or pass unpadded rows.")
        keep = attention[:, 1:]
    labels = batch.get("labels")
    if labels is not None and (labels == -100).any():
        keep = labels[:, 1:] != -100 if keep is None else keep & (labels[:, 1:] != -100)
    return tokens, (None if keep is None or bool(keep.all()) else keep)


def _to(batch, device):
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):  # a dict, or a collator's BatchEncoding
        return {k: _to(v, device) for k, v in batch.items()}
    return type(batch)(_to(b, device) for b in batch)


def data_fingerprint(data) -> str:
    """A hash of the data's contents (of a DataLoader's TensorDataset; else its type and length)."""
    source = as_tensors(data)
    if isinstance(source, dict):
        return fingerprint(*source.values()) + "-" + "+".join(source)
    if isinstance(source, torch.utils.data.DataLoader):
        ds = source.dataset
        if not isinstance(ds, torch.utils.data.TensorDataset):
            return f"{type(ds).__name__}-{len(ds)}-bs{source.batch_size}"
        source = ds.tensors
    return fingerprint(*source)
