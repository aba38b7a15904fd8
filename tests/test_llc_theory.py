"""The estimator against known learning coefficients (design.md §4): each within 15% of the true λ.

Losses are population losses, so w* is a true parameter: a regular model (λ = d/2), a normal crossing
(λ = 1/4) and reduced-rank regression (Aoyagi & Watanabe 2005), including true rank r > 0.
"""

import pytest
import torch
from torch import nn

from tl_devinterp.sampling import estimate_llc
from tl_devinterp.sampling.known_answers import rrr_lambda as aoyagi

pytestmark = pytest.mark.slow


def sum_mse(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y, reduction="sum")


def test_aoyagi_formula_examples():
    assert [aoyagi(5, 3, 5, 0), aoyagi(5, 4, 5, 0), aoyagi(4, 3, 8, 0)] == [6.5, 8, 6]


def test_regular_model_is_half_the_dimension():
    torch.manual_seed(0)
    net = nn.Linear(4, 3)  # d = 15 at a non-degenerate minimum
    net.loss_fn = sum_mse
    x = torch.cat([torch.eye(4), torch.zeros(1, 4)])  # the zero row pins the bias
    data = (x, net(x).detach())
    r = estimate_llc(net, data, epsilon=2e-5, gamma=1.0, nbeta=1000.0, num_chains=6, num_draws=1500, num_burnin=300, batch_size=5)
    assert r.d == 15 and r.mean == pytest.approx(7.5, rel=0.15)


class Crossing(nn.Module):
    """f(x) = x·w1·w2² fitted to y = 0: K(w) = E[x²]·w1²·w2⁴, a normal crossing with λ = min(1/2, 1/4)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))

    def forward(self, x):
        return x * self.w[0] * self.w[1] ** 2

    def loss_fn(self, batch):
        x, y = batch
        return ((self(x) - y) ** 2).mean()


def test_normal_crossing():
    data = (torch.tensor([1.0, -1.0]), torch.zeros(2))
    r = estimate_llc(Crossing(), data, epsilon=1e-3, gamma=1.0, nbeta=1e4, num_chains=8, num_draws=3000, num_burnin=1000, batch_size=2)
    assert r.mean == pytest.approx(0.25, rel=0.15)


@pytest.mark.parametrize("M,H,N,r", [(5, 3, 5, 0), (5, 4, 5, 0), (4, 3, 8, 0), (5, 3, 5, 1), (3, 2, 6, 1)])
def test_reduced_rank_regression(M, H, N, r):
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(M, H, bias=False), nn.Linear(H, N, bias=False))
    A, B = torch.zeros(H, M), torch.zeros(N, H)
    A[:r], B[:, :r] = torch.randn(r, M, generator=g), torch.randn(N, r, generator=g)  # a rank-r truth
    with torch.no_grad():
        net[0].weight.copy_(A)
        net[1].weight.copy_(B)
    net.loss_fn = sum_mse
    x = torch.eye(M)  # sum of squares over the basis: K(w) = ||BA − B0A0||²_F
    data = (x, net(x).detach())
    # the regular directions at a rank-r truth are stiff: a smaller step keeps discretisation bias small
    hp = dict(epsilon=1e-4, num_draws=2000, num_burnin=500) if r == 0 else dict(epsilon=2e-5, num_draws=4000, num_burnin=1000)
    est = estimate_llc(net, data, gamma=1.0, nbeta=1000.0, num_chains=8, batch_size=M, **hp)
    assert est.mean == pytest.approx(aoyagi(M, H, N, r), rel=0.15)


# Every sampler against the same known answers, with short runs of its own step size. SGNHT's momentum
# moves η/A = 100× farther per step than SGLD at the same ε, RMSprop's G ≈ 1/√(curvature) shrinks steps.
SAMPLER_RUNS = {  # sampler -> {case: SGLD options}
    "sgld": dict(regular=dict(epsilon=2e-5), rrr=dict(epsilon=5e-5)),
    "sgnht": dict(regular=dict(epsilon=2e-5), crossing=dict(epsilon=1e-4), rrr=dict(epsilon=1e-5)),
    "rmsprop_sgld": dict(regular=dict(epsilon=5e-4), crossing=dict(epsilon=5e-3), rrr=dict(epsilon=5e-4)),
}


@pytest.mark.parametrize("sampler", sorted(SAMPLER_RUNS))
def test_samplers_regular(sampler):
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    net.loss_fn = sum_mse
    x = torch.cat([torch.eye(4), torch.zeros(1, 4)])
    r = estimate_llc(net, (x, net(x).detach()), sampler=sampler, gamma=1.0, nbeta=1000.0, num_chains=4, num_draws=400,
                     num_burnin=100, batch_size=5, progress=False, **SAMPLER_RUNS[sampler]["regular"])
    assert r.mean == pytest.approx(7.5, rel=0.15)


@pytest.mark.parametrize("sampler", ["rmsprop_sgld", "sgnht"])  # SGLD needs the longer run of test_normal_crossing
def test_samplers_normal_crossing(sampler):
    data = (torch.tensor([1.0, -1.0]), torch.zeros(2))
    run = dict(num_chains=8, num_draws=600, num_burnin=200) | SAMPLER_RUNS[sampler]["crossing"]
    r = estimate_llc(Crossing(), data, sampler=sampler, gamma=1.0, nbeta=1e4, batch_size=2, progress=False, **run)
    assert r.mean == pytest.approx(0.25, rel=0.15)


@pytest.mark.parametrize("sampler", sorted(SAMPLER_RUNS))
def test_samplers_reduced_rank(sampler):
    M, H, N, r = 5, 3, 5, 1  # a rank-1 truth: λ = 8
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(M, H, bias=False), nn.Linear(H, N, bias=False))
    A, B = torch.zeros(H, M), torch.zeros(N, H)
    A[:r], B[:, :r] = torch.randn(r, M, generator=g), torch.randn(N, r, generator=g)
    with torch.no_grad():
        net[0].weight.copy_(A)
        net[1].weight.copy_(B)
    net.loss_fn = sum_mse
    x = torch.eye(M)
    est = estimate_llc(net, (x, net(x).detach()), sampler=sampler, gamma=1.0, nbeta=1000.0, num_chains=4, num_draws=800,
                       num_burnin=300, batch_size=M, progress=False, **SAMPLER_RUNS[sampler]["rrr"])
    assert est.mean == pytest.approx(aoyagi(M, H, N, r), rel=0.15)
