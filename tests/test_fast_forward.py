"""The fast forward equals the TransformerLens forward, in logits and in gradients, on every family the sampler
supports: at the model's weights, under `functional_call` with swapped weights, from a cached residual stream,
and vmapped over stacked chains; unsupported architectures fall back (None, with the reason)."""

import pytest
import torch
from hf_models import FAMILIES, family_model
from torch import nn
from torch.func import functional_call, grad, vmap

from tl_devinterp.models import (
    ModelConfig,
    build_model,
    parameter_slots,
    sampled_parameters,
    token_cross_entropy,
)
from tl_devinterp.sampling.fast_forward import (
    check_fast_forward,
    fast_forward,
    precision_context,
    unsupported,
    verified_fast_forward,
)


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, tmp_path_factory):
    return family_model(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(1, 64, (4, 16), generator=torch.Generator().manual_seed(0))


class Loss(nn.Module):
    """The sampler's shape of objective: the model as the attribute `model`, a loss of a token batch."""

    def __init__(self, model, forward=None):
        super().__init__()
        self.model, self.forward_fn = model, forward or model

    def forward(self, tokens):
        return token_cross_entropy(self.forward_fn(tokens), tokens).mean()


def perturbed(model, scale=0.05, seed=1):
    """Slot -> a moved copy of its sampled parameter (as a chain's state), the slots a functional call fills."""
    g = torch.Generator().manual_seed(seed)
    params = sampled_parameters(model)
    moved = {n: (p.detach() + scale * torch.randn(p.shape, generator=g)).requires_grad_(True) for n, p in params.items()}
    return moved, {f"model.{slot}": moved[n] for slot, n in parameter_slots(model).items()}


def test_logits_and_gradients_equal_the_transformer_lens_forward(model, tokens):
    """Catches a wrong attention scale, rotary layout, GQA grouping, norm, activation, or a weight the fast
    forward reads but the TL forward does not (its gradient would be None in one forward only)."""
    forward = fast_forward(model)
    assert forward is not None, unsupported(model)
    torch.testing.assert_close(forward(tokens), model(tokens), rtol=0, atol=1e-5)
    assert check_fast_forward(model, forward, tokens) is None


def test_gradients_under_functional_call_with_swapped_weights(model, tokens):
    """Catches views read once at construction, or from the model's own Parameters instead of the swapped
    tensors: the gradients would be those at w*, or None."""
    forward = fast_forward(model)
    moved, values = perturbed(model)
    names = list(moved)
    losses = [functional_call(Loss(model, f), values, (tokens,), tie_weights=False, strict=False)
              for f in (forward, None)]
    ours, theirs = (torch.autograd.grad(loss, [moved[n] for n in names], allow_unused=True) for loss in losses)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)
    at_star = torch.autograd.grad(Loss(model, forward)(tokens), list(sampled_parameters(model).values()),
                                  allow_unused=True)
    moved_any = False
    for n, a, b, s in zip(names, ours, theirs, at_star, strict=True):
        assert (a is None) == (b is None), n
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * max(1.0, b.abs().max().item()), msg=n)
            moved_any |= not torch.allclose(a, s)
    assert moved_any  # the swapped weights, not w*, were used


def test_start_at_layer_continues_from_the_residual_stream(model, tokens):
    """Catches skipping the wrong blocks, re-adding embeddings, or losing the rotary positions past layer 0."""
    forward = fast_forward(model)
    resid = model.run_with_cache(tokens, names_filter="blocks.1.hook_resid_pre")[1]["blocks.1.hook_resid_pre"]
    torch.testing.assert_close(forward(None, start_at_layer=1, resid=resid), model(tokens), rtol=0, atol=1e-5)


def test_vmap_over_stacked_chains_gives_each_chains_gradient(model, tokens):
    """The batched-chains path: vmap(grad) of the fast forward over 3 stacked weight sets equals the TL
    forward's gradient chain by chain. Catches a view or op that breaks under vmap or mixes chains."""
    forward = fast_forward(model)
    slots = parameter_slots(model)
    chains = [perturbed(model, seed=s)[0] for s in range(3)]
    stacked = {n: torch.stack([c[n].detach() for c in chains]) for n in chains[0]}

    def loss(weights, objective):
        return functional_call(objective, {f"model.{s}": weights[n] for s, n in slots.items()}, (tokens,),
                               tie_weights=False, strict=False)

    batched = vmap(grad(loss), in_dims=(0, None))(stacked, Loss(model, forward))
    for c, chain in enumerate(chains):
        reference = grad(loss)({n: t.detach() for n, t in chain.items()}, Loss(model))
        for n, g in reference.items():
            torch.testing.assert_close(batched[n][c], g, rtol=1e-4, atol=1e-6 * max(1.0, g.abs().max().item()), msg=n)


@pytest.mark.parametrize("norm, act", [("LNPre", "relu"), ("RMS", "silu"), (None, "gelu_new")])
def test_other_norms_and_activations(norm, act, tokens):
    """Catches a weightless LNPre given weights, RMSNorm's eps or mean misplaced, a wrong activation map."""
    model = build_model(ModelConfig(n_layers=2, n_heads=4, d_model=32, n_ctx=16, d_vocab=64, attn_only=False,
                                    normalization_type=norm, act_fn=act))
    forward, reason = verified_fast_forward(model, tokens)
    assert forward is not None and reason == ""


def test_unsupported_architectures_fall_back_with_the_reason(tokens, monkeypatch):
    model = build_model(ModelConfig(n_layers=2, n_heads=4, d_model=32, n_ctx=32, d_vocab=64, attn_only=False))
    assert verified_fast_forward(model, tokens)[1] == ""
    for field, value in [("act_fn", "solu_ln"), ("positional_embedding_type", "alibi"), ("use_local_attn", True),
                         ("normalization_type", "LNPost")]:
        with monkeypatch.context() as m:
            m.setattr(model.cfg, field, value)
            forward, reason = verified_fast_forward(model, tokens)
            assert fast_forward(model) is None and forward is None
            assert f"{field}={value!r}" in reason


def test_the_check_rejects_a_forward_that_differs():
    """A forward off by a small logit scale, or with the right logits but halved gradients, is caught and
    measured: a check that compared only logits, or nothing, would pass one of them."""
    model = build_model(ModelConfig(n_layers=1, n_heads=2, d_model=16, n_ctx=8, d_vocab=16))
    x = torch.randint(0, 16, (2, 8), generator=torch.Generator().manual_seed(0))
    forward = fast_forward(model)
    assert "logits differ by 0.001" in check_fast_forward(model, lambda t: forward(t) * 1.001, x)

    def half_gradient(t):  # the same values, half the slope
        logits = forward(t)
        return logits.detach() + 0.5 * (logits - logits.detach())

    reason = check_fast_forward(model, half_gradient, x)
    assert "logits" not in reason and "differs by 0.5" in reason


def test_precision_is_a_no_op_on_the_cpu_and_named_when_wrong(tokens):
    model = build_model(ModelConfig(n_layers=1, n_heads=2, d_model=16, n_ctx=16, d_vocab=64))
    forward = fast_forward(model)
    reference = forward(tokens)
    for precision in ("fp32", "tf32", "bf16"):
        with precision_context(precision, "cpu"):
            assert torch.equal(forward(tokens), reference)
    with pytest.raises(ValueError, match="precision='fp16' is unknown"):
        with precision_context("fp16", "cpu"):
            pass
