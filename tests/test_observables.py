"""Observables on draws, susceptibilities and Bayesian influence against closed forms on Gaussian posteriors.

A quadratic loss L(w) = ½(w − a)ᵀA(w − a) sampled around w* = a has the Gaussian posterior
N(a, Σ), Σ = (nβ·A + γ·I)⁻¹ (SGLD's own discretisation bias is ≈ ε·λ_max/4, kept below 1% here).
"""

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from tl_devinterp.models import ModelConfig, build_model
from tl_devinterp.sampling import (
    SGLDConfig,
    bayesian_influence,
    estimate_llc,
    sample_observables,
    susceptibilities,
    top_influences,
)
from tl_devinterp.sampling.diagnostics import REGIMES

NBETA, GAMMA = 100.0, 1.0
A = torch.diag(torch.tensor([1.0, 1.5, 2.0])) + 0.2  # SPD; nβ·A has eigenvalues in ~[100, 260]


class Vector(nn.Module):
    """A bare parameter vector w, at a."""

    def __init__(self, a):
        super().__init__()
        self.w = nn.Parameter(a.clone())


def quadratic(model, batch):
    """Mean over rows (c, M) of ½(w − c)ᵀM(w − c): the data are the centres and curvatures."""
    centres, curvatures = batch
    x = model.w - centres
    return 0.5 * torch.einsum("ni,nij,nj->n", x, curvatures, x).mean()


def data_at(centre, curvature):
    return (centre[None], curvature[None])


RUN = dict(epsilon=2e-4, gamma=GAMMA, nbeta=NBETA, num_chains=8, num_draws=2000, num_burnin=200, batch_size=1)


@pytest.mark.slow
def test_posterior_covariance_of_linear_observables_is_analytic():
    a = torch.tensor([0.3, -0.2, 0.1])
    u, v = torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 1.0])
    t = sample_observables(Vector(a), data_at(a, A), {"u": lambda m: m.w @ u, "v": lambda m: m.w @ v},
                           loss_fn=quadratic, progress=False, **RUN)
    sigma = torch.linalg.inv(NBETA * A + GAMMA * torch.eye(3)).double()
    for x, y in [("u", "v"), ("u", "u"), ("v", "v")]:
        cov, se = t.cov(x, y)
        truth = float({"u": u, "v": v}[x].double() @ sigma @ {"u": u, "v": v}[y].double())
        assert abs(cov[0, 0] - truth) < 4 * se[0, 0] + 0.02 * abs(truth), (x, y, cov, se, truth)
    assert np.allclose(t.mean("u"), float(a @ u), atol=0.01)  # centred at w* = a


@pytest.mark.slow
def test_susceptibility_of_quadratic_losses_is_closed_form():
    """χ = −nβ·Cov[L_q, L_q' − L_q] = −nβ·½·(tr(AΣBΣ) − tr(AΣAΣ)) for quadratics (the linear part of L_q'
    is uncorrelated with L_q under a Gaussian centred at a); with B = 3A the shift tightens, χ < 0."""
    a, b = torch.tensor([0.3, -0.2, 0.1]), torch.tensor([0.5, 0.0, 0.1])
    B = 3 * A
    frame = susceptibilities(Vector(a), data_at(a, A), {"steeper": data_at(b, B), "same": data_at(a, A)},
                             loss_fn=quadratic, progress=False, **RUN)
    sigma = torch.linalg.inv(NBETA * A + GAMMA * torch.eye(3)).double()
    Ad, Bd = A.double(), B.double()
    truth = float(-NBETA * 0.5 * (torch.trace(Ad @ sigma @ Bd @ sigma) - torch.trace(Ad @ sigma @ Ad @ sigma)))
    row = frame.set_index("shift").loc["steeper"]
    assert truth < 0 and abs(row.susceptibility - truth) < 4 * row.susceptibility_se + 0.05 * abs(truth), (row, truth)
    assert frame.set_index("shift").loc["same"].susceptibility == 0  # no shift, no response


@pytest.fixture(scope="module")
def lm():
    return build_model(ModelConfig(n_layers=1, n_heads=2, d_model=16, n_ctx=16, d_vocab=32, attn_only=True))


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(1, 32, (16, 10), generator=torch.Generator().manual_seed(0))


FAST = dict(num_chains=2, num_draws=6, num_burnin=2, batch_size=8, progress=False)


def test_observers_leave_the_llc_path_unchanged(lm, tokens):
    """Observing draws (in memory or memmapped) must not touch the chains' noise or weights."""
    plain = estimate_llc(lm, tokens, **FAST)
    seen = sample_observables(lm, tokens, {"eval": tokens[:3], "norm": lambda m: m.W_E.norm()}, draws_every=2, **FAST)
    on_disk = sample_observables(lm, tokens, {"eval": tokens[:3], "norm": lambda m: m.W_E.norm()}, draws_every=2,
                                 memory_limit=0, **FAST)
    assert torch.equal(plain.loss_trace, seen.llc.loss_trace)
    assert seen.traces["eval"].shape == (2, 3, 3, 9) and seen.traces["norm"].shape == (2, 3)  # draws 0, 2, 4
    assert isinstance(on_disk.traces["eval"], np.memmap) and not isinstance(seen.traces["eval"], np.memmap)
    assert np.array_equal(on_disk.traces["eval"], seen.traces["eval"])
    # the draws differ from w* (the weights were swapped in) and the model itself is untouched
    assert seen.traces["norm"].std() > 0 and float(lm.W_E.norm()) not in seen.traces["norm"]


def test_trace_at_draw_equals_loss_of_those_weights(lm, tokens):
    """The per-token losses recorded on draw 0 are those of the chain's weights, not of w*: with the
    training data as evaluation set and batch = all data, its mean is the LLC trace's first loss."""
    t = sample_observables(lm, tokens, {"all": tokens}, num_chains=2, num_draws=3, num_burnin=1, batch_size=16,
                           progress=False)
    assert np.allclose(t.traces["all"].mean(axis=(2, 3)), t.llc.loss_trace.numpy(), atol=1e-5)


def test_sampler_is_validated_once():
    with pytest.raises(ValueError, match="'sampler' option of SGLDConfig must be one of .*; got 'hmc'"):
        SGLDConfig(sampler="hmc")
    with pytest.raises(ValueError, match="draws_every"):
        SGLDConfig(draws_every=0)


@pytest.mark.parametrize("sampler", ["sgnht", "rmsprop_sgld"])
def test_samplers_run_on_a_transformer(lm, tokens, sampler):
    r = estimate_llc(lm, tokens, sampler=sampler, restrict="l0h1", **FAST)
    assert r.config.sampler == sampler and np.isfinite(r.mean) and np.isnan(r.diagnostics.acceptance)


def test_bayesian_influence_of_a_sequence_on_itself_is_negative(lm, tokens):
    """A query equal to training sequence 0 co-varies with it most: BIF(0, q) = −Var < 0 summed over tokens."""
    bif = bayesian_influence(lm, tokens, tokens[:2], num_chains=2, num_draws=20, num_burnin=2, batch_size=8,
                             progress=False)
    assert bif.influence.shape == (16, 2, 9)
    per_sequence = bif.influence.mean(-1)
    assert per_sequence[0, 0] < 0 and per_sequence[1, 1] < 0
    top = top_influences(bif, query=0, position=-1, k=3)
    assert list(top.columns) == ["train_index", "influence", "influence_se"] and len(top) == 3
    assert abs(top.influence.iloc[0]) == np.abs(bif.influence[:, 0, -1]).max()


def test_head_susceptibilities_table(lm, tokens):
    weights = torch.zeros(16, 9)
    weights[:, -3:] = 1.0  # the last tokens of each sequence
    frame = susceptibilities(lm, tokens, {"late": weights, "other": tokens.flip(1)}, heads=True, **FAST)
    assert len(frame) == 3 * 2 and set(frame.scope) == {"model", "head"}
    assert frame[frame.scope == "head"][["layer", "head"]].drop_duplicates().shape[0] == 2
    assert frame.susceptibility.notna().all()
    assert set(frame.regime) <= set(REGIMES) and frame.likelihood_fraction.between(0, 1).all()  # diagnostics kept


def test_susceptibility_figures(lm, tokens):
    from tl_devinterp import plot_susceptibilities

    frame = susceptibilities(lm, tokens, {"other": tokens.flip(1)}, heads=True, **FAST)
    assert plot_susceptibilities(frame).axes[0].images  # heatmap
    series = pd.concat([frame.assign(step=s) for s in (0, 10)])
    assert len(plot_susceptibilities(series).axes[0].lines) >= 2  # one line per head over training
