"""TransformerLens models: build one from a small config, and map heads, MLPs and names to parameters.

Everything that knows how a supported model stores its weights lives here, and it asks TransformerLens
rather than assuming a layout: a head's coordinates are read off TL's own per-head views
(`blocks[l].attn.W_Q[h]`, `W_O[h]`, biases), which are right for a native bridge, GPT-2's Conv1D, NeoX's
fused QKV, Llama's grouped-query attention and a 3.x `HookedTransformer` alike. Callers see boolean masks
keyed by canonical parameter names (see `sampled_parameters`), and TransformerLens names
(`blocks.1.attn.q.weight`, `blocks.1.attn.W_Q`) for matching user patterns.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import nn

from .errors import InvalidTypeError, InvalidValueError
from .options import build, option, validate

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

    n_layers: int = option(2, "transformer blocks", ge=1)
    n_heads: int = option(4, "attention heads per block", ge=1)
    d_model: int = option(64, "residual stream width", ge=1)
    d_head: int | None = option(None, "head width (default: d_model // n_heads)", ge=1)
    n_ctx: int = option(64, "context length", ge=1)
    d_vocab: int = option(256, "vocabulary size", ge=1)
    attn_only: bool = option(True, "attention-only blocks (no MLPs)")
    d_mlp: int | None = option(None, "MLP width (default: 4 * d_model; ignored when attn_only)", ge=1)
    normalization_type: str | None = option("LN", "LN, LNPre, RMS or None", choices=("LN", "LNPre", "RMS", None))
    act_fn: str = option("gelu", "MLP activation (a TransformerLens act_fn)")
    seed: int = option(0, "initialisation seed")

    def __post_init__(self):
        validate(self)
        if self.d_head is None:
            if self.d_model % self.n_heads:
                raise InvalidValueError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; pass d_head explicitly."
                )
            self.d_head = self.d_model // self.n_heads
        if self.d_mlp is None and not self.attn_only:
            self.d_mlp = 4 * self.d_model

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "the arguments") -> ModelConfig:
        return cls(**build(cls, d, source=source))

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


def hf_boot_hint(model: Any) -> str | None:
    """How to boot a Hugging Face transformers model as a TransformerLens model (one sentence), or None when
    `model` is none."""
    if not any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel" for c in type(model).__mro__):
        return None
    return (f"{type(model).__name__} is a Hugging Face transformers model: boot it as a TransformerLens model first, "
            f"e.g. `model.save_pretrained(path); tokenizer.save_pretrained(path); model = TransformerBridge."
            f"boot_transformers(path, device='cpu')` (from transformer_lens.model_bridge import TransformerBridge); "
            f"a Trainer's output_dir is read as it is by CheckpointSeries.from_hf_checkpoints.")


def check_model(model: Any) -> None:
    """Raise a TypeError naming what we accept when `model` is not a TransformerLens model."""
    hint = hf_boot_hint(model)
    if hint:
        raise InvalidTypeError(hint)
    if not is_supported_model(model):
        raise InvalidTypeError(
            f"Expected a TransformerLens model (TransformerBridge, or HookedTransformer on TL 3.x), "
            f"got {type(model).__name__}. Build one with tl_devinterp.build_model(ModelConfig(...)) "
            f"or TransformerBridge.boot_native(...)."
        )


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode (no dropout) inside, each submodule's own mode restored on exit: sampling and
    measuring see the deterministic function of the weights however the model was left."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training


def clone_model(model: nn.Module) -> nn.Module:
    """An independent copy with the same weights.

    A bridge cannot be deep-copied after a forward pass (it caches non-leaf tensors), so a native bridge
    is rebuilt from its config and given the state dict; other models are deep-copied.
    """
    if TransformerBridge is not None and isinstance(model, TransformerBridge):
        if getattr(model.cfg, "architecture", None) == "TransformerLensNative":
            new = TransformerBridge.boot_native(copy.deepcopy(model.cfg))
            new.load_state_dict(model.state_dict())
            device = model_device(model)
            if model_device(new) != device:
                new = new.to(device)
            return new.train(model.training)
    return copy.deepcopy(model)


# --------------------------------------------------------------------------------------------------
# Parameters: the set a sampler moves, the slots a functional call fills, and TransformerLens names.
#
# A bridge registers each weight under several module paths (the HF module and its TL alias), may keep
# weights its forward never reads (GPT-2's and NeoX's fused QKV besides the split q/k/v), and ties
# GPT-2's embedding and unembedding into one Parameter. We therefore key everything by the Parameter
# object: its canonical name is its first `named_parameters()` name, and a functional call fills every
# (module, attribute) slot that holds it.


def sampled_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Canonical name -> Parameter for every distinct trainable weight the forward uses, each once.

    On a TransformerLens model these are the Parameters of `state_dict(keep_vars=True)`, which lists
    exactly the weights the forward reads (no fused-QKV duplicate, a tied weight once). Any other module:
    its trainable `named_parameters()`.
    """
    canonical = {id(p): name for name, p in model.named_parameters()}
    if is_supported_model(model):
        tensors = model.state_dict(keep_vars=True).values()
        used = {id(t): t for t in tensors if isinstance(t, nn.Parameter) and t.requires_grad and id(t) in canonical}
    else:
        used = {id(p): p for p in model.parameters() if p.requires_grad}
    return {canonical[i]: p for i, p in used.items()}


def parameter_slots(model: nn.Module) -> dict[str, str]:
    """Slot name -> canonical name: one name per (module, attribute) holding a sampled Parameter.

    `torch.func.functional_call(model, {slot: tensor}, ..., tie_weights=False)` must fill each slot once:
    two aliases of one slot make torch restore the wrong tensor, and a tied weight has two slots.
    """
    canonical = {id(p): name for name, p in sampled_parameters(model).items()}
    slots: dict[tuple[int, str], str] = {}
    names: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in canonical:
            continue
        owner, _, attr = name.rpartition(".")
        key = (id(model.get_submodule(owner)), attr)
        if key not in slots:
            slots[key] = name
            names[name] = canonical[id(p)]
    return names


def tl_parameter_names(model: nn.Module) -> dict[str, str]:
    """TransformerLens name -> canonical name, for every sampled parameter (matched by identity).

    On a bridge the state-dict keys are TL names (`blocks.1.attn.q.weight`); on a HookedTransformer they
    coincide with the own names. A parameter with no state-dict key keeps its own name.
    """
    sampled = sampled_parameters(model)
    canonical = {id(p): name for name, p in sampled.items()}
    out = {key: canonical[id(t)] for key, t in model.state_dict(keep_vars=True).items() if id(t) in canonical}
    for name in set(sampled) - set(out.values()):
        out[name] = name
    return out


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
        raise InvalidValueError(f"Cannot read head {spec!r}: write it as 'l1h3' (layer 1, head 3) or (1, 3).")
    return head


def parse_heads(heads) -> list[tuple[int, int]]:
    """A list of heads (`parse_head` spellings: "l0h1", (0, 1), ...) as (layer, head) pairs: the one
    normalisation of a list of heads."""
    if isinstance(heads, str) or not hasattr(heads, "__iter__"):
        raise InvalidTypeError(f"heads={heads!r} must be a list of heads, e.g. ['l0h0', (1, 2)]; for one head write "
                               f"[{heads!r}].")
    return [parse_head(h) for h in heads]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's weights."""
    return next(model.parameters()).device


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
        raise InvalidValueError(
            f"Head {head_name(layer, head)} (layer={layer}, head={head}) does not exist: the model has "
            f"{cfg.n_layers} layers of {cfg.n_heads} heads (0-indexed)."
        )


def n_kv_heads(model: nn.Module) -> int:
    """Key/value heads per layer: fewer than query heads under grouped-query attention."""
    return getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads


def kv_head(model: nn.Module, head: int) -> int:
    """The key/value head that query head `head` reads: `head // (n_heads / n_kv)`."""
    return head // (model.cfg.n_heads // n_kv_heads(model))


def head_weights(model: nn.Module, layer: int, head: int) -> dict[str, torch.Tensor]:
    """Head (layer, head)'s weights as TransformerLens's own per-head views: W_Q `[d_model, d_head]`,
    W_O `[d_head, d_model]`, b_Q `[d_head]`, ... (biases only where the model has them). Under
    grouped-query attention W_K, W_V, b_K, b_V are those of the head's key/value group."""
    check_head(model, layer, head)
    attn = model.blocks[layer].attn
    out = {}
    for label in HEAD_PARAMS:
        view = getattr(attn, label, None)
        if view is None:
            continue
        index = head if view.shape[0] == model.cfg.n_heads else kv_head(model, head)
        out[label] = view[index]
    return out


def head_masks(model: nn.Module, layer: int, head: int) -> dict[str, torch.Tensor]:
    """Canonical name -> boolean mask of the coordinates behind `head_weights(model, layer, head)`.

    Read off TransformerLens's views rather than any storage layout: the mask is where the gradient of
    the head's views with respect to the sampled parameters is nonzero, so Linear, Conv1D, fused and
    HookedTransformer layouts need no special case.
    """
    return _view_masks(model, lambda: head_weights(model, layer, head).values())


def mlp_masks(model: nn.Module, layer: int, neurons: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Canonical name -> mask of the MLP of block `layer` (W_in, W_gate, b_in, W_out; b_out too when all
    neurons), or of only the given hidden neurons' rows and columns."""
    mlp = getattr(model.blocks[layer], "mlp", None)
    if mlp is None or getattr(model.cfg, "attn_only", False):
        raise InvalidValueError(f"Block {layer} has no MLP (the model is attention-only).")
    d_mlp = model.cfg.d_mlp
    index = list(range(d_mlp)) if neurons is None else list(neurons)
    bad = [n for n in index if not 0 <= n < d_mlp]
    if bad:
        raise InvalidValueError(f"MLP neurons {bad} do not exist in block {layer}: it has d_mlp={d_mlp} (0-indexed).")

    def views():
        for label in ("W_in", "W_gate", "W_out", "b_in", "b_out"):
            view = getattr(mlp, label, None)
            if view is None or (label == "b_out" and neurons is not None):
                continue
            yield view[..., index] if label in ("W_in", "W_gate", "b_in") else view[index] if label == "W_out" else view

    return _view_masks(model, views)


def _view_masks(model: nn.Module, views) -> dict[str, torch.Tensor]:
    params = sampled_parameters(model)
    with torch.enable_grad():
        total = sum(v.sum() for v in views())  # a view rearranges weights: slope 1 on each entry it reads
        grads = torch.autograd.grad(total, list(params.values()), allow_unused=True)
    masks = {name: g != 0 for name, g in zip(params, grads, strict=True) if g is not None}
    return {name: m for name, m in masks.items() if m.any()}


# --------------------------------------------------------------------------------------------------
# The language-model objective, shared by training, LLC estimation and behavioural metrics.


def token_cross_entropy(
    logits: Float[torch.Tensor, "batch pos vocab"], tokens: Int[torch.Tensor, "batch pos"]
) -> Float[torch.Tensor, "batch pos_minus_1"]:
    """Next-token cross-entropy at every position: entry [b, i] is the loss of predicting tokens[b, i+1]."""
    logprobs = logits[:, :-1].log_softmax(-1)
    return -logprobs.gather(-1, tokens[:, 1:, None]).squeeze(-1)


def mean_token_loss(logits: Float[torch.Tensor, "batch pos vocab"], tokens: Int[torch.Tensor, "batch pos"],
                    keep: torch.Tensor | None = None) -> torch.Tensor:
    """The mean next-token cross-entropy over the targets that count (`keep` [batch, pos-1]; None: all), as
    Hugging Face's loss averages over the tokens that are not padding."""
    losses = token_cross_entropy(logits, tokens)
    return losses.mean() if keep is None else torch.where(keep, losses, 0.0).sum() / keep.sum().clamp(min=1)


def bos_token_id(model: nn.Module) -> int:
    """The model's BOS token: its tokenizer's, else 0 (the convention of our data and tokenizer)."""
    tok = getattr(model, "tokenizer", None)
    bos = getattr(tok, "bos_token_id", None) if tok is not None else None
    return 0 if bos is None else int(bos)


def check_device(device: str | torch.device | None) -> None:
    """Raise a ValueError naming the option and the fix when `device` is not a usable torch device here."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InvalidValueError(f"device={device!r} is not a torch device ({e}); give e.g. 'cpu' or 'cuda'.") from None
    usable = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}.get(dev.type, lambda: True)
    if not usable():
        raise InvalidValueError(f"device={device!r}, but this machine's torch has no usable {dev.type.upper()}; "
                                f"use device='cpu' (--device cpu).")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InvalidValueError(f"device={device!r}, but this machine has {torch.cuda.device_count()} CUDA device(s).")
