"""Chains run stacked (one vmapped forward+backward per stack, `SGLDConfig.max_batched`) give the numbers
they give one at a time: traces, λ̂, diagnostics and final weights, for the whole model, a head, every
head of both layers (the shortcut from a cached residual stream included), and the three samplers; on a
native bridge and a Hugging Face (GPT-2) bridge. A model vmap cannot batch runs chain by chain."""

import dataclasses

import pandas as pd
import pytest
import torch
from hf_models import boot, save_tiny_hf

from tl_devinterp.models import ModelConfig, build_model
from tl_devinterp.sampling import SAMPLERS, SGLDConfig, estimate_head_llcs, estimate_llc
from tl_devinterp.sampling.diagnostics import ChainStats
from tl_devinterp.sampling.samplers import Chains, drift_

FAST = dict(num_chains=3, num_draws=5, num_burnin=2, batch_size=8, progress=False)
CLOSE = dict(rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module", params=["native", "gpt2"])
def model(request, tmp_path_factory):
    if request.param == "native":
        return build_model(ModelConfig(n_layers=2, n_heads=4, d_model=32, n_ctx=32, d_vocab=64, attn_only=True))
    return boot(save_tiny_hf("gpt2", tmp_path_factory.mktemp("gpt2")))


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(1, 64, (32, 16), generator=torch.Generator().manual_seed(0))


def assert_same_estimate(a, b):
    torch.testing.assert_close(a.loss_trace, b.loss_trace, **CLOSE)
    torch.testing.assert_close(a.init_losses, b.init_losses)
    assert a.per_chain == pytest.approx(b.per_chain, rel=1e-4, abs=1e-4)
    for name in ("loss_increase", "distance", "likelihood_fraction", "acceptance", "trace_drift"):
        assert getattr(a.diagnostics, name) == pytest.approx(getattr(b.diagnostics, name), rel=1e-4, abs=1e-5, nan_ok=True), name
    assert set(a.final_params) == set(b.final_params)
    for n in a.final_params:
        torch.testing.assert_close(a.final_params[n], b.final_params[n], **CLOSE)


@pytest.mark.parametrize("restrict", [None, "l1h2"])
def test_stacked_chains_equal_chains_one_at_a_time(model, tokens, restrict):
    """Catches: one generator (or one noise draw) shared by a stack, a chain's row evaluated at another
    chain's weights, per-chain norms reduced over the whole stack, a mask of another head."""
    stacked = estimate_llc(model, tokens, restrict=restrict, **FAST)
    alone = estimate_llc(model, tokens, restrict=restrict, max_batched=1, **FAST)
    assert stacked.batched and not alone.batched
    assert len(set(stacked.per_chain.tolist())) == FAST["num_chains"]  # the chains differ: each its own noise
    assert_same_estimate(stacked, alone)


def test_head_llcs_stacked_across_heads_and_layers(model, tokens):
    """Every head of both layers (layer 1's from the cached residual stream on the native bridge), stacked
    per layer, in stacks that split a head's chains (max_batched=5 with 3 chains), equal one at a time."""
    heads = ["l0h0", "l0h3", "l1h1", "l1h2"]
    frames = [estimate_head_llcs(model, tokens, heads=heads, max_batched=m, **FAST) for m in (16, 5, 1)]
    for frame in frames[1:]:
        pd.testing.assert_frame_equal(frames[0], frame, rtol=1e-4, atol=1e-5)
    assert frames[0].llc_mean.nunique() == len(heads)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_update_rules_move_each_chain_of_a_stack_as_alone(sampler):
    """Three steps of a stack of two chains (different d, states and gradients) equal each chain's steps
    alone. Catches an SGNHT thermostat or an RMSprop average shared by the chains of a stack."""
    config = SGLDConfig(sampler=sampler, epsilon=0.05, gamma=2.0, nbeta=3.0, diffusion=0.5)
    g = torch.Generator().manual_seed(0)
    w_star, start = torch.randn(6, generator=g), torch.randn(2, 6, generator=g)
    steps = [(torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g)) for _ in range(3)]  # grad, noise

    def run(rows, d):
        chains = Chains(weights=start[rows].clone(), generators=[], d=torch.tensor(d), stats=ChainStats(len(rows)))
        for grad, noise in steps:
            SAMPLERS[sampler](chains, drift_(chains.weights - w_star, grad[rows], config), noise[rows], config)
        return chains.weights

    torch.testing.assert_close(run([0, 1], [6.0, 2.0]), torch.cat([run([0], [6.0]), run([1], [2.0])]))


@pytest.mark.parametrize("sampler", ["sgnht", "rmsprop_sgld"])
def test_stateful_samplers_stacked_equal_one_at_a_time(tokens, sampler):
    """The samplers' state (momenta, thermostats, running averages) kept per row through a whole run."""
    model = build_model(ModelConfig(n_layers=2, n_heads=2, d_model=16, n_ctx=16, d_vocab=64))
    hp = dict(FAST, sampler=sampler, epsilon=1e-4)
    assert_same_estimate(estimate_llc(model, tokens, **hp), estimate_llc(model, tokens, max_batched=1, **hp))


def test_a_model_vmap_cannot_batch_runs_chain_by_chain(tokens, recwarn):
    """A hook that reads a value out (`.item()`, which vmap refuses) makes the stack fall back, silently, to
    one chain at a time, with the same numbers; the result says which path ran."""
    model = build_model(ModelConfig(n_layers=2, n_heads=2, d_model=16, n_ctx=16, d_vocab=64))
    seen = []
    model.blocks[1].hook_resid_pre.add_hook(lambda x, hook: seen.append(x.abs().max().item()) or x)
    try:
        fallback = estimate_llc(model, tokens, restrict="l0h1", **FAST)
        alone = estimate_llc(model, tokens, restrict="l0h1", max_batched=1, **FAST)
    finally:
        model.reset_hooks()
    assert not fallback.batched and seen
    assert not [w for w in recwarn if "vmap" in str(w.message)]
    assert_same_estimate(fallback, alone)
    assert estimate_llc(model, tokens, restrict="l0h1", **FAST).batched  # without the hook: stacked


def test_max_batched_is_validated_and_no_part_of_the_results_key():
    with pytest.raises(ValueError, match=r"'max_batched' option of SGLDConfig must be >= 1"):
        SGLDConfig(max_batched=0)
    with pytest.raises(TypeError, match=r"'max_batched' option of SGLDConfig must be an integer"):
        SGLDConfig(max_batched=2.5)
    config = SGLDConfig()
    assert config.to_dict() == dataclasses.replace(config, max_batched=1).to_dict()  # stored results stay valid
    assert "max_batched" not in config.to_dict()


def test_fast_forward_and_precision_are_validated_and_only_precision_keys_results():
    with pytest.raises(ValueError, match=r"precision='fp16' is unknown.*SGLDConfig.precision"):
        SGLDConfig(precision="fp16")
    with pytest.raises(TypeError, match=r"'fast_forward' option of SGLDConfig must be true or false"):
        SGLDConfig(fast_forward="yes")
    config = SGLDConfig()
    assert config.to_dict() == dataclasses.replace(config, fast_forward=False).to_dict()  # same numbers
    assert config.to_dict() != dataclasses.replace(config, precision="bf16").to_dict()  # other numbers on a GPU
