"""Data for SGLD: every accepted form (a datasets.Dataset, token tensors, a tuple (x, y), a DataLoader)
becomes an endless stream of batches that every chain and restriction shares, plus a content fingerprint
for result stores."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ..data import token_column, token_tensor
from ..store import fingerprint


def as_tensors(data) -> tuple[torch.Tensor, ...] | torch.utils.data.DataLoader:
    """`data` as a tuple of tensors sharing the first dimension, or the DataLoader itself."""
    if isinstance(data, torch.utils.data.DataLoader):
        return data
    if isinstance(data, torch.Tensor):
        return (data,)
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        if len({len(t) for t in data}) != 1:
            raise ValueError(f"The tensors in data have different lengths {[len(t) for t in data]}.")
        return tuple(data)
    if hasattr(data, "column_names"):  # a datasets.Dataset
        column = token_column(data)
        try:
            return (token_tensor(data),)
        except ValueError as e:
            raise ValueError(f"The dataset's {column!r} rows have different lengths: chunk or pad them to one "
                             f"length.") from e
    raise TypeError(
        f"Cannot sample from data of type {type(data).__name__}: pass a datasets.Dataset with 'input_ids' (or TransformerLens's 'tokens'), "
        f"a token tensor [N, seq], a tuple of tensors (x, y), or a torch DataLoader."
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
    n = len(source[0])
    if batch_size > n:
        raise ValueError(f"batch_size={batch_size} is larger than the data ({n} rows); lower batch_size.")
    source = tuple(t.to(device) for t in source)
    g = torch.Generator().manual_seed(seed)
    chunks = torch.randperm(n, generator=g)[: n - n % batch_size].to(device).split(batch_size)
    while True:
        for k in torch.randperm(len(chunks), generator=g).tolist():
            yield k, source[0][chunks[k]] if len(source) == 1 else tuple(t[chunks[k]] for t in source)


def _to(batch, device):
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return type(batch)(_to(b, device) for b in batch)


def data_fingerprint(data) -> str:
    """A hash of the data's contents (of a DataLoader's TensorDataset; else its type and length)."""
    source = as_tensors(data)
    if isinstance(source, torch.utils.data.DataLoader):
        ds = source.dataset
        if not isinstance(ds, torch.utils.data.TensorDataset):
            return f"{type(ds).__name__}-{len(ds)}-bs{source.batch_size}"
        source = ds.tensors
    return fingerprint(*source)
