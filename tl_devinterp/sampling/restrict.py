"""Weight restrictions: which coordinates SGLD may move, as boolean masks over the model's parameters.

A spec is one head (`"l1h3"` or `(1, 3)`), one layer (`"layer1"` or `"blocks.1"`), a component
(`"embed"`, `"unembed"`, `"pos_embed"`), a parameter-name pattern matched with fnmatch against
TransformerLens names (`"blocks.0.attn.*"`; for a plain `nn.Module`, its own parameter names), or a list
of these (the union). Head layouts come from `models.head_slices`; nothing here knows how weights are stored.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..models import as_head, head_slices, slice_masks, tl_parameter_names

COMPONENTS = ("embed", "unembed", "pos_embed")
_LAYER = re.compile(r"^(?:layer|blocks\.)(\d+)$")


@dataclass
class Restriction:
    """Masks keyed by the model's own parameter names; a parameter absent from `masks` is held fixed.

    A mask of None means the whole parameter is sampled.
    """

    label: str
    masks: dict[str, torch.Tensor | None]
    d: int  # number of sampled coordinates
    first_layer: int = 0  # the lowest block touched when only blocks are: the residual stream below is fixed


def resolve_restriction(model: nn.Module, restrict=None) -> Restriction:
    """The coordinates that `restrict` names in `model` (None: every parameter)."""
    params = dict(model.named_parameters())
    if restrict is None:
        return Restriction("all", {name: None for name in params}, sum(p.numel() for p in params.values()))
    specs = restrict if isinstance(restrict, list) else [restrict]
    if not specs:
        raise ValueError("restrict=[] selects no parameters; pass None to sample the whole model.")
    masks: dict[str, torch.Tensor] = {}
    for spec in specs:
        for name, mask in _spec_masks(model, spec).items():
            masks[name] = masks[name] | mask if name in masks else mask
    masks = {n: m for n, m in masks.items() if m.any()}
    if not masks:
        raise ValueError(f"restrict={restrict!r} selects no parameters of this model.")
    d = sum(int(m.sum()) for m in masks.values())
    full = {n: (None if bool(m.all()) else m) for n, m in masks.items()}
    return Restriction(restriction_label(restrict), full, d, _first_layer(model, full))


def _first_layer(model: nn.Module, masks: dict) -> int:
    tl_name = {own: tl for tl, own in tl_parameter_names(model).items()}
    layers = [re.match(r"blocks\.(\d+)\.", tl_name.get(own, "")) for own in masks]
    return min(int(m.group(1)) for m in layers) if all(layers) else 0


def restriction_label(restrict) -> str:
    """A canonical, stable text for a spec: heads become `l1h3`, so `(1, 3)` and `"l1h3"` agree."""
    if restrict is None:
        return "all"
    if isinstance(restrict, list):
        return "+".join(restriction_label(s) for s in restrict)
    head = as_head(restrict)
    if head is not None:
        return f"l{head[0]}h{head[1]}"
    layer = _LAYER.match(restrict) if isinstance(restrict, str) else None
    return f"blocks.{layer.group(1)}" if layer else str(restrict)


def _spec_masks(model: nn.Module, spec) -> dict[str, torch.Tensor]:
    head = as_head(spec)
    if head is not None:
        if not hasattr(model, "cfg"):
            raise ValueError(f"restrict={spec!r} names a head, but {type(model).__name__} has no attention heads.")
        return slice_masks(model, head_slices(model, *head))
    if not isinstance(spec, str):
        raise TypeError(
            f"Cannot read restrict={spec!r}: use a head ('l1h3' or (1, 3)), a layer ('layer1' or 'blocks.1'), "
            f"a component {COMPONENTS}, a parameter-name pattern ('blocks.0.attn.*'), or a list of these."
        )
    layer = _LAYER.match(spec)
    pattern = f"blocks.{layer.group(1)}.*" if layer else f"{spec}.*" if spec in COMPONENTS else spec
    names = tl_parameter_names(model)
    params = dict(model.named_parameters())
    hits = {own for tl, own in names.items() if fnmatch.fnmatchcase(tl, pattern) or fnmatch.fnmatchcase(own, pattern)}
    if not hits:
        raise ValueError(
            f"restrict={spec!r} (pattern {pattern!r}) matches no parameter. Parameter names: {sorted(names)}."
        )
    return {own: torch.ones_like(params[own], dtype=torch.bool) for own in hits}
