"""A devinterp user at home: devinterp's data columns, restriction strings, per-token losses and summary keys,
and the results as xarray / ArviZ hold them."""

import arviz as az
import numpy as np
import pytest
import torch
from datasets import Dataset

from tl_devinterp.data import repeated_random_tokens
from tl_devinterp.models import ModelConfig, build_model, token_cross_entropy
from tl_devinterp.sampling import estimate_llc, resolve_restriction

FAST = dict(num_chains=2, num_draws=6, num_burnin=2, batch_size=8)


@pytest.fixture(scope="module")
def model():
    return build_model(ModelConfig(n_layers=2, n_heads=2, d_model=16, n_ctx=16, d_vocab=16, attn_only=False))


@pytest.fixture(scope="module")
def tokens():
    return repeated_random_tokens(32, 5, 16)


def test_transformerlens_tokens_column(model, tokens):
    """Catches: a `tokenize_and_concatenate` dataset (column "tokens") rejected or read as other rows."""
    ours = estimate_llc(model, tokens, **FAST)
    assert estimate_llc(model, Dataset.from_dict({"tokens": tokens.tolist()}), **FAST).mean == ours.mean
    with pytest.raises(ValueError, match="no token column 'input_ids' or 'tokens'"):
        estimate_llc(model, Dataset.from_dict({"text": ["a"] * 8}), **FAST)


@pytest.mark.parametrize("devinterp, ours", [
    ("l0 attn", "blocks.0.attn.*"), ("l1 mlp", "l1.mlp"), ("l0", "layer0"), ("L1 H0", "l1h0"), ("l0 g1", "l0g1"),
    ("full", None), (["l0 h1", "l1 mlp"], ["l0h1", "l1.mlp"]),
])
def test_devinterp_restriction_strings(model, devinterp, ours):
    """Catches: a devinterp restriction string refused, or read as other coordinates than our spelling."""
    a, b = resolve_restriction(model, devinterp), resolve_restriction(model, ours)
    assert a.label == b.label and a.d == b.d and a.masks.keys() == b.masks.keys()
    assert all((m is None and b.masks[n] is None) or torch.equal(m, b.masks[n]) for n, m in a.masks.items())
    if ours == "blocks.0.attn.*":
        assert 0 < a.d < resolve_restriction(model, "l0").d
    with pytest.raises(ValueError, match="'full' with other"):
        resolve_restriction(model, ["full", "l0"])


def test_per_token_loss_is_reduced(model, tokens):
    """Catches: devinterp's per-token loss `(model, input_ids) -> [batch, seq-1]` (and its `(loss, info)` pair)
    raising a torch error or being reduced to another value than the scalar loss."""
    scalar = estimate_llc(model, tokens, loss_fn=lambda m, b: token_cross_entropy(m(b), b).mean(), **FAST)
    per_token = estimate_llc(model, tokens, loss_fn=lambda m, b: token_cross_entropy(m(b), b), **FAST)
    pair = estimate_llc(model, tokens, loss_fn=lambda m, b: (token_cross_entropy(m(b), b), {}), **FAST)
    assert per_token.mean == pytest.approx(scalar.mean, rel=1e-5) and pair.mean == pytest.approx(scalar.mean, rel=1e-5)


def test_summary_keys_and_ecosystem_views(model, tokens):
    """Catches: devinterp's `result["llc/mean"]` / `result["llc_mean"]` failing; xarray/ArviZ views whose dims,
    values or statistics differ from the result's own trace."""
    r = estimate_llc(model, tokens, **FAST)
    assert r["llc_mean"] == r["llc/mean"] == r.mean and r["llc/std"] == r.std and r["llc_se"] == r.se
    assert np.allclose(r["llc/trace"], r.llc_trace.numpy()) and r["loss/trace"].shape == (2, 6)
    with pytest.raises(KeyError, match="llc_mean"):
        r["lambda"]
    ds = r.to_xarray()
    assert ds["llc"].dims == ("chain", "draw") and ds.sizes == {"chain": 2, "draw": 6}
    assert float(ds["llc"].mean()) == pytest.approx(r.mean) and ds.attrs["restrict"] == "all"
    assert np.allclose(ds["loss"] - ds["init_loss"], r.loss_trace - r.init_losses)
    idata = r.to_inference_data()
    assert float(idata.posterior["llc"].mean()) == pytest.approx(r.mean)
    assert float(az.rhat(idata)["llc"]) == pytest.approx(float(az.rhat(r.llc_trace.numpy())))
    assert {"loss", "distance", "acceptance"} <= set(idata.sample_stats.data_vars)
    assert np.array_equal(idata.sample_stats["distance"], r.trace["distance"])


def test_steps_between_draws_thin_the_draws(model, tokens):
    """Catches: steps between draws that only thin observables (λ̂ still averaging every step), or that
    shift the chain (its batches or noise) instead of keeping every k-th state of the same chain."""
    every = estimate_llc(model, tokens, **{**FAST, "num_draws": 12})
    thinned = estimate_llc(model, tokens, steps_between_draws=2, **FAST)
    assert torch.equal(thinned.loss_trace, every.loss_trace[:, ::2])
    assert torch.equal(thinned.init_losses, every.init_losses[::2])
    assert thinned.mean == pytest.approx(float(thinned.llc_trace.mean()), rel=1e-6) and thinned.mean != every.mean


def test_gradient_accumulation_equals_the_large_batch(model, tokens):
    """Catches: accumulated micro-batches that differ from the large batch (other rows, a sum instead of a
    mean, nβ from the micro-batch size)."""
    large = estimate_llc(model, tokens, **{**FAST, "batch_size": 16})
    accumulated = estimate_llc(model, tokens, gradient_accumulation_steps=2, **{**FAST, "batch_size": 8})
    assert accumulated.config.nbeta == large.config.nbeta
    assert torch.allclose(accumulated.loss_trace, large.loss_trace, rtol=1e-5)
    assert accumulated.mean == pytest.approx(large.mean, rel=1e-3, abs=1e-4)


def test_weight_decay_init_noise_and_bounding_box(model, tokens):
    """Catches: weight decay, init noise or the box moving coordinates outside the restriction; a box not
    holding; init noise of another scale; weight decay without effect."""
    star = dict(model.named_parameters())
    plain = estimate_llc(model, tokens, restrict="l0h1", **FAST)
    for options in (dict(weight_decay=50.0), dict(init_noise=0.01, epsilon=1e-12), dict(bounding_box_size=1e-3)):
        r = estimate_llc(model, tokens, restrict="l0h1", **options, **FAST)
        mask = resolve_restriction(model, "l0h1").masks
        for name, final in r.final_params.items():
            moved = final - star[name].detach()
            if mask[name] is not None:
                assert torch.all(moved[:, ~mask[name]] == 0), (options, name)
            if "bounding_box_size" in options:
                assert moved.abs().max() <= 1e-3 + 1e-7
        if "init_noise" in options:
            sampled = torch.cat([(f - star[n].detach())[:, mask[n] if mask[n] is not None else ...].flatten()
                                 for n, f in r.final_params.items()])
            assert sampled.std() == pytest.approx(0.01, rel=0.1)
        if "weight_decay" in options:
            assert r.mean != plain.mean


def test_devinterp_names_give_our_estimate(model, tokens, tmp_path):
    """Catches: a devinterp option name refused (`Unknown SGLD option(s) ['lr']`) or mapped to another option
    (the same call then gives another number), in Python, in its optimizer_kwargs dict, or in a config file;
    a devinterp name and ours both given, one silently winning."""
    import json

    from tl_devinterp import AnalysisConfig

    class SGLD:  # devinterp's sampler class, as a user passes it
        pass

    names = dict(epsilon=3e-4, gamma=100.0, nbeta=5.0, num_burnin=3, steps_between_draws=2)
    theirs = dict(lr=3e-4, localization=100.0, n_beta=5.0, num_burnin_steps=3, num_steps_bw_draws=2)
    base = dict(num_chains=2, num_draws=4, batch_size=8)
    ours = estimate_llc(model, tokens, **names, **base)
    assert estimate_llc(model, tokens, sampling_method=SGLD, **theirs, **base).mean == ours.mean
    kwargs = dict(optimizer_kwargs=dict(lr=3e-4, localization=100.0, nbeta=5.0), num_burnin_steps=3, num_steps_bw_draws=2)
    assert estimate_llc(model, tokens, **kwargs, **base).mean == ours.mean
    (tmp_path / "analysis.json").write_text(json.dumps(theirs))
    assert AnalysisConfig.from_file(tmp_path / "analysis.json").sgld == AnalysisConfig.from_dict(names).sgld
    with pytest.raises(ValueError, match="'epsilon' option of SGLDConfig is given twice"):
        estimate_llc(model, tokens, lr=1e-3, epsilon=1e-3, **base)


def test_devinterp_noise_level_is_accepted_at_one_and_refused_otherwise(tmp_path):
    """devinterp's SGLD scales its noise by `noise_level` (1 = posterior sampling; anything else voids it).
    Catches: `noise_level=1.0` refused as unknown (in Python, in optimizer_kwargs, in a config file); another
    value silently ignored, giving an estimate at a noise the user did not ask for."""
    import json

    from tl_devinterp import AnalysisConfig, SGLDConfig

    assert SGLDConfig.build(noise_level=1.0, lr=3e-4) == SGLDConfig.build(epsilon=3e-4)
    assert SGLDConfig.build(optimizer_kwargs=dict(noise_level=1, lr=3e-4)) == SGLDConfig.build(epsilon=3e-4)
    message = (r"^The 'noise_level' option of SGLDConfig must be 1.0 \(devinterp's scale of the SGLD noise; ours is "
               r"the Langevin noise, unscaled\); got 0.5. Drop it.")
    with pytest.raises(ValueError, match=message + "$"):
        SGLDConfig.build(noise_level=0.5)
    with pytest.raises(ValueError, match=message + "$"):
        SGLDConfig.build(optimizer_kwargs=dict(noise_level=0.5))
    (tmp_path / "analysis.json").write_text(json.dumps({"noise_level": 1.0, "lr": 3e-4}))
    assert AnalysisConfig.from_file(tmp_path / "analysis.json").sgld.epsilon == 3e-4
    (tmp_path / "analysis.json").write_text(json.dumps({"sgld": {"noise_level": 0.5}}))
    with pytest.raises(ValueError, match=message + r" \(in .*analysis.json\)$"):
        AnalysisConfig.from_file(tmp_path / "analysis.json")
