"""The SGLD LLC estimator: determinism, pairing, restriction, divergence, input forms."""

import math

import pytest
import torch
from torch import nn

from tl_devinterp.data import repeated_random_tokens
from tl_devinterp.models import ModelConfig, build_model, head_masks
from tl_devinterp.sampling import LLCDivergenceError, default_nbeta, estimate_llc, resolve_restriction

FAST = dict(num_chains=2, num_draws=6, num_burnin=2, batch_size=8)


@pytest.fixture(scope="module")
def model():
    return build_model(ModelConfig(n_layers=2, n_heads=2, d_model=16, n_ctx=16, d_vocab=16))


@pytest.fixture(scope="module")
def tokens():
    return repeated_random_tokens(32, 5, 16)


def test_default_nbeta_is_n_over_log_n():
    assert default_nbeta(100) == pytest.approx(21.715, abs=1e-3)  # the ICL paper's value
    with pytest.raises(ValueError, match="batch_size"):
        default_nbeta(1)


def test_result_fields_and_determinism(model, tokens):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = estimate_llc(model, tokens, seed=3, **FAST)
    b = estimate_llc(model, tokens, seed=3, **FAST)
    c = estimate_llc(model, tokens, seed=4, **FAST)
    assert a.mean == b.mean and torch.equal(a.loss_trace, b.loss_trace)
    assert a.mean != c.mean
    assert a.loss_trace.shape == (2, 6) and a.per_chain.shape == (2,)
    assert a.std == pytest.approx(a.per_chain.std(ddof=1))
    assert a.d == sum(p.numel() for p in model.parameters())
    assert a.config.nbeta == default_nbeta(8) and a.config.epsilon == 1e-3 and a.config.seed == 3
    # lambda-hat is nbeta times the paired differences
    assert a.mean == pytest.approx(float(a.llc_trace.mean()), rel=1e-5)
    for k, v in model.state_dict().items():  # the caller's model is untouched
        assert torch.equal(v, before[k]), k


def test_pairing_removes_batch_noise(model, tokens):
    """With a vanishing step the chains stay at w*: paired differences are exactly zero."""
    r = estimate_llc(model, tokens, epsilon=1e-14, **FAST)
    assert abs(r.mean) < 1e-5 and r.init_losses.std() > 1e-3


def test_input_forms_agree(model, tokens):
    from datasets import Dataset

    ref = estimate_llc(model, tokens, **FAST)
    ds = Dataset.from_dict({"input_ids": tokens.tolist()})
    assert estimate_llc(model, ds, **FAST).mean == pytest.approx(ref.mean)
    loader = torch.utils.data.DataLoader(tokens, batch_size=8)
    r = estimate_llc(model, loader, **FAST)
    assert r.config.batch_size == 8 and math.isfinite(r.mean)
    with pytest.raises(TypeError, match="DataLoader"):
        estimate_llc(model, "text", **FAST)
    with pytest.raises(ValueError, match="batch_size"):
        estimate_llc(model, tokens[:4], **FAST)


def test_divergence_raises_with_advice(model, tokens):
    with pytest.raises(LLCDivergenceError, match=r"chain \d+ of restriction .* diverged at step \d+.*Lower epsilon.*raise gamma"):
        estimate_llc(model, tokens, epsilon=50.0, gamma=0.0, nbeta=1e4, **{**FAST, "num_draws": 50})


def test_restriction_specs(model):
    head = resolve_restriction(model, "l1h1")
    assert resolve_restriction(model, (1, 1)).label == head.label == "l1h1"
    expected = head_masks(model, 1, 1)
    assert head.d == sum(int(m.sum()) for m in expected.values()) == 4 * 16 * 8 + 3 * 8
    layer = resolve_restriction(model, "layer1")
    assert layer.d == resolve_restriction(model, "blocks.1").d
    assert layer.d == sum(p.numel() for n, p in model.state_dict().items() if n.startswith("blocks.1."))
    both = resolve_restriction(model, ["embed", "pos_embed"])
    assert both.d == 16 * 16 + 16 * 16
    assert resolve_restriction(model, "blocks.0.attn.q.*").d == 16 * 16 + 16
    with pytest.raises(ValueError, match="matches no parameter"):
        resolve_restriction(model, "blocks.7.*")
    with pytest.raises(ValueError, match="does not exist"):
        resolve_restriction(model, "l5h0")


def test_pattern_restrictions_keep_the_models_parameter_order(model):
    """A layer's, a pattern's and a component's parameters come in the model's own order. Catches: the order of
    a set of names, which changes between processes (PYTHONHASHSEED), so each chain's noise fell on other
    coordinates in each process and an estimate with restrict='layer1' did not reproduce."""
    from tl_devinterp.models import sampled_parameters

    for spec in ("layer1", "blocks.0.attn.*", "embed", ["layer0", "unembed"]):
        masks = resolve_restriction(model, spec).masks
        assert list(masks) == [n for n in sampled_parameters(model) if n in masks], spec


def test_restricted_sampling_moves_only_its_coordinates(model, tokens):
    """Every forward pass sees w* outside the head; the head's own coordinates move."""
    wstar = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = head_masks(model, 0, 1)
    seen = []

    def loss_fn(m, batch):
        for n, p in m.named_parameters():
            outside = ~mask[n] if n in mask else torch.ones_like(p, dtype=torch.bool)
            assert torch.equal(p.detach()[outside], wstar[n][outside]), n
        seen.append(1)
        logits = m(batch)
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())

    r = estimate_llc(model, tokens, restrict="l0h1", loss_fn=loss_fn, **FAST)
    # 2 chains x 8 steps, the checkpoint once per distinct batch (4), one check of the parameters used
    assert 16 < len(seen) <= 16 + 4 + 1
    assert set(r.final_params) == set(mask)
    for n, final in r.final_params.items():
        assert torch.equal(final[:, ~mask[n]], wstar[n][~mask[n]].expand(2, -1))
        assert not torch.equal(final[:, mask[n]], wstar[n][mask[n]].expand(2, -1))


class Regular(nn.Module):
    """y = W x (+ inert extra weights that no loss sees), MSE on x = identity: a regular model."""

    def __init__(self, m, n, extra=0):
        super().__init__()
        self.main = nn.Linear(m, n, bias=False)
        self.extra = nn.Parameter(torch.zeros(extra)) if extra else None
        self.loss_fn = nn.MSELoss(reduction="sum")

    def forward(self, x):
        return self.main(x)


@pytest.mark.slow
def test_inert_coordinates_restricted_equals_small_model():
    torch.manual_seed(0)
    small, big = Regular(3, 2), Regular(3, 2, extra=5)
    big.main.load_state_dict(small.main.state_dict())
    x = torch.eye(3)
    data = (x, small(x).detach())
    hp = dict(epsilon=2e-3, gamma=1.0, nbeta=50.0, num_chains=8, num_draws=400, num_burnin=100, batch_size=3)
    a = estimate_llc(small, data, **hp)
    b = estimate_llc(big, data, restrict="main.*", **hp)
    assert a.d == b.d == 6
    assert a.mean == pytest.approx(3.0, rel=0.15) and b.mean == pytest.approx(3.0, rel=0.15)
    assert abs(a.mean - b.mean) < 3 * math.hypot(a.se, b.se) + 0.05


def test_head_llcs_match_single_head_runs(model, tokens):
    from tl_devinterp.sampling import estimate_head_llcs

    frame = estimate_head_llcs(model, tokens, heads=[(0, 1), (1, 0)], **FAST)
    assert list(frame.columns[:5]) == ["layer", "head", "llc_mean", "llc_std", "llc_se"]
    assert frame[["layer", "head"]].values.tolist() == [[0, 1], [1, 0]]
    single = estimate_llc(model, tokens, restrict="l1h0", **FAST)
    row = frame.iloc[1]
    assert row.llc_mean == pytest.approx(single.mean, rel=1e-5) and row.d == single.d == 4 * 16 * 8 + 3 * 8
    assert len(estimate_head_llcs(model, tokens, **{**FAST, "num_draws": 1})) == 4  # every head by default


def test_shared_residual_prefix_matches_full_forward(model, tokens):
    """Head restrictions in block 1 run from the cached residual stream: same numbers as the full forward."""
    from tl_devinterp.sampling.objective import lm_loss

    fast = estimate_llc(model, tokens, restrict="l1h0", **FAST)
    full = estimate_llc(model, tokens, restrict="l1h0", loss_fn=lm_loss, **FAST)  # a custom loss: no prefix
    assert resolve_restriction(model, "l1h0").first_layer == 1 and resolve_restriction(model, "l0h0").first_layer == 0
    assert resolve_restriction(model, ["l1h0", "unembed"]).first_layer == 0
    assert fast.mean == pytest.approx(full.mean, rel=1e-4, abs=1e-6)
    assert torch.allclose(fast.loss_trace, full.loss_trace, rtol=1e-5)


def test_init_continues_the_chains_of_an_earlier_run():
    """`init` starts each chain where the earlier run's ended: with no burn-in, the first draw of a
    continuation sits at the earlier chains' spread (nβ·(L − L*) of order λ), where a run from w* starts at
    L(w*). Refused: a result of another restriction, and one at other weights. Catches: init ignored (chains
    back at w*), a continuation from another checkpoint or other coordinates."""
    from tl_devinterp.sampling.known_answers import known_answer

    case = known_answer((5, 3, 5), 1, loss="sum", n=256)
    hot = dict(epsilon=1e-4, gamma=1.0, nbeta=10.0, num_chains=4, num_burnin=0, batch_size=64, loss_fn=case.loss_fn,
               progress=False)
    first = estimate_llc(case.model, case.data, num_draws=2000, **hot)
    again = estimate_llc(case.model, case.data, init=first, num_draws=1, **hot)
    fresh = estimate_llc(case.model, case.data, num_draws=1, **hot)
    spread = lambda r: (r.loss_trace[:, 0] - r.init_losses[0]).norm().item()  # noqa: E731
    assert spread(again) > 20 * spread(fresh)
    assert torch.allclose(again.final.rows.norm(dim=1), first.final.rows.norm(dim=1), rtol=0.05)
    with pytest.raises(ValueError, match="init must be an LLCResult of the same restriction"):
        estimate_llc(case.model, case.data, init=first, num_draws=1, restrict="0.*", **hot)
    other = known_answer((5, 3, 5), 1, loss="sum", n=256, seed=1)
    with pytest.raises(ValueError, match="init comes from a run at other weights"):
        estimate_llc(other.model, other.data, init=first, num_draws=1, **hot)
