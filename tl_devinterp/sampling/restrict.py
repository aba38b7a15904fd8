"""Weight restrictions: which coordinates SGLD may move, as boolean masks over the sampled parameters.

A spec is one of
- a head, `"l1h3"` or `(1, 3)`: its W_Q, W_K, W_V, W_O and biases (under grouped-query attention, its
  query and output weights plus the key/value weights of its group, which the group's heads share);
- a key/value group, `"l1g0"`: every head of that group, with the group's K/V;
- an MLP, `"l1.mlp"`, or some of its hidden neurons, `"l1.mlp[0:16]"` / `"l1.mlp[3,7]"`;
- a layer, `"layer1"` or `"blocks.1"`; a component, `"embed"`, `"unembed"`, `"pos_embed"`;
- a parameter-name pattern matched with fnmatch against TransformerLens names (`"blocks.0.attn.*"`) or
  canonical names; or a list of these (the union);
- devinterp's strings, read as the forms above: `"full"` (None), `"l0"` (a layer), `"l0 attn"` (its
  attention), `"l0 mlp"`, `"l0 h1"` / `"L0H1"`, `"l0 g0"`.
Where the coordinates live comes from `models` (TransformerLens's own views); nothing here knows a layout.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InvalidTypeError, InvalidValueError
from ..models import (
    as_head,
    head_masks,
    kv_head,
    mlp_masks,
    n_kv_heads,
    sampled_parameters,
    tl_parameter_names,
)

COMPONENTS = ("embed", "unembed", "pos_embed")
_LAYER = re.compile(r"^(?:layer|blocks\.)(\d+)$")
_GROUP = re.compile(r"^[lL](\d+)[gG](\d+)$")
_MLP = re.compile(r"^[lL](\d+)\.mlp(?:\[(\d+):(\d+)\]|\[([\d,\s]+)\])?$")
_DEVINTERP = [  # devinterp's restriction strings -> ours
    (re.compile(r"^l(\d+)\s*h(\d+)$", re.I), "l{}h{}"),
    (re.compile(r"^l(\d+)\s*g(\d+)$", re.I), "l{}g{}"),
    (re.compile(r"^l(\d+)$", re.I), "blocks.{}"),
    (re.compile(r"^l(\d+)\s+attn$", re.I), "blocks.{}.attn.*"),
    (re.compile(r"^l(\d+)\s+mlp$", re.I), "l{}.mlp"),
]


def _ours(spec):
    """A devinterp restriction string in our form (`_DEVINTERP`; "full" is None); anything else unchanged."""
    if not isinstance(spec, str):
        return spec
    text = spec.strip()
    if text.lower() == "full":
        return None
    for pattern, form in _DEVINTERP:
        m = pattern.match(text)
        if m:
            return form.format(*m.groups())
    return spec


@dataclass
class Restriction:
    """Masks keyed by canonical parameter names; a parameter absent from `masks` is held fixed.

    A mask of None means the whole parameter is sampled.
    """

    label: str
    masks: dict[str, torch.Tensor | None]
    d: int  # number of sampled coordinates
    first_layer: int = 0  # the lowest block touched when only blocks are: the residual stream below is fixed
    note: str = ""  # what a reader must know, e.g. K/V shared with the other heads of a group


def resolve_restriction(model: nn.Module, restrict=None) -> Restriction:
    """The coordinates that `restrict` names in `model` (None: every sampled parameter)."""
    restrict = _ours(restrict)
    if isinstance(restrict, (list, tuple)) and as_head(restrict) is None:
        if None in map(_ours, restrict):
            raise InvalidValueError(f"restrict={restrict!r} combines 'full' with other specs; pass 'full' (or None) alone.")
        restrict = [_ours(s) for s in restrict]
    if restrict is None:
        params = sampled_parameters(model)
        return Restriction("all", {name: None for name in params}, sum(p.numel() for p in params.values()))
    if isinstance(restrict, str) or as_head(restrict) is not None:
        specs = [restrict]
    elif isinstance(restrict, (list, tuple)):
        specs = list(restrict)
    else:
        raise InvalidTypeError(f"restrict={restrict!r} is a {type(restrict).__name__}: {_FORMS}")
    if not specs:
        raise InvalidValueError("restrict=[] selects no parameters; pass None to sample the whole model.")
    parts = [_spec_masks(model, spec) for spec in specs]
    masks = {n: m for n, m in _union(m for m, _ in parts).items() if m.any()}
    if not masks:
        raise InvalidValueError(f"restrict={restrict!r} selects no parameters of this model.")
    d = sum(int(m.sum()) for m in masks.values())
    full = {n: (None if bool(m.all()) else m) for n, m in masks.items()}
    note = " ".join(note for _, note in parts if note)
    return Restriction(restriction_label(restrict), full, d, _first_layer(model, full), note)


_FORMS = (
    "use a head ('l1h3' or (1, 3)), a KV group ('l1g0'), an MLP ('l1.mlp' or 'l1.mlp[0:16]'), a layer "
    "('layer1' or 'blocks.1'), a component ('embed', 'unembed', 'pos_embed'), a parameter-name pattern "
    "('blocks.0.attn.*'), devinterp's 'full', 'l0', 'l0 attn', 'l0 mlp', or a list of these."
)


def _first_layer(model: nn.Module, masks: dict) -> int:
    tl_name = {own: tl for tl, own in tl_parameter_names(model).items()}
    layers = [re.match(r"blocks\.(\d+)\.", tl_name.get(own, "")) for own in masks]
    return min(int(m.group(1)) for m in layers) if all(layers) else 0


def restriction_label(restrict) -> str:
    """A canonical, stable text for a spec: heads become `l1h3`, so `(1, 3)` and `"l1h3"` agree (and
    devinterp's `"l1 h3"`)."""
    restrict = _ours(restrict)
    if restrict is None:
        return "all"
    head = as_head(restrict)
    if head is None and isinstance(restrict, (list, tuple)):  # several specs, as resolve_restriction reads them
        return "+".join(restriction_label(s) for s in restrict)
    if head is not None:
        return f"l{head[0]}h{head[1]}"
    layer = _LAYER.match(restrict) if isinstance(restrict, str) else None
    return f"blocks.{layer.group(1)}" if layer else str(restrict)


def _spec_masks(model: nn.Module, spec) -> tuple[dict[str, torch.Tensor], str]:
    """Masks of one spec, and a note for the reader (empty when there is nothing to say)."""
    head = as_head(spec)
    if head is not None or (isinstance(spec, str) and (_GROUP.match(spec) or _MLP.match(spec))):
        if not hasattr(model, "cfg"):
            raise InvalidValueError(f"restrict={spec!r} names a head or MLP, but {type(model).__name__} is no TransformerLens model.")
    if head is not None:
        grouped = n_kv_heads(model) < model.cfg.n_heads
        note = (f"l{head[0]}h{head[1]} includes the K/V of its group {kv_head(model, head[1])}, shared with "
                f"{model.cfg.n_heads // n_kv_heads(model) - 1} other head(s).") if grouped else ""
        return head_masks(model, *head), note
    if not isinstance(spec, str):
        raise InvalidTypeError(f"Cannot read restrict={spec!r}: {_FORMS}")
    group = _GROUP.match(spec)
    if group:
        layer, g = int(group.group(1)), int(group.group(2))
        if not 0 <= g < n_kv_heads(model):
            raise InvalidValueError(f"restrict={spec!r}: layer {layer} has {n_kv_heads(model)} key/value groups (0-indexed).")
        heads = [h for h in range(model.cfg.n_heads) if kv_head(model, h) == g]
        return _union(head_masks(model, layer, h) for h in heads), ""
    mlp = _MLP.match(spec)
    if mlp:
        layer, lo, hi, listed = mlp.groups()
        neurons = (list(range(int(lo), int(hi))) if lo is not None
                   else [int(n) for n in listed.split(",") if n.strip()] if listed else None)
        return mlp_masks(model, int(layer), neurons), ""
    layer = _LAYER.match(spec)
    pattern = f"blocks.{layer.group(1)}.*" if layer else f"{spec}.*" if spec in COMPONENTS else spec
    names = tl_parameter_names(model)
    params = sampled_parameters(model)
    hits = {own for tl, own in names.items() if fnmatch.fnmatchcase(tl, pattern) or fnmatch.fnmatchcase(own, pattern)}
    hits = [own for own in params if own in hits]  # in the model's order (a set's order varies between processes)
    if not hits:
        raise InvalidValueError(
            f"restrict={spec!r} (pattern {pattern!r}) matches no parameter. Parameter names: {sorted(names)}."
        )
    return {own: torch.ones_like(params[own], dtype=torch.bool) for own in hits}, ""


def _union(mask_dicts) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for masks in mask_dicts:
        for name, m in masks.items():
            out[name] = out[name] | m if name in out else m
    return out
