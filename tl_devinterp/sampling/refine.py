"""Data-refined LLC: the same estimator, sampled and evaluated on a sub-distribution of the data.

Build the sub-distribution here, then pass it to `estimate_llc` / `estimate_head_llcs` as `data`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..data import data_form, token_column
from ..errors import InvalidTypeError, InvalidValueError
from .batches import as_tensors

Predicate = Callable[[Sequence[int]], bool]


def filter_dataset(data, predicate: Predicate):
    """The rows of `data` whose token sequence satisfies `predicate(tokens) -> bool`, in the same form
    (a `datasets.Dataset`, a token tensor, or a tuple of tensors filtered by their first tensor)."""
    if data_form(data) == "dataset":
        column = token_column(data)
        out = data.filter(lambda row: predicate(row[column]))
        n = len(out)
    else:
        tensors = as_tensors(data)
        if isinstance(tensors, torch.utils.data.DataLoader):
            raise InvalidTypeError("Cannot filter a DataLoader: filter its tensors or dataset, then build the loader.")
        keep = torch.tensor([bool(predicate(row.tolist())) for row in tensors[0]], dtype=torch.bool)
        n = int(keep.sum())
        out = tensors[0][keep] if isinstance(data, torch.Tensor) else tuple(t[keep] for t in tensors)
    if n == 0:
        raise InvalidValueError("No row of the data satisfies the predicate: the sub-distribution is empty.")
    return out


def contains_repeated_span(min_len: int = 2) -> Predicate:
    """A predicate: the sequence contains some span of `min_len` tokens twice (at different starts),
    the pattern an induction head can complete."""
    if min_len < 1:
        raise InvalidValueError(f"min_len must be >= 1, got {min_len}.")

    def predicate(tokens: Sequence[int]) -> bool:
        tokens = [int(t) for t in tokens]
        seen = set()
        for i in range(len(tokens) - min_len + 1):
            span = tuple(tokens[i : i + min_len])
            if span in seen:
                return True
            seen.add(span)
        return False

    return predicate
