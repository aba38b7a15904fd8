"""TransformerLens models: build one from a small config, copy it, and map heads to parameter slices.

Everything that knows how a supported model stores its weights lives here. A `TransformerBridge`
(TL >= 3.9) keeps each attention projection as one `nn.Linear`: head h of W_Q is the row block
`q.weight[h*dh:(h+1)*dh]` (transposed), and head h of W_O the column block `o.weight[:, h*dh:(h+1)*dh]`.
A 3.x `HookedTransformer` keeps `W_Q` as a leaf `[n_heads, d_model, d_head]`, so head h is index `[h]`.
Callers see only `ParamSlice`s keyed by the model's own `named_parameters()` names, and TransformerLens
names (`blocks.1.attn.q.weight`, `blocks.1.attn.W_Q`) for matching user patterns.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import nn

try:  # TL >= 3.9
    from transformer_lens.model_bridge import TransformerBridge
except ImportError:  # pragma: no cover - older TL
    TransformerBridge = None  # type: ignore[assignment,misc]

try:  # TL 3.x only; 4.x removed it
    from transformer_lens import HookedTransformer
except ImportError:
    HookedTransformer = None  # type: ignore[assignment,misc]

HEAD_PARAMS = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")
"""The per-head parameters. b_O is shared by all heads of a layer and belongs to none."""


@dataclass
class ModelConfig:
    """A small TransformerLens architecture, JSON-serialisable for series manifests."""

    n_layers: int = 2
    n_heads: int = 4
    d_model: int = 64
    d_head: int | None = None  # default d_model // n_heads
    n_ctx: int = 64
    d_vocab: int = 256
    attn_only: bool = True
    d_mlp: int | None = None  # default 4 * d_model; ignored when attn_only
    normalization_type: str | None = "LN"  # "LN", "LNPre", "RMS" or None
    act_fn: str = "gelu"
    seed: int = 0

    def __post_init__(self):
        if self.d_head is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; pass d_head explicitly."
                )
            self.d_head = self.d_model // self.n_heads
        if self.d_mlp is None and not self.attn_only:
            self.d_mlp = 4 * self.d_model
        for name in ("n_layers", "n_heads", "d_model", "d_head", "n_ctx", "d_vocab"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"Unknown ModelConfig fields {sorted(unknown)}; known fields: {sorted(known)}.")
        return cls(**d)

    def tl_kwargs(self) -> dict[str, Any]:
        kw = dict(
            n_layers=self.n_layers, n_heads=self.n_heads, d_model=self.d_model, d_head=self.d_head,
            n_ctx=self.n_ctx, d_vocab=self.d_vocab, attn_only=self.attn_only,
            normalization_type=self.normalization_type, act_fn=self.act_fn, seed=self.seed,
        )
        if not self.attn_only:
            kw["d_mlp"] = self.d_mlp
        return kw


def build_model(config: ModelConfig | dict, device: str | torch.device | None = None) -> nn.Module:
    """A freshly initialised model: a `TransformerBridge` from `boot_native`, or a `HookedTransformer`
    on a TransformerLens without native bridges."""
    cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
    if TransformerBridge is not None and hasattr(TransformerBridge, "boot_native"):
        from transformer_lens.config import TransformerBridgeConfig

        model = TransformerBridge.boot_native(TransformerBridgeConfig(**cfg.tl_kwargs()))
    else:  # pragma: no cover - exercised in the TL 3.x environment
        from transformer_lens import HookedTransformerConfig

        model = HookedTransformer(HookedTransformerConfig(**cfg.tl_kwargs()))
    model.eval()
    return model.to(device) if device is not None else model


def is_supported_model(model: Any) -> bool:
    return (TransformerBridge is not None and isinstance(model, TransformerBridge)) or (
        HookedTransformer is not None and isinstance(model, HookedTransformer)
    )


def check_model(model: Any) -> None:
    """Raise a TypeError naming what we accept when `model` is not a TransformerLens model."""
    if not is_supported_model(model):
        raise TypeError(
            f"Expected a TransformerLens model (TransformerBridge, or HookedTransformer on TL 3.x), "
            f"got {type(model).__name__}. Build one with tl_devinterp.build_model(ModelConfig(...)) "
            f"or TransformerBridge.boot_native(...)."
        )


def clone_model(model: nn.Module) -> nn.Module:
    """An independent copy with the same weights.

    A bridge cannot be deep-copied after a forward pass (it caches non-leaf tensors), so a native bridge
    is rebuilt from its config and given the state dict; other models are deep-copied.
    """
    if TransformerBridge is not None and isinstance(model, TransformerBridge):
        if getattr(model.cfg, "architecture", None) == "TransformerLensNative":
            new = TransformerBridge.boot_native(copy.deepcopy(model.cfg))
            new.load_state_dict(model.state_dict())
            device = next(model.parameters()).device
            if next(new.parameters()).device != device:
                new = new.to(device)
            return new.train(model.training)
    return copy.deepcopy(model)


# --------------------------------------------------------------------------------------------------
# Parameter names: the model's own (what named_parameters() and torch.func.functional_call use)
# and TransformerLens's (what users write).


def tl_parameter_names(model: nn.Module) -> dict[str, str]:
    """TransformerLens name -> own parameter name, for every trainable parameter.

    On a bridge the state-dict keys are TL names (`blocks.1.attn.q.weight`) and share storage with the
    native parameters (`layers.1._original_component.attn...`); on a HookedTransformer they coincide.
    """
    own = {p.data_ptr(): name for name, p in model.named_parameters()}
    out = {key: own[t.data_ptr()] for key, t in model.state_dict(keep_vars=True).items() if t.data_ptr() in own}
    missing = set(own.values()) - set(out.values())
    for name in missing:  # a parameter with no state-dict alias keeps its own name
        out[name] = name
    return out


@dataclass(frozen=True)
class ParamSlice:
    """A region of one parameter: `dict(model.named_parameters())[name][index]`."""

    name: str
    index: tuple[Any, ...]
    label: str  # W_Q, b_K, ... or "" for a whole parameter


def _param_name(model: nn.Module, tensor: torch.Tensor) -> str:
    for name, p in model.named_parameters():
        if p is tensor:
            return name
    raise KeyError("tensor is not a parameter of this model")


_HEAD = re.compile(r"^[lL](\d+)[hH](\d+)$")


def as_head(spec: Any) -> tuple[int, int] | None:
    """`(layer, head)` from `"l1h3"`, `"L1H3"` or `(1, 3)`; None when `spec` does not name a head."""
    if isinstance(spec, tuple) and len(spec) == 2 and all(isinstance(i, int) for i in spec):
        return spec
    m = _HEAD.match(spec) if isinstance(spec, str) else None
    return (int(m.group(1)), int(m.group(2))) if m else None


def parse_head(spec: str | tuple[int, int]) -> tuple[int, int]:
    """`as_head`, raising a ValueError that shows the accepted forms."""
    head = as_head(spec)
    if head is None:
        raise ValueError(f"Cannot read head {spec!r}: write it as 'l1h3' (layer 1, head 3) or (1, 3).")
    return head


def head_name(layer: int, head: int) -> str:
    """The display name of a head in figures and tables: `L1H3`."""
    return f"L{layer}H{head}"


def all_heads(model: nn.Module) -> list[tuple[int, int]]:
    """Every (layer, head) of the model, layer by layer."""
    return [(layer, head) for layer in range(model.cfg.n_layers) for head in range(model.cfg.n_heads)]


def check_head(model: nn.Module, layer: int, head: int) -> None:
    """Raise a ValueError when the model has no head (layer, head)."""
    cfg = model.cfg
    if not 0 <= layer < cfg.n_layers or not 0 <= head < cfg.n_heads:
        raise ValueError(
            f"Head {head_name(layer, head)} (layer={layer}, head={head}) does not exist: the model has "
            f"{cfg.n_layers} layers of {cfg.n_heads} heads (0-indexed)."
        )


def head_slices(model: nn.Module, layer: int, head: int) -> list[ParamSlice]:
    """The slices holding W_Q, W_K, W_V, W_O and b_Q, b_K, b_V of head `head` in layer `layer`."""
    check_head(model, layer, head)
    cfg = model.cfg
    attn = model.blocks[layer].attn
    if HookedTransformer is not None and isinstance(model, HookedTransformer):
        return [
            ParamSlice(_param_name(model, getattr(attn, label)), (head,), label)
            for label in HEAD_PARAMS
            if isinstance(getattr(attn, label, None), nn.Parameter)
        ]
    if getattr(cfg, "n_key_value_heads", None) not in (None, cfg.n_heads):
        raise NotImplementedError("Head slices for grouped-query attention are not supported yet.")
    dh = cfg.d_head
    rows = slice(head * dh, (head + 1) * dh)
    out = []
    for proj, wl, bl in (("q", "W_Q", "b_Q"), ("k", "W_K", "b_K"), ("v", "W_V", "b_V")):
        lin = getattr(attn, proj)
        out.append(ParamSlice(_param_name(model, lin.weight), (rows, slice(None)), wl))
        if lin.bias is not None:
            out.append(ParamSlice(_param_name(model, lin.bias), (rows,), bl))
    out.append(ParamSlice(_param_name(model, attn.o.weight), (slice(None), rows), "W_O"))
    return out


def head_weights(model: nn.Module, layer: int, head: int) -> dict[str, torch.Tensor]:
    """Head (layer, head)'s weights in TransformerLens orientation: W_Q `[d_model, d_head]`,
    W_O `[d_head, d_model]`, b_Q `[d_head]` (views read through `head_slices`)."""
    params = dict(model.named_parameters())
    bridge_layout = not (HookedTransformer is not None and isinstance(model, HookedTransformer))
    out = {}
    for s in head_slices(model, layer, head):
        t = params[s.name][s.index]
        out[s.label] = t.T if bridge_layout and s.label.startswith("W") else t
    return out


def slice_masks(model: nn.Module, slices: list[ParamSlice]) -> dict[str, torch.Tensor]:
    """Boolean masks, one per parameter touched, that are True on the given slices."""
    params = dict(model.named_parameters())
    masks: dict[str, torch.Tensor] = {}
    for s in slices:
        if s.name not in masks:
            masks[s.name] = torch.zeros_like(params[s.name], dtype=torch.bool)
        masks[s.name][s.index] = True
    return masks


# --------------------------------------------------------------------------------------------------
# The language-model objective, shared by training, LLC estimation and behavioural metrics.


def token_cross_entropy(
    logits: Float[torch.Tensor, "batch pos vocab"], tokens: Int[torch.Tensor, "batch pos"]
) -> Float[torch.Tensor, "batch pos_minus_1"]:
    """Next-token cross-entropy at every position: entry [b, i] is the loss of predicting tokens[b, i+1]."""
    logprobs = logits[:, :-1].log_softmax(-1)
    return -logprobs.gather(-1, tokens[:, 1:, None]).squeeze(-1)


def bos_token_id(model: nn.Module) -> int:
    """The model's BOS token: its tokenizer's, else 0 (the convention of our data and tokenizer)."""
    tok = getattr(model, "tokenizer", None)
    bos = getattr(tok, "bos_token_id", None) if tok is not None else None
    return 0 if bos is None else int(bos)
