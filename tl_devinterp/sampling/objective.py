"""The objective the sampler evaluates: the loss (an explicit `loss_fn`, else the model's own, else next-token
cross-entropy), the choice of forward (the verified fast forward or TransformerLens's), and `Objective`, the
loss as a module evaluated at any weights through `functional_call` (the one place the sampler runs the model).
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..errors import InvalidTypeError
from ..models import (
    eval_mode,
    hf_boot_hint,
    is_supported_model,
    mean_token_loss,
    model_device,
    parameter_slots,
)
from .batches import lm_batch
from .diagnostics import SamplerWarning
from .fast_forward import fast_forward, precision_context, verified_fast_forward
from .settings import SGLDConfig


def lm_loss(model: nn.Module, batch, resid: torch.Tensor | None = None, layer: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of a TransformerLens model on a batch (`batches.lm_batch`: padding and
    labels of -100 left out); with `resid` and `layer`, computed from that residual stream before block `layer`."""
    tokens, keep = lm_batch(batch)
    logits = model(tokens) if layer is None else model(resid, start_at_layer=layer)
    return mean_token_loss(logits, tokens, keep)


def fast_lm_loss(forward: Callable) -> Callable:
    """`lm_loss` through a fast forward `forward(tokens, start_at_layer, resid)` (`sampling.fast_forward`)
    instead of the model's own."""

    def loss(model: nn.Module, batch, resid: torch.Tensor | None = None, layer: int | None = None) -> torch.Tensor:
        tokens, keep = lm_batch(batch)
        return mean_token_loss(forward(tokens, layer, resid), tokens, keep)

    return loss


def choose_forward(model: nn.Module, loss_fn: Callable | None, config: SGLDConfig, batch) -> tuple[Callable | None, str]:
    """(the fast forward, "fast") where it may replace the TL forward in the LM loss (`config.fast_forward`,
    the default loss, no hook on a hook point that it would skip, and `verified_fast_forward` finds equal logits
    and gradients on `batch`); else (None, why not). Attention is fused on a GPU and written out on a CPU,
    where vmap has no batching rule for the fused kernel."""
    if not config.fast_forward:
        return None, "model: fast_forward=False"
    if loss_fn is not None or not is_supported_model(model):
        return None, "model: a custom loss or a model TransformerLens does not describe"
    if any(h._forward_hooks or h._forward_pre_hooks or h._backward_hooks for h in model.hook_dict.values()):
        forward, problem = None, "hooks attached (the fast forward would skip them)"
    else:
        sdpa = model_device(model).type == "cuda"

        def check() -> str:
            with eval_mode(model):
                return verified_fast_forward(model, lm_batch(batch)[0], sdpa=sdpa)[1]

        problem = once_per_weights(model, ("fast forward", sdpa), check)
        forward = None if problem else fast_forward(model, sdpa)
    if forward is not None:
        return forward, "fast"
    warnings.warn(f"Sampling through the TransformerLens forward, not the fast forward (several times slower): "
                  f"{problem}.", SamplerWarning, stacklevel=3)  # once per reason, by Python's default filter
    return None, f"model: {problem}"


_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(check, weights' state): verdict}


def once_per_weights(model: nn.Module, check: Any, compute: Callable[[], Any]) -> Any:
    """`compute()`, once per model, `check` and state of the model's weights (each parameter's in-place version
    and device): the one-time checks of a checkpoint (a few bare forward+backward passes) are not repeated by
    later calls on it, and are redone once its weights change. Verdicts must not refer to the model."""
    key = (check, tuple((p._version, p.device) for p in model.parameters()))
    verdicts = _CHECKED.setdefault(model, {})
    if key not in verdicts:
        verdicts[key] = compute()
    return verdicts[key]


def skips_lower_blocks(model: nn.Module, batch) -> bool:
    """Whether `model(resid, start_at_layer=1)` really skips block 0: where a model runs the lower blocks
    anyway, a cached residual stream would save nothing."""
    tokens = lm_batch(batch)[0][:1]
    calls = []
    try:
        with torch.no_grad():
            resid = model(tokens, stop_at_layer=1)
            model.run_with_hooks(resid, start_at_layer=1,
                                 fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: calls.append(1))])
    except (NotImplementedError, TypeError, ValueError, KeyError, AttributeError, RuntimeError):
        return False
    return not calls


def resolve_loss(model: nn.Module, loss_fn: Callable | None) -> Callable[[nn.Module, Any], torch.Tensor]:
    """`loss_fn(model, batch)` -> scalar. TransformerLens models default to `lm_loss`; another model's `loss_fn`
    may be a method `(batch)`, a function `(model, batch)`, or a criterion module applied as
    `criterion(model(x), y)` to batches `(x, y)`. A loss that returns per-example or per-token values
    (devinterp's `(model, input_ids) -> [batch, seq-1]`) or devinterp's `(loss, info)` pair is reduced to its mean."""
    if loss_fn is None and is_supported_model(model):  # before `loss_fn`: TransformerLens models have one of another signature
        return lm_loss
    own = getattr(model, "loss_fn", None)
    if loss_fn is not None:
        given = loss_fn
    elif isinstance(own, nn.Module):
        def given(m, batch):
            return m.loss_fn(m(batch[0]), batch[1])
    elif inspect.ismethod(own):
        def given(m, batch):
            return m.loss_fn(batch)
    elif callable(own):
        given = own
    else:
        raise InvalidTypeError(hf_boot_hint(model) or
            f"No loss for a {type(model).__name__}: pass loss_fn(model, batch) -> scalar, e.g. "
            f"loss_fn=lambda model, batch: torch.nn.functional.mse_loss(model(batch[0]), batch[1]) for batches (x, y)."
        )

    def loss(m: nn.Module, batch, *extra) -> torch.Tensor:
        value = given(m, batch, *extra)
        if isinstance(value, (tuple, list)):  # devinterp's evaluate: (loss, {...})
            value = value[0]
        return value if value.ndim == 0 else value.mean()

    return loss


class Objective(nn.Module):
    """`loss(model, batch, *extra)` as a module, evaluated at any weights by `at`: the one place where the
    sampler runs the model, whatever the loss does with it, at `precision` (`fast_forward.precision_context`)."""

    def __init__(self, model: nn.Module, loss: Callable, precision: str = "fp32"):
        super().__init__()
        self.model, self.loss, self.precision = model, loss, precision
        self.slots = parameter_slots(model)
        self.device = model_device(model)

    def forward(self, batch, *extra):
        with precision_context(self.precision, self.device):
            return self.loss(self.model, batch, *extra)

    def at(self, weights: dict[str, torch.Tensor], batch, *extra) -> torch.Tensor:
        """The loss with the model's weights replaced by `weights` (canonical name -> tensor, every sampled
        parameter), through a functional call that leaves the model untouched (and works under vmap)."""
        return functional_call(self, {f"model.{s}": weights[n] for s, n in self.slots.items()}, (batch, *extra),
                               tie_weights=False, strict=False)
