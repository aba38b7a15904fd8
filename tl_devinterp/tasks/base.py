"""The task: one setting of the field (its data, model adapter, loss, probes and metrics) as one object.

See the package docstring (`tl_devinterp.tasks`) for the concept; this module holds the base class every task
derives from, the declaration of a spec's options, and the registry that turns a spec dict into its task.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from functools import partial
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import nn

from ..errors import InvalidTypeError, InvalidValueError
from ..files import fingerprint
from ..models import ModelConfig, build_model, model_device
from ..options import REQUIRED, Declared, Option, check_mapping
from ..results import METRIC_COLUMNS
from ..runner import map_series
from ..store import ResultStore

Batch = torch.Tensor | tuple[torch.Tensor, ...]
"""What a task's data holds and its loss reads: one tensor (tokens) or a tuple of tensors sharing the first
dimension (e.g. inputs, targets, read-out mask). The sampler's `batch_stream` yields the same form."""



def integer(low: int, default: Any = REQUIRED) -> Declared:
    """An integer option >= `low` (`default` REQUIRED: the spec must give it; None: it may be None)."""
    return Declared(int | None if default is None else int, default, Option(ge=low))


def number(low: float, default: Any = REQUIRED, *, strict: bool = False, high: float | None = None) -> Declared:
    """A finite number option >= `low` (> with `strict`), <= `high` if given (None default: it may be None)."""
    bounds = dict(gt=low) if strict else dict(ge=low)
    return Declared(float | None if default is None else float, default, Option(le=high, **bounds))


def choice(values: Sequence[Any], default: Any) -> Declared:
    return Declared(Any, default, Option(choices=tuple(values)))


class Task:
    """A setting of the field: subclass it, declare `kind` and `OPTIONS`, and fill in the methods below.

    A task is built from its spec (`make_task(spec)`), which is all a series manifest records of it, so the
    same data and functions come back anywhere. Methods with a default here suit a TransformerLens model;
    a task whose model is another torch module overrides `build_model` and sets `has_heads = False`.
    """

    kind: ClassVar[str] = ""
    OPTIONS: ClassVar[dict[str, Declared]] = {}  # made by `integer`, `number`, `choice` or `options.Declared`
    has_heads: ClassVar[bool] = True  # head LLCs, head clusters and attention views apply
    sampler_defaults: ClassVar[dict[str, Any]] = {}  # SGLD settings suited to the task's loss scale (e.g.
    # epsilon, gamma, nbeta): `analyze` uses them for the options the user leaves at the library's defaults
    tokenizer: Any = None  # a token task's tokenizer (saved with the series), else None

    def __init__(self, spec: dict[str, Any]):
        self.spec = self.check_spec(spec)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec})"

    # -- the spec ----------------------------------------------------------------------------------------------
    @classmethod
    def check_spec(cls, spec: dict[str, Any]) -> dict[str, Any]:
        """The spec with defaults filled in; a ValueError naming the option and its allowed values otherwise."""
        out = {"kind": cls.kind, **check_mapping(f"the {cls.kind!r} data spec", spec, cls.OPTIONS, extra=("kind",))}
        cls.check_shapes(out)
        return out

    @classmethod
    def check_shapes(cls, spec: dict[str, Any]) -> None:
        """Checks that involve several options (one ValueError naming them); none by default."""

    # -- data and model ----------------------------------------------------------------------------------------
    def data(self) -> tuple[Batch, Batch]:
        """(train, test), regenerated from the spec."""
        raise NotImplementedError

    def check_model(self, config: ModelConfig) -> None:
        """A ValueError when the model's config cannot run this task's data (before anything is written)."""

    def build_model(self, config: ModelConfig, device: str | torch.device | None = None) -> nn.Module:
        """A freshly initialised model for this task (default: `models.build_model`, a TL model)."""
        return build_model(config, device)

    def model_inputs(self, model: nn.Module, inputs: torch.Tensor) -> dict[str, Any]:
        """The input adapter: keyword arguments of `model(**...)` / `model.run_with_cache(**...)` for `inputs`
        (default: the tokens themselves)."""
        return {"input": inputs}

    # -- loss, probes, metrics ---------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The mean loss of a batch: what training minimises and the sampler's L_B."""
        raise NotImplementedError

    @property
    def sampler_loss(self) -> Callable | None:
        """The `loss_fn(model, batch)` the sampler gets (None: the sampler's own LM loss, which may run its fast
        forward). Result stores key it by name and code: a module-level function or a partial of one (default:
        `task_loss` bound to this spec)."""
        return partial(task_loss, self.spec)

    def probes(self, test: Batch, n: int) -> tuple[Any, str | Callable]:
        """(inputs, proxy) that essential dynamics reads: the first `n` test rows and the features of a model
        on them (default: the task's `features`, as `task_features` bound to this spec)."""
        return _head(test, n), partial(task_features, self.spec)

    def features(self, model: nn.Module, inputs: Batch) -> torch.Tensor:
        """The functional proxy of essential dynamics: the model's outputs on fixed inputs, flattened."""
        raise NotImplementedError

    def metrics(self, model: nn.Module, test: Batch) -> list[tuple[str, int | None, int | None, float]]:
        """One checkpoint's metrics as (metric, layer, head, value) rows (layer/head None for the model)."""
        return []

    def metrics_over_series(self, series, train: Batch, test: Batch, *, store_dir: str | os.PathLike | None = None,
                            n_seqs: int = 64, seed: int = 0, executor: Executor | None = None,
                            progress: bool = True) -> pd.DataFrame:
        """`metrics` at every checkpoint as one tidy frame (step, metric, layer, head, value), resumable."""
        store = None
        if store_dir is not None:
            store = ResultStore(store_dir, "task-metrics", dict(task=self.spec, test=fingerprint(*_tuple(test))))
        frame = map_series(series, partial(_checkpoint_metrics, self, test), store=store, desc="task metrics",
                           executor=executor, progress=progress)
        frame = frame.reindex(columns=METRIC_COLUMNS)
        return frame.astype({"step": "int64", "metric": "string", "layer": "Int64", "head": "Int64",
                             "value": "float64"})

    def position_losses(self, model: nn.Module, sample: Batch) -> tuple[np.ndarray, list[str], np.ndarray]:
        """(positions, labels, losses) of one sample sequence: the loss at each position the task scores."""
        raise NotImplementedError

    def labels(self, sample: Batch) -> list[str]:
        """A label per position of one sample sequence (attention pictures)."""
        raise NotImplementedError


def task_loss(spec: dict[str, Any], model: nn.Module, batch: Batch) -> torch.Tensor:
    """`make_task(spec).loss(model, batch)`: a task's loss as a function a result store can key."""
    return make_task(spec).loss(model, batch)


def task_features(spec: dict[str, Any], model: nn.Module, inputs: Batch) -> torch.Tensor:
    """`make_task(spec).features(model, inputs)`: a task's proxy as a function a result store can key."""
    return make_task(spec).features(model, inputs)


def _checkpoint_metrics(task: Task, test: Batch, step: int, model: nn.Module) -> pd.DataFrame:
    with torch.no_grad():
        rows = task.metrics(model, batch_to(test, model_device(model)))
    return pd.DataFrame(rows, columns=METRIC_COLUMNS[1:])


def _tuple(batch: Batch) -> tuple[torch.Tensor, ...]:
    return (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)


def _head(batch: Batch, n: int) -> Batch:
    return batch[:n] if isinstance(batch, torch.Tensor) else tuple(t[:n] for t in batch)


def batch_to(batch: Batch, device) -> Batch:
    """Every tensor of a batch on `device` (None: where it is)."""
    if device is None:
        return batch
    return batch.to(device) if isinstance(batch, torch.Tensor) else tuple(t.to(device) for t in batch)


def index_batch(batch: Batch, index: torch.Tensor | slice | int) -> Batch:
    """The rows `index` of every tensor of a batch (a tensor stays a tensor)."""
    return batch[index] if isinstance(batch, torch.Tensor) else tuple(t[index] for t in batch)


def batch_rows(batch: Batch) -> int:
    return len(_tuple(batch)[0])


TASKS: dict[str, type[Task]] = {}
"""kind -> task class: every task a spec may name."""


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: make `cls` the task of specs whose kind is `cls.kind`."""
    TASKS[cls.kind] = cls
    return cls


def make_task(spec: dict[str, Any] | Task) -> Task:
    """The task a spec describes (a Task is returned as it is); a ValueError naming the known kinds."""
    if isinstance(spec, Task):
        return spec
    if not isinstance(spec, dict):
        raise InvalidTypeError(f"A data spec must be a dict with a 'kind' (one of {sorted(TASKS)}); got {spec!r}.")
    kind = spec.get("kind")
    if kind not in TASKS:
        raise InvalidValueError(f"The 'kind' option of the data spec must be one of {sorted(TASKS)}; got {kind!r}.")
    return TASKS[kind](spec)


class VectorTokenTask(Task):
    """A TransformerLens model fed real vectors as tokens: each through the model's own `W_E` [d_vocab, d_model]
    plus `W_pos`, from block 0 (the regression and bursty tasks). Subclasses set `d_in` and `seq_len`."""

    d_in: int
    seq_len: int

    def check_model(self, config: ModelConfig) -> None:
        if config.d_vocab != self.d_in:
            raise InvalidValueError(f"The model's d_vocab must be the {self.kind!r} task's token dimension {self.d_in} "
                                    f"(inputs are embedded by W_E [d_vocab, d_model]); got d_vocab={config.d_vocab}.")
        if config.n_ctx < self.seq_len:
            raise InvalidValueError(f"The model's n_ctx ({config.n_ctx}) is shorter than the {self.kind!r} task's "
                                    f"sequences ({self.seq_len} positions); raise n_ctx.")

    def model_inputs(self, model: nn.Module, batch) -> dict[str, Any]:
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        return {"input": embed_inputs(model, inputs), "start_at_layer": 0}


def embed_inputs(model: nn.Module, inputs: Float[torch.Tensor, "n seq d_in"]) -> Float[torch.Tensor, "n seq d_model"]:
    """The residual stream before block 0: each input vector through the model's `W_E`, plus `W_pos`."""
    return inputs @ model.W_E + model.W_pos[: inputs.shape[1]]
