"""The sampler on every architecture family TransformerLens loads: native bridges (attention-only and with
MLPs), TL 3.x's HookedTransformer (in the TL 3.9 environment), GPT-2 (fused QKV Conv1D, tied embeddings), GPT-NeoX (fused QKV, rotary) and Llama (grouped-query
attention), all booted offline; and the SGLD update itself (noise, diagnostics)."""

import math
import warnings

import pytest
import torch
from hf_models import FAMILIES, family_model, hf_model
from torch import nn

from tl_devinterp.models import (
    HookedTransformer,
    head_masks,
    head_weights,
    kv_head,
    n_kv_heads,
    sampled_parameters,
)
from tl_devinterp.sampling import SamplerWarning, estimate_head_llcs, estimate_llc, resolve_restriction

FAST = dict(num_chains=2, num_draws=4, num_burnin=1, batch_size=8)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(name, TL model, its HF model's parameter count or None)."""
    name = request.param
    model = family_model(name, tmp_path_factory.mktemp(name))
    return name, model, None if name in ("native", "native-mlp", "hooked") else sum(
        p.numel() for p in hf_model(name).parameters())


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(1, 64, (32, 16), generator=torch.Generator().manual_seed(0))


def test_sampled_set_is_each_used_weight_once(family, tokens):
    name, model, hf_count = family
    r = estimate_llc(model, tokens, progress=False, **FAST)
    d = sum(p.numel() for p in sampled_parameters(model).values())
    assert r.d == d
    if hf_count is not None:  # no fused-QKV duplicate, GPT-2's tied embedding once
        extra = model.cfg.d_vocab if HookedTransformer is not None else 0  # TL 3.9's bridges add an unembedding bias
        assert r.d == hf_count + extra
    else:
        assert r.d == sum(p.numel() for p in model.state_dict(keep_vars=True).values() if isinstance(p, nn.Parameter))


def test_head_weights_are_transformer_lens_views(family):
    _, model, _ = family
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            w = head_weights(model, layer, head)
            attn = model.blocks[layer].attn
            assert torch.equal(w["W_O"], attn.W_O[head]) and torch.equal(w["W_Q"], attn.W_Q[head])
            assert torch.equal(w["W_K"], attn.W_K[kv_head(model, head) if attn.W_K.shape[0] < model.cfg.n_heads else head])


def test_head_mask_moves_exactly_that_heads_views(family):
    """Perturbing a head's masked coordinates changes its Q/O and its K/V (group) views, no other head's Q/O,
    and K/V only of heads sharing its group. A swapped or transposed slice fails here."""
    _, model, _ = family
    layer, head = 1, 2
    masks = head_masks(model, layer, head)
    params = sampled_parameters(model)
    before = {h: {k: v.detach().clone() for k, v in head_weights(model, layer, h).items()} for h in range(model.cfg.n_heads)}
    saved = {n: params[n].detach().clone() for n in masks}
    x = torch.randint(1, 64, (1, 12), generator=torch.Generator().manual_seed(1))
    pattern = model.run_with_cache(x, names_filter=f"blocks.{layer}.attn.hook_pattern")[1][f"blocks.{layer}.attn.hook_pattern"]
    try:
        with torch.no_grad():
            for n, m in masks.items():
                params[n][m] += 1.0
        # What the model computes: the attention patterns that move are those of the heads reading this K.
        new = model.run_with_cache(x, names_filter=f"blocks.{layer}.attn.hook_pattern")[1][f"blocks.{layer}.attn.hook_pattern"]
        moved = {h for h in range(model.cfg.n_heads) if not torch.allclose(new[0, h], pattern[0, h])}
        group = model.cfg.n_heads // n_kv_heads(model)
        assert moved == {h for h in range(model.cfg.n_heads) if h // group == head // group}
        for h in range(model.cfg.n_heads):
            after = head_weights(model, layer, h)
            changed = {k for k in after if not torch.equal(after[k], before[h][k])}
            same_group = kv_head(model, h) == kv_head(model, head)
            expected = set(after) if h == head else {k for k in after if k[-1] in "KV"} if same_group else set()
            assert changed == expected, (h, changed)
    finally:
        with torch.no_grad():
            for n, t in saved.items():
                params[n].copy_(t)
    d_head, d_model = model.cfg.d_head, model.cfg.d_model
    group = model.cfg.n_heads // n_kv_heads(model)
    per_head = 4 * d_model * d_head + sum(head_weights(model, layer, head)[b].numel() for b in ("b_Q", "b_K", "b_V")
                                          if b in head_weights(model, layer, head))
    assert sum(int(m.sum()) for m in masks.values()) == per_head
    if group > 1:  # the group restriction: every head's Q/O, the group's K/V once
        assert resolve_restriction(model, "l1g0").d == group * 2 * d_model * d_head + 2 * d_model * d_head
        assert "shared" in resolve_restriction(model, "l1h2").note


def test_callers_model_is_untouched_also_after_a_failure(family, tokens):
    _, model, _ = family
    x = tokens[:2]
    logits = model(x).detach().clone()
    objects = list(model.parameters())
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    estimate_llc(model, tokens, restrict="l1h1", progress=False, **FAST)
    calls = []

    def failing(m, batch):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("boom")
        return m(batch, return_type="loss")

    with pytest.raises(RuntimeError, match="boom"):
        estimate_llc(model, tokens, loss_fn=failing, progress=False, **FAST)
    assert torch.equal(model(x), logits)
    assert all(a is b for a, b in zip(objects, model.parameters(), strict=True))
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())


def test_restricted_chains_move_only_their_coordinates(family, tokens):
    _, model, _ = family
    r = estimate_llc(model, tokens, restrict="l0h3", progress=False, **FAST)
    masks, params = head_masks(model, 0, 3), sampled_parameters(model)
    assert set(r.final_params) == set(masks)
    for n, final in r.final_params.items():
        star = params[n].detach()
        assert torch.equal(final[:, ~masks[n]], star[~masks[n]].expand(2, -1))
        assert not torch.equal(final[:, masks[n]], star[masks[n]].expand(2, -1))


def test_mlp_restrictions(family):
    name, model, _ = family
    if name == "native":
        with pytest.raises(ValueError, match="no MLP"):
            resolve_restriction(model, "l1.mlp")
        return
    mlp = model.blocks[1].mlp
    views = [v for v in (getattr(mlp, k, None) for k in ("W_in", "W_gate", "W_out", "b_in", "b_out")) if v is not None]
    assert resolve_restriction(model, "l1.mlp").d == sum(v.numel() for v in views)
    per_neuron = sum(v.numel() // model.cfg.d_mlp for v in views if model.cfg.d_mlp in v.shape and v is not getattr(mlp, "b_out", None))
    assert resolve_restriction(model, "l1.mlp[0:4]").d == 4 * per_neuron
    assert resolve_restriction(model, "l1.mlp[1,3]").d == 2 * per_neuron


def test_head_llcs_on_every_family(family, tokens):
    _, model, _ = family
    frame = estimate_head_llcs(model, tokens, heads=["l0h0", (1, 3)], progress=False, **FAST)
    single = estimate_llc(model, tokens, restrict="l1h3", progress=False, **FAST)
    assert frame.llc_mean.iloc[1] == pytest.approx(single.mean, rel=1e-5)
    assert {"regime", "likelihood_fraction", "acceptance"} <= set(frame.columns)
    with pytest.raises(TypeError, match="list of heads"):
        estimate_head_llcs(model, tokens, heads="l0h0", **FAST)


class Linear(nn.Module):
    """y = W x with MSE on identity inputs: a regular model with d = m·n."""

    def __init__(self, m, n):
        super().__init__()
        self.main = nn.Linear(m, n, bias=False)
        self.loss_fn = nn.MSELoss(reduction="sum")

    def forward(self, x):
        return self.main(x)


def test_noise_keeps_prior_only_chains_at_the_prior_radius():
    """With a vanishing likelihood, chains are an Ornstein-Uhlenbeck process around w* whose stationary
    ‖w − w*‖ is √(d·ε/(1 − (1 − εγ/2)²)) ≈ √(d/γ). Removing the noise (or scaling it by ε instead of √ε)
    leaves the chains at w*."""
    torch.manual_seed(0)
    model = Linear(20, 20)
    x = torch.eye(20)
    data = (x, model(x).detach())
    eps, gamma = 1e-3, 100.0
    with pytest.warns(SamplerWarning, match="prior-dominated"):
        r = estimate_llc(model, data, epsilon=eps, gamma=gamma, nbeta=1e-6, num_chains=4, num_draws=200,
                         num_burnin=200, batch_size=20, progress=False)
    expected = math.sqrt(r.d * eps / (1 - (1 - eps * gamma / 2) ** 2))
    assert r.diagnostics.distance == pytest.approx(expected, rel=0.1)
    assert r.diagnostics.prior_radius == pytest.approx(math.sqrt(400 / gamma))
    assert r.diagnostics.regime == "prior" and r.diagnostics.likelihood_fraction < 0.05


def test_likelihood_dominated_chains_are_reported_so():
    torch.manual_seed(0)
    model = Linear(5, 5)
    x = torch.eye(5)
    data = (x, model(x).detach())
    with warnings.catch_warnings():
        warnings.simplefilter("error", SamplerWarning)  # mixed (R-hat 1.004, bulk ESS 386): no warning
        r = estimate_llc(model, data, epsilon=1e-3, gamma=1.0, nbeta=100.0, num_chains=4, num_draws=1000,
                         num_burnin=500, batch_size=5, progress=False)
    assert r.diagnostics.regime == "likelihood" and r.diagnostics.likelihood_fraction > 0.9
    assert r.diagnostics.distance < 0.2 * r.diagnostics.prior_radius
    assert 0.5 < r.diagnostics.acceptance <= 1.0 and r.mean == pytest.approx(12.5, rel=0.25)


def test_sampling_runs_the_fast_forward_to_the_tl_forwards_numbers(family, tokens):
    """On every family the sampler takes the fast forward (a family it silently misses would keep the slow
    path) and gives the TL forward's numbers, full model and a head of the upper layer (the cached-residual
    shortcut); a hook on a hook point sends sampling back to the TL forward, which runs it."""
    _, model, _ = family
    for restrict in (None, "l1h1"):
        fast = estimate_llc(model, tokens, restrict=restrict, progress=False, **FAST)
        slow = estimate_llc(model, tokens, restrict=restrict, fast_forward=False, progress=False, **FAST)
        assert fast.forward == "fast" and slow.forward == "model: fast_forward=False"
        assert torch.allclose(fast.loss_trace, slow.loss_trace, rtol=1e-4, atol=1e-5)
    calls = []
    model.add_hook("blocks.0.hook_resid_pre", lambda x, hook: calls.append(1))
    try:
        hooked = estimate_llc(model, tokens, progress=False, **FAST)
    finally:
        model.reset_hooks()
    assert hooked.forward.startswith("model: hooks") and calls
