"""Interventions during training: ablate, clamp or freeze parts of a model in a window of steps.

Singh et al. (2024) clamp activations *throughout training* to find which subcircuits an induction head
needs. An `Intervention` names a TransformerLens hook point (`blocks.0.attn.hook_z`, `...hook_pattern`) and,
optionally, one head along the hook's head axis, and replaces that activation on every training forward
pass of steps `start <= step < end`:

- `"zero"`: by zeros;
- `"mean"`: by its mean over the batch (at each position), detached, so no gradient reaches it;
- `"clamp"`: by a fixed value (a number or a tensor broadcast to the activation) or by the same activation
  of a reference model on the same batch (`value={"series": DIR, "step": 3000}` or a model in memory).

`"freeze"` holds a head's weights (`hook="l0h1"`) fixed in the window: its gradient slice is zeroed, and
its values are put back after each optimizer step, since AdamW's weight decay and momentum move weights
whose gradient is zero. Evaluation passes are never intervened on: a checkpoint's test loss is the saved
model's own loss, the one every later analysis sees.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import InvalidTypeError, InvalidValueError, NotSupportedError
from .files import fingerprint
from .models import as_head, check_head, head_masks, model_device
from .options import build, option, validate

KINDS = ("zero", "mean", "clamp", "freeze")
HEAD_AXIS = {"hook_pattern": 1, "hook_attn_scores": 1, "hook_z": 2, "hook_q": 2, "hook_k": 2, "hook_v": 2,
             "hook_result": 2}
"""The head axis of per-head attention hooks: `[batch, head, q, k]` patterns, `[batch, pos, head, d]` vectors."""


@dataclass(eq=False)
class Intervention:
    """Replace activation `hook` (head `head` only, if given) at training steps `start <= step < end`.

    `kind` is "zero", "mean", "clamp" (with `value`) or "freeze" (with `hook` a head, e.g. "l0h1").
    `end=None` lasts to the end of training. See the module docstring.
    """

    hook: str = option(help="a TransformerLens hook name, e.g. 'blocks.0.attn.hook_z' (kind='freeze': a head, 'l0h1')")
    kind: str = option(help="zero, mean, clamp or freeze", choices=KINDS)
    head: int | None = option(None, "the head of a per-head hook (None: the whole activation)", ge=0)
    start: int = option(0, "first training step it acts at", ge=0)
    end: int | None = option(None, "the step it stops before (None: the end of training)", ge=1)
    value: Any = option(None, "kind='clamp': a number, a tensor, a model, or {'series': DIR, 'step': STEP}")

    def __post_init__(self):
        validate(self, skip=("hook",))
        if self.end is not None and self.end <= self.start:
            raise InvalidValueError(f"Intervention window start={self.start}, end={self.end} is empty or negative; "
                                    f"give 0 <= start < end (end=None: to the end of training).")
        if self.kind == "freeze":
            head = as_head(tuple(self.hook) if isinstance(self.hook, list) else self.hook)
            if head is None or self.head is not None:
                raise InvalidValueError(f"A 'freeze' intervention names its head in hook, e.g. hook='l0h1' (layer 0, head 1); "
                                        f"got hook={self.hook!r}, head={self.head!r}.")
            self.hook = f"l{head[0]}h{head[1]}"
        elif not isinstance(self.hook, str) or "hook_" not in self.hook:
            raise InvalidValueError(f"Intervention hook {self.hook!r} is not a TransformerLens hook name such as "
                                    f"'blocks.0.attn.hook_z' (for kind='freeze', give a head: 'l0h1').")
        if self.head is not None and _head_axis(self.hook) is None:
            raise InvalidValueError(f"head={self.head} needs a per-head hook ({', '.join(HEAD_AXIS)}); {self.hook!r} has "
                                    f"no head axis. Drop head to intervene on the whole activation.")
        if (self.kind == "clamp") != (self.value is not None):
            raise InvalidValueError(f"value is required by kind='clamp' and only by it; got kind={self.kind!r}, "
                                    f"value={'None' if self.value is None else type(self.value).__name__}.")
        if isinstance(self.value, (list, tuple)):
            self.value = torch.tensor(self.value, dtype=torch.float32)
        elif isinstance(self.value, (int, float)) and not isinstance(self.value, bool):
            self.value = float(self.value)
        elif isinstance(self.value, dict):
            if "model" in self.value:
                raise InvalidValueError("This intervention clamped to a model held in memory (recorded by its fingerprint "
                                        "only); pass that model again as value=model.")
            if set(self.value) - {"series", "step"} or "series" not in self.value:
                raise InvalidValueError(f"A reference value is {{'series': DIR, 'step': STEP}} (step optional: the last); "
                                        f"got {self.value!r}.")
        elif self.value is not None and not isinstance(self.value, (torch.Tensor, nn.Module)):
            raise InvalidTypeError(f"Clamp value must be a number, a tensor (or nested list), a model, or "
                                   f"{{'series': DIR, 'step': STEP}}; got {type(self.value).__name__}.")

    def active(self, step: int) -> bool:
        return self.start <= step and (self.end is None or step < self.end)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields for the series manifest (a model value is recorded by its weights' fingerprint)."""
        value = self.value
        if isinstance(value, torch.Tensor):
            value = value.tolist()
        elif isinstance(value, nn.Module):
            value = {"model": fingerprint(*value.state_dict().values())}
        elif isinstance(value, dict):
            value = {"series": str(value["series"]), "step": value.get("step")}
        return dict(hook=self.hook, kind=self.kind, head=self.head, start=self.start, end=self.end, value=value)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Intervention:
        if not isinstance(d, dict):
            raise InvalidTypeError(f"An intervention is a table of hook, kind, head, start, end, value; got {d!r}.")
        d = build(cls, d, source="an intervention")
        if not {"hook", "kind"} <= set(d):
            raise InvalidValueError(f"An intervention needs 'hook' and 'kind' and may have head, start, end, value; got "
                                    f"keys {sorted(d)}.")
        return cls(**d)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Intervention) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]


def _head_axis(hook: str) -> int | None:
    return HEAD_AXIS.get(hook.rsplit(".", 1)[-1])


class Intervener:
    """Interventions checked against a model once, then installed step by step:

        intervener = Intervener(model, interventions)
        with intervener(step, tokens):   # this step's forward, backward and optimizer step
            ...
    """

    def __init__(self, model: nn.Module, interventions: Sequence[Intervention], *,
                 device: str | torch.device | None = None,
                 inputs: Callable[[nn.Module, Any], dict[str, Any]] | None = None):
        self.model = model
        self.inputs = inputs or (lambda model, tokens: {"input": tokens})  # a task's model_inputs (tasks.Task)
        self.items = list(interventions)
        self.references: dict[int, nn.Module] = {}  # id(Intervention) -> reference model
        self.frozen: dict[int, dict[str, torch.Tensor]] = {}  # id(Intervention) -> parameter masks
        for item in self.items:
            if item.kind == "freeze":
                # the head's W_Q, W_K, W_V, W_O, b_Q, b_K, b_V as masks over the model's own parameters
                self.frozen[id(item)] = head_masks(model, *as_head(item.hook))
                continue
            _check_hook(model, item)
            if isinstance(item.value, (dict, nn.Module)):
                self.references[id(item)] = _reference_model(item, device or model_device(model))

    @contextlib.contextmanager
    def __call__(self, step: int, tokens) -> Iterator[None]:
        """Install the interventions active at `step` for one training step on `tokens` (a task's batch)."""
        active = [item for item in self.items if item.active(step)]
        if not active:
            yield
            return
        # 1. reference activations: each reference model runs once on this batch
        cached: dict[int, torch.Tensor] = {}
        for item in active:
            if id(item) in self.references:
                reference = self.references[id(item)]
                cached[id(item)] = _capture(reference, item.hook, self.inputs(reference, tokens))
        hooks = [(item.hook, _hook_fn(item, cached.get(id(item)))) for item in active if item.kind != "freeze"]
        # 2. frozen heads: remember their values and zero their gradient slices
        params = dict(self.model.named_parameters())
        masks = [(params[name], mask) for item in active if item.kind == "freeze"
                 for name, mask in self.frozen[id(item)].items()]
        saved = [p.detach()[mask].clone() for p, mask in masks]
        handles = [p.register_hook(lambda g, mask=mask: g.masked_fill(mask, 0)) for p, mask in masks]
        try:
            with self.model.hooks(fwd_hooks=hooks):
                yield
        finally:
            # 3. put frozen values back: weight decay and momentum move them even with a zero gradient
            for handle in handles:
                handle.remove()
            with torch.no_grad():
                for (p, mask), values in zip(masks, saved):
                    p[mask] = values


def _check_hook(model: nn.Module, item: Intervention) -> None:
    if item.hook not in model.hook_dict:
        raise InvalidValueError(f"The model has no hook point {item.hook!r}; hook names look like 'blocks.L.attn.hook_z' "
                                f"or 'blocks.L.attn.hook_pattern' with 0 <= L < {model.cfg.n_layers} (all: model.hook_dict).")
    if item.head is not None:
        layer = int(item.hook.split(".")[1]) if item.hook.startswith("blocks.") else 0
        check_head(model, layer, item.head)


def _reference_model(item: Intervention, device) -> nn.Module:
    """The reference of a clamp: a model given as value, or `value["step"]` of the series in `value["series"]`."""
    from .series import CheckpointSeries

    if isinstance(item.value, nn.Module):
        model = item.value
    else:
        series = CheckpointSeries.from_dir(item.value["series"])
        step = item.value.get("step")
        model = series.load(series.steps[-1] if step is None else int(step))
    if item.hook not in model.hook_dict:
        raise InvalidValueError(f"The reference model of the clamp on {item.hook!r} has no such hook point; clamp to a "
                                f"model of the same architecture.")
    if model_device(model) != torch.device(device):
        model = model.to(device)
    return model.eval()


@torch.no_grad()
def _capture(model: nn.Module, hook: str, inputs: dict[str, Any]) -> torch.Tensor:
    """The activation at `hook` of `model` on `model(**inputs)`."""
    out = {}

    def save(x, hook):
        out["x"] = x.detach()

    with model.hooks(fwd_hooks=[(hook, save)]):
        model(**inputs)
    return out["x"]


def _hook_fn(item: Intervention, reference: torch.Tensor | None):
    """The TransformerLens hook that replaces `item`'s part of the activation."""
    axis = _head_axis(item.hook)
    index = (slice(None),) * axis + (item.head,) if item.head is not None else (slice(None),)

    def hook(x: torch.Tensor, hook) -> torch.Tensor:
        part = x[index]
        if item.kind == "zero":
            new = torch.zeros_like(part)
        elif item.kind == "mean":
            new = part.detach().mean(0, keepdim=True).expand_as(part)
        else:
            new = reference[index] if reference is not None else _fit(torch.as_tensor(item.value).to(part), part)
            try:
                new = new.to(part).expand_as(part)
            except RuntimeError:
                raise InvalidValueError(f"The clamp value for {item.hook!r}"
                                        f"{'' if item.head is None else f' head {item.head}'} has shape "
                                        f"{tuple(new.shape)}, which does not broadcast to the activation's "
                                        f"{tuple(part.shape)}.") from None
        out = x.clone()
        out[index] = new
        return out

    return hook


def _fit(value: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """A fixed value made for n_ctx positions, cut to a shorter input: positions are causal prefixes, so the
    first q positions of a full-length pattern are the pattern of a q-token input."""
    for dim in range(1, min(value.dim(), part.dim()) + 1):
        if value.shape[-dim] > part.shape[-dim]:
            value = value.narrow(-dim, 0, part.shape[-dim])
    return value


def as_interventions(items: Sequence[Intervention | dict] | None) -> list[Intervention]:
    """Interventions from `Intervention`s or their dicts (a config file's list)."""
    if isinstance(items, (Intervention, dict)):
        raise InvalidTypeError("interventions must be a list of Interventions (or dicts); wrap the single one in [...].")
    return [i if isinstance(i, Intervention) else Intervention.from_dict(i) for i in items or []]



def intervened(series):
    """The series' networks as they ran in training: each loaded model carries, as permanent TransformerLens
    hooks, the interventions of the series' manifest that are active at its step (a frozen head needs none).

    Measure an intervened series through this view too: a clamped head's saved weights alone never had to
    produce the pattern it was clamped to. Reference clamps (which need the reference model's activations on
    each input) are refused.
    """
    from .series import CheckpointSeries

    items = as_interventions(series.meta.get("train_config", {}).get("interventions"))
    if not items:
        raise InvalidValueError("The series records no interventions in its manifest (train_config.interventions).")
    if any(isinstance(item.value, dict) for item in items):
        raise NotSupportedError("Clamps to a reference series cannot be replayed on arbitrary inputs; measure the "
                                  "saved weights, or clamp to a fixed value.")

    def load(step: int) -> nn.Module:
        model = series.load(step)
        for item in items:
            if item.kind != "freeze" and item.active(step):
                model.add_hook(item.hook, _hook_fn(item, None), is_permanent=True)
        return model

    return CheckpointSeries(series.steps, load, meta={**series.meta, "intervened": True})
