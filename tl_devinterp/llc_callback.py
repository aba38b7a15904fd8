"""The LLC while a model trains: every N steps, λ̂ of the current weights on a held-out batch set.

`llc_now` is the estimate (the model's LLC and, if asked, refined LLCs of chosen heads or parameter sets, in
one SGLD pass); `LLCCallback` runs it from a transformers `Trainer` and logs `llc`, `llc_se` (and
`llc/l1h3`, `llc_se/l1h3`) through `Trainer.log`, so the log history, TensorBoard and W&B (`report_to`) show
them; `train(..., llc_every=N)` runs it from our own trainer.

Training state is left as it was: sampling evaluates the model through `torch.func.functional_call` (its
parameters, `.grad` and the optimizer are never touched), in eval mode (no dropout draws), and the global
random generators (python, numpy, torch, every CUDA device) are restored afterwards, so a run with the
callback has the weights and the loss curve of the run without it.
"""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from .errors import InvalidTypeError, InvalidValueError, MissingDependencyError
from .models import is_supported_model
from .sampling.llc import sample_llcs
from .sampling.restrict import resolve_restriction, restriction_label
from .sampling.settings import SGLDConfig

try:
    from transformers import TrainerCallback
except ImportError:  # LLCCallback() then says what to install
    TrainerCallback = object


def causal_lm_loss(model: nn.Module, batch) -> torch.Tensor:
    """A transformers causal LM's own mean next-token loss on a token batch (`labels = input_ids`)."""
    tokens = batch[0] if isinstance(batch, (tuple, list)) else batch
    tokens = tokens["input_ids"] if isinstance(tokens, dict) else tokens
    return model(input_ids=tokens, labels=tokens).loss


@contextmanager
def training_state_kept(model: nn.Module):
    """The model's train/eval mode and every global random generator restored on exit; eval mode inside."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


def llc_now(model: nn.Module, data, config: SGLDConfig | None = None, *, restrict: Sequence = (),
            loss_fn: Callable | None = None, progress: bool = False, **options) -> dict[str, float]:
    """`{"llc": λ̂, "llc_se": SE}` of `model` at its current weights on `data`, plus `llc/<spec>` and
    `llc_se/<spec>` for each spec of `restrict` (heads "l1h3", or any `resolve_restriction` spec), all from one
    SGLD pass; the training state is kept (`training_state_kept`). A transformers model samples its own
    causal-LM loss (`causal_lm_loss`) unless `loss_fn` is given."""
    config = SGLDConfig.build(config, **options)
    if isinstance(restrict, str) or not hasattr(restrict, "__iter__"):
        raise InvalidTypeError(f"restrict={restrict!r} must be a list of specs, e.g. ['l1h3']; for one write [{restrict!r}].")
    if loss_fn is None and not is_supported_model(model) and hasattr(model, "config"):
        loss_fn = causal_lm_loss
    with training_state_kept(model):
        restrictions = [resolve_restriction(model, None), *(resolve_restriction(model, s) for s in restrict)]
        results = sample_llcs(model, data, restrictions, config, loss_fn=loss_fn, desc="LLC during training",
                              progress=progress)
    out = {"llc": results[0].mean, "llc_se": results[0].se}
    for spec, result in zip(restrict, results[1:], strict=True):
        out[f"llc/{restriction_label(spec)}"] = result.mean
        out[f"llc_se/{restriction_label(spec)}"] = result.se
    return out


class LLCCallback(TrainerCallback):
    """A `transformers.TrainerCallback` that estimates the LLC every `every` optimizer steps on `data` (a
    held-out token tensor, dataset or DataLoader) and logs it through the Trainer:

        trainer = Trainer(model=model, args=args, train_dataset=train)
        trainer.add_callback(LLCCallback(held_out, every=50, num_draws=100).attach(trainer))
        trainer.train()   # log history, TensorBoard, W&B: llc, llc_se (and llc/l1h3, ... for restrict=)

    Options: an `SGLDConfig` and/or its fields as keywords (devinterp's names too); `restrict`: heads or other
    specs to estimate refined LLCs of; `loss_fn`; `at_start`: also estimate before the first step.
    """

    def __init__(self, data, every: int, config: SGLDConfig | None = None, *, restrict: Sequence = (),
                 loss_fn: Callable | None = None, at_start: bool = False, **options):
        if TrainerCallback is object:
            raise MissingDependencyError("LLCCallback needs transformers: pip install 'tl_devinterp[transformers]'.")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InvalidValueError(f"LLCCallback(every={every!r}): every must be an integer >= 1 (optimizer steps).")
        self.data, self.every, self.restrict, self.loss_fn, self.at_start = data, every, list(restrict), loss_fn, at_start
        self.config = SGLDConfig.build(config, **options)
        self.trainer = None

    def attach(self, trainer) -> LLCCallback:
        """The Trainer whose `log` receives the estimates (returns self, for `trainer.add_callback`)."""
        report_to = getattr(trainer.args, "report_to", None) or []
        for extra in ("tensorboard", "wandb"):
            if extra in report_to and importlib.util.find_spec(extra) is None:
                raise MissingDependencyError(f"The Trainer reports to {extra}, which is not installed: "
                                  f"pip install 'tl_devinterp[{extra}]'.")
        self.trainer = trainer
        return self

    def _log(self, model: nn.Module, control) -> None:
        if self.trainer is None:
            raise InvalidValueError("LLCCallback is not attached to its Trainer: "
                                    "trainer.add_callback(LLCCallback(...).attach(trainer)).")
        flags = vars(control).copy()  # Trainer.log clears should_log: the step's own loss log must still run
        self.trainer.log(llc_now(model, self.data, self.config, restrict=self.restrict, loss_fn=self.loss_fn))
        vars(control).update(flags)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.at_start and state.global_step == 0:
            self._log(model, control)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self._log(model, control)
