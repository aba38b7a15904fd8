"""A logits-only forward for sampling, recomputed in plain torch from TransformerLens's own weight views.

SGLD needs the loss and its gradient, never a hook, yet the TransformerLens forward materialises every
attention pattern and runs every hook point. `fast_forward(model)` returns the same function of the same
weights without them: attention by `scaled_dot_product_attention(is_causal=True)` (a fused kernel on a GPU,
no [pos, pos] pattern kept for the backward on the flash/efficient paths), everything else a few matmuls.

The weights are read at call time through TL's views (`blocks[l].attn.W_Q`, `W_O`, `mlp.W_in`, `W_E`,
`W_U`, the norms' `w`/`b`), never copied: under `torch.func.functional_call(..., tie_weights=False)` with
swapped parameters the views are recomputed from the swapped tensors (a bridge derives them from its HF
weights, a HookedTransformer's views are its Parameters), so gradients reach the sampled parameters, and
`torch.func.vmap` over stacked parameters batches chains through it.

Supported: learned absolute positions (GPT-2, native bridges, HookedTransformer) and rotary positions
(GPT-NeoX/Pythia with partial rotary, Llama), LayerNorm, RMSNorm and their weightless "Pre" forms,
sequential or parallel (NeoX) attention and MLP, gated MLPs, grouped-query attention, and the activations
in `ACTIVATIONS`. Anything else (`unsupported` names it) gets None, and callers keep the TL forward.
`verified_fast_forward` also compares logits and gradients with the TL forward once, so an architecture
detail this module misses falls back with the measured difference instead of biasing an estimate.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import nn

from ..errors import InvalidValueError
from ..models import n_kv_heads, sampled_parameters, token_cross_entropy

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}
"""TransformerLens `cfg.act_fn` -> the function it names."""

PRECISIONS = ("fp32", "tf32", "bf16")
"""`precision`: float32; float32 storage with TF32 matmuls; bfloat16 autocast. TF32 and bf16 act on CUDA only."""

NORMS = ("LN", "LNPre", "RMS", "RMSPre", None)

# Config fields whose non-default values change the forward in ways this module does not reproduce.
_MUST_BE = dict(
    attention_dir="causal", use_local_attn=False, scale_attn_by_inverse_layer_idx=False, use_qk_norm=False,
    post_embedding_ln=False, scale_embedding=None, attn_scores_soft_cap=-1.0, output_logits_soft_cap=-1.0,
    use_NTK_by_parts_rope=False, rotary_adjacent_pairs=False, rmsnorm_uses_offset=False, num_experts=None,
    use_normalization_before_and_after=False, attn_types=None, per_layer_head_dim=None,
    per_layer_num_key_value_heads=None, is_multimodal=False, use_split_qkv_input=False,
)


def unsupported(model: nn.Module) -> str | None:
    """Why `fast_forward` cannot reproduce `model` (one line), or None when it can."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(model, "blocks"):
        return f"{type(model).__name__} is not a TransformerLens model"
    bad = [f"{k}={getattr(cfg, k)!r}" for k, v in _MUST_BE.items() if getattr(cfg, k, None) not in (v, None)]
    pos = getattr(cfg, "positional_embedding_type", "standard")
    if pos not in ("standard", "rotary"):
        bad.append(f"positional_embedding_type={pos!r}")
    if pos == "rotary" and _rotary_source(model) is None:
        bad.append("rotary positions without a rotary module (rotary_emb) or rotary_cos/rotary_sin buffers")
    if cfg.normalization_type not in NORMS:
        bad.append(f"normalization_type={cfg.normalization_type!r}")
    if not getattr(cfg, "attn_only", False) and cfg.act_fn not in ACTIVATIONS:
        bad.append(f"act_fn={cfg.act_fn!r}")
    return f"fast forward unsupported: {', '.join(bad)}" if bad else None


def fast_forward(model: nn.Module, sdpa: bool = True) -> Callable | None:
    """`forward(tokens, start_at_layer=None, resid=None) -> logits` equal to `model(tokens)` (or to
    `model(resid, start_at_layer=layer)`), or None when `unsupported(model)`. `sdpa=False` writes attention
    out (scores, causal mask, softmax): what `torch.func.vmap` batches on a CPU, where the fused kernel has
    no batching rule."""
    if unsupported(model) is not None:
        return None
    cfg = model.cfg
    act = None if getattr(cfg, "attn_only", False) else ACTIVATIONS[cfg.act_fn]
    scale = 1.0 / (math.sqrt(cfg.d_head) if cfg.attn_scale in (-1, None) else cfg.attn_scale) if cfg.use_attn_scale else 1.0
    group = cfg.n_heads // n_kv_heads(model)
    rotary = _rotary_source(model) if cfg.positional_embedding_type == "rotary" else None
    # An HF embedding with padding_idx (Llama's pad_token_id, often = BOS) gives that row no gradient
    pad = next((m.padding_idx for m in model.embed.modules() if isinstance(m, nn.Embedding)), None)

    def norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if cfg.normalization_type is None:
            return x
        w, b = _view(module, "w"), _view(module, "b")
        if cfg.normalization_type.startswith("LN"):
            return F.layer_norm(x, x.shape[-1:], w, b, cfg.eps)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.eps)  # RMSNorm
        return x if w is None else x * w

    def heads(x, W, b):  # x [batch pos d_model], W [heads d_model d_head] -> [batch heads pos d_head]
        out = x @ einops.rearrange(W, "h d e -> d (h e)")
        if b is not None:
            out = out + einops.rearrange(b, "h e -> (h e)")
        return einops.rearrange(out, "b p (h e) -> b h p e", h=W.shape[0])

    def attention(attn: nn.Module, x, cos_sin):
        q, k, v = (heads(x, _view(attn, f"W_{c}"), _view(attn, f"b_{c}")) for c in "QKV")
        if cos_sin is not None:  # rotary on the first rotary_dim coordinates of each query and key
            q, k = _rotate(q, *cos_sin), _rotate(k, *cos_sin)
        if group > 1:  # grouped-query attention: each key/value head serves `group` query heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        if sdpa:
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:
            scores = (q @ k.transpose(-1, -2)) * scale
            future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
            z = scores.masked_fill(future, float("-inf")).softmax(-1) @ v
        out = einops.rearrange(z, "b h p e -> b p (h e)") @ einops.rearrange(_view(attn, "W_O"), "h e d -> (h e) d")
        b_O = _view(attn, "b_O")
        return out if b_O is None else out + b_O

    def mlp(block: nn.Module, x):
        W_in, b_in, W_gate, W_out, b_out = (_view(block.mlp, n) for n in ("W_in", "b_in", "W_gate", "W_out", "b_out"))
        pre = x @ W_in if b_in is None else x @ W_in + b_in
        hidden = act(pre) if W_gate is None else act(x @ W_gate) * pre
        return hidden @ W_out if b_out is None else hidden @ W_out + b_out

    def forward(tokens: Int[torch.Tensor, "batch pos"] | None = None, start_at_layer: int | None = None,
                resid: Float[torch.Tensor, "batch pos d_model"] | None = None) -> Float[torch.Tensor, "batch pos vocab"]:
        # 1. The residual stream: embeddings (+ learned positions), or the given stream before block start_at_layer.
        if start_at_layer is None:
            x = F.embedding(tokens, _view(model.embed, "W_E"), padding_idx=pad)  # the pad row gets no gradient
            if cfg.positional_embedding_type == "standard":
                x = x + _view(model.pos_embed, "W_pos")[: tokens.shape[-1]]
        else:
            x = resid
        cos_sin = rotary(x) if rotary is not None else None
        # 2. The blocks: pre-norm attention and MLP, in sequence or (NeoX) in parallel on the same input.
        for layer in range(start_at_layer or 0, cfg.n_layers):
            block = model.blocks[layer]
            a = attention(block.attn, norm(block.ln1, x), cos_sin)
            if act is None:
                x = x + a
            elif getattr(cfg, "parallel_attn_mlp", False):
                x = x + a + mlp(block, norm(block.ln2, x))
            else:
                x = x + a
                x = x + mlp(block, norm(block.ln2, x))
        # 3. Final norm and unembedding; logits in float32 whatever the autocast.
        b_U = _view(model.unembed, "b_U")
        logits = norm(model.ln_final, x) @ _view(model.unembed, "W_U")
        return (logits if b_U is None else logits + b_U).float()

    return forward


def _view(module: nn.Module, name: str) -> torch.Tensor | None:
    """TransformerLens's view `module.<name>` (None where the model has none), read now.

    A bridge resolves its plain aliases (a norm's `w`/`b`, an MLP's `b_in`/`b_out`) once at setup, to the
    tensor then in place, so under `functional_call` they would still name the original weights. Those are
    followed along the bridge's own alias path at call time; views that are properties (W_Q, W_in, ...)
    and a HookedTransformer's Parameters are read directly."""
    target = getattr(module, "_property_alias_registry", {}).get(name)
    if target is None or isinstance(getattr(type(module), name, None), property):
        return getattr(module, name, None)
    for part in target.split("."):
        module = getattr(module, part, None)
    return module


def _rotary_source(model: nn.Module) -> Callable | None:
    """`cos_sin(x) -> (cos, sin)`, each [pos, rotary_dim]: the bridge's own rotary module (so partial rotary,
    rope scaling and its base come from the model), or a HookedTransformer's rotary_cos/rotary_sin buffers."""
    module = getattr(model, "rotary_emb", None)
    if module is not None:
        def from_module(x):
            positions = torch.arange(x.shape[-2], device=x.device)[None]
            cos, sin = module(x, positions)
            return cos[0].to(x.dtype), sin[0].to(x.dtype)
        return from_module
    attn = model.blocks[0].attn
    if hasattr(attn, "rotary_cos") and hasattr(attn, "rotary_sin"):
        return lambda x: (attn.rotary_cos[: x.shape[-2]].to(x.dtype), attn.rotary_sin[: x.shape[-2]].to(x.dtype))
    return None


def _rotate(x: Float[torch.Tensor, "batch head pos d_head"], cos, sin) -> torch.Tensor:
    """NeoX-style rotary (halves rotated against each other) on the first cos.shape[-1] coordinates."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    half1, half2 = rot[..., : r // 2], rot[..., r // 2:]
    rot = rot * cos + torch.cat([-half2, half1], dim=-1) * sin
    return torch.cat([rot, rest], dim=-1) if rest.shape[-1] else rot


# --------------------------------------------------------------------------------------------------
# The one-time check against the TransformerLens forward, and the precision the forward runs at.


def check_fast_forward(model: nn.Module, forward: Callable, tokens: Int[torch.Tensor, "batch pos"],
                       rtol: float = 1e-4) -> str | None:
    """None when `forward(tokens)` equals `model(tokens)` and the loss gradients w.r.t. every sampled
    parameter agree, each within `rtol` of the reference's largest entry; else a one-line reason with the
    measured differences. Runs in the model's dtype, whatever the precision used later."""
    params = sampled_parameters(model)
    with torch.enable_grad():
        ours, theirs = forward(tokens), model(tokens)
        grads = [torch.autograd.grad(token_cross_entropy(out, tokens).mean(), list(params.values()), allow_unused=True)
                 for out in (ours, theirs)]
    problems = []
    logit_diff = (ours - theirs).abs().max().item() / max(theirs.abs().max().item(), 1e-12)
    if not logit_diff <= rtol:
        problems.append(f"logits differ by {logit_diff:.2g} (relative)")
    # Each parameter's gradient against its own scale, floored at 1e-3 of the largest: a gradient that is
    # zero in exact arithmetic (a key bias under softmax) is rounding noise in both forwards.
    floor = 1e-3 * max((g.abs().max().item() for g in grads[1] if g is not None), default=0.0)
    worst, name = 0.0, ""
    for n, g_ours, g_theirs in zip(params, *grads, strict=True):
        if (g_ours is None) != (g_theirs is None):
            return f"fast forward mismatch: the gradient of {n} is None in one forward only"
        if g_ours is not None:
            diff = (g_ours - g_theirs).abs().max().item() / max(g_theirs.abs().max().item(), floor, 1e-12)
            if not diff <= worst:
                worst, name = diff, n
    if not worst <= rtol:
        problems.append(f"gradient of {name} differs by {worst:.2g} (relative)")
    return f"fast forward mismatch: {'; '.join(problems)}" if problems else None


def verified_fast_forward(model: nn.Module, tokens: Int[torch.Tensor, "batch pos"], rtol: float = 1e-4,
                          sdpa: bool = True) -> tuple[Callable | None, str]:
    """`(forward, "")` when the fast forward reproduces `model` on `tokens` (`check_fast_forward`), else
    `(None, reason)`: the caller keeps the TL forward and records the reason (LLCResult.forward)."""
    forward = fast_forward(model, sdpa)
    if forward is None:
        return None, unsupported(model)
    problem = check_fast_forward(model, forward, tokens, rtol)
    return (None, problem) if problem else (forward, "")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise InvalidValueError(f"precision={precision!r} is unknown; choose one of {list(PRECISIONS)} (SGLDConfig.precision).")


@contextlib.contextmanager
def precision_context(precision: str, device: str | torch.device) -> Iterator[None]:
    """Run the enclosed forward and backward at `precision`: "fp32" as is; "tf32" lets CUDA matmuls use
    TF32 (restored on exit); "bf16" autocasts CUDA ops to bfloat16 (weights and gradients stay float32).
    On a CPU every precision is float32: the context does nothing there."""
    check_precision(precision)
    if torch.device(device).type != "cuda" or precision == "fp32":
        yield
    elif precision == "tf32":
        before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    else:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
