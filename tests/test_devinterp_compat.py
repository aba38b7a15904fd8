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
    assert "loss" in idata.sample_stats
