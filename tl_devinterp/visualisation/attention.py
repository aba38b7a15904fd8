"""Attention patterns of chosen heads on one sequence, as circuitsvis views written fully offline.

circuitsvis's own `_repr_html_` loads its JavaScript from a CDN when it finds the internet. We render with
its locally bundled JavaScript instead (the `local_src` path of circuitsvis: `dist/cdn/iife.js`, inlined),
so a notebook or an HTML report never fetches anything. A page that shows many views inlines the
bundle once (`circuitsvis_script()`) and each view then only adds its data (`AttentionView.html(...)`).
"""

from __future__ import annotations

import html
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from circuitsvis.utils.convert_props import convert_props
from jaxtyping import Float, Int
from torch import nn

from ..errors import InvalidValueError
from ..models import check_head, head_name, model_device, parse_head

_ids = itertools.count()


@torch.no_grad()
def attention_patterns(
    model: nn.Module, tokens: Int[torch.Tensor, "seq"] | None, heads: Sequence[str | tuple[int, int]], *,
    inputs: dict[str, Any] | None = None,
) -> Float[torch.Tensor, "head q k"]:
    """The attention pattern (`blocks.{l}.attn.hook_pattern`) of each chosen head on one sequence: `tokens`,
    or for a model that does not read tokens the keyword arguments of its run on one sequence (`inputs`, a
    task's `model_inputs`, e.g. a residual stream with `start_at_layer=0`)."""
    if inputs is None and (tokens is None or tokens.ndim != 1):
        shape = None if tokens is None else tuple(tokens.shape)
        raise InvalidValueError(f"tokens must be one sequence [seq] (or give inputs=); got shape {shape}.")
    heads = [parse_head(h) for h in heads]
    for layer, h in heads:
        check_head(model, layer, h)
    names = {f"blocks.{layer}.attn.hook_pattern" for layer, _ in heads}
    if inputs is None:
        inputs = {"input": tokens[None].to(model_device(model))}
    _, cache = model.run_with_cache(**inputs, names_filter=lambda n: n in names)
    return torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"][0, h] for layer, h in heads]).float().cpu()


def circuitsvis_script() -> str:
    """circuitsvis's JavaScript bundle in one inline `<script>` (defines the global `CircuitsVis`)."""
    import circuitsvis

    bundle = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    js = bundle.read_text(encoding="utf-8").replace("</script>", "")  # as circuitsvis's render_local does
    js = js.replace("//# sourceMappingURL=iife.js.map", "")  # the map is not shipped inline
    return f"<script>{js}</script>"


@dataclass
class AttentionView:
    """Attention patterns `[head, q, k]` of named heads on labelled tokens; shows itself in Jupyter."""

    patterns: Float[torch.Tensor, "head q k"]
    tokens: list[str]
    head_names: list[str]

    def __post_init__(self):
        n, q, k = self.patterns.shape
        if q != k or q != len(self.tokens) or n != len(self.head_names):
            raise InvalidValueError(f"patterns {tuple(self.patterns.shape)} need {q} tokens and {n} head names; got "
                                    f"{len(self.tokens)} tokens and {len(self.head_names)} names.")

    def html(self, *, include_js: bool = True, element_id: str | None = None) -> str:
        """An offline circuitsvis `AttentionHeads` view; `include_js=False` when the page already has
        `circuitsvis_script()`."""
        element_id = element_id or f"circuitsvis-{next(_ids)}"
        props = convert_props({"attention": self.patterns, "tokens": self.tokens,
                               "attentionHeadNames": self.head_names, "maskUpperTri": True})
        props = props.replace("</", "<\\/")  # token text must not close the script element
        call = (f'<div id="{html.escape(element_id)}" class="circuitsvis"></div>\n'
                f"<script>CircuitsVis.render({element_id!r}, CircuitsVis.AttentionHeads, {props});</script>")
        return (circuitsvis_script() + "\n" + call) if include_js else call

    def _repr_html_(self) -> str:
        return self.html()


def attention_view(
    model: nn.Module,
    tokens: Int[torch.Tensor, "seq"] | Any,
    heads: Sequence[str | tuple[int, int]],
    *,
    labels: Sequence[str] | None = None,
    suffix: str = "",
    inputs: dict[str, Any] | None = None,
) -> AttentionView:
    """Attention of `heads` on `tokens`, ready to show; `labels` are the token strings (default: ids),
    `suffix` is appended to each head's name (e.g. `" @ step 800"`). `inputs`: as in `attention_patterns`
    (then `labels` name the positions)."""
    patterns = attention_patterns(model, tokens if inputs is None else None, heads, inputs=inputs)
    labels = [str(t) for t in tokens.tolist()] if labels is None else list(labels)
    names = [head_name(*parse_head(h)) + suffix for h in heads]
    return AttentionView(patterns, labels, names)
