"""Sampler diagnostics: ArviZ's R-hat/ESS/MCSE on the stored trace, the per-step metrics, the virial identity
E[(w − w*)·∇U] = d that separates a too-coarse ε and unmixed chains from good ones, and the trace plot."""

import math
import warnings

import arviz as az
import matplotlib
import numpy as np
import pytest
import torch
from torch import nn

from tl_devinterp.sampling import SamplerWarning, estimate_llc, plot_trace
from tl_devinterp.sampling.diagnostics import ROW, TRACES
from tl_devinterp.sampling.head_llcs import summary

matplotlib.use("Agg")
D = 100


class Quadratic(nn.Module):
    """L(w) = ½‖w‖²: the posterior exp(−nβL − γ‖w‖²/2) is Gaussian of stiffness k = nβ + γ in every direction;
    SGLD's stationary variance is 1/(k(1 − εk/4)), so the virial is 1/(1 − εk/4)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(D))

    def loss_fn(self, batch):
        return 0.5 * (self.w**2).sum()


def _run(**options):
    config = dict(gamma=1.0, nbeta=100.0, num_chains=4, num_draws=400, num_burnin=300, batch_size=4) | options
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = estimate_llc(Quadratic(), torch.zeros(8, 1), progress=False, **config)
    return r, [str(w.message) for w in caught if issubclass(w.category, SamplerWarning)]


def test_mcmc_numbers_are_arviz_on_the_stored_trace():
    """Catches: R-hat, ESS or MCSE computed on another array (the loss trace, a chain mean), by another
    method (plain R-hat, basic ESS) or not kept in the results' rows."""
    r, _ = _run(epsilon=1e-3)
    trace = r.llc_trace.numpy()
    assert r.diagnostics.r_hat == pytest.approx(float(az.rhat(trace, method="rank")))
    assert r.diagnostics.ess_bulk == pytest.approx(float(az.ess(trace, method="bulk")))
    assert r.diagnostics.ess_tail == pytest.approx(float(az.ess(trace, method="tail")))
    assert r.diagnostics.mcse == pytest.approx(float(az.mcse(trace, method="mean")))
    assert {"r_hat", "ess_bulk", "ess_tail", "mcse"} <= set(ROW) <= set(summary(r))
    assert set(r.trace) == set(TRACES) and all(v.shape == (4, 400) for v in r.trace.values())
    assert r.diagnostics.distance == pytest.approx(r.trace["distance"].mean())
    assert np.isnan(r.trace["acceptance"][:, 0]).all() and np.isfinite(r.trace["acceptance"][:, 1:]).all()
    np.testing.assert_allclose(r.trace["loss"], r.loss_trace.numpy(), rtol=1e-6)


@pytest.mark.parametrize(("epsilon", "virial", "draws"), [
    pytest.param(1e-3, 1 / (1 - 1e-3 * 101 / 4), 6000, marks=pytest.mark.slow), (8e-3, 1 / (1 - 8e-3 * 101 / 4), 1000)])
def test_virial_measures_the_step_size_bias(epsilon, virial, draws):
    """On the Gaussian the virial is SGLD's variance inflation 1/(1 − εk/4): 1.026 at ε = 1e-3 (regime likelihood; no
    warning with 8 × 6000 draws: R-hat ≤ 1.01 needs a bulk ESS ≳ 1000), 1.25 at ε = 8e-3 (λ̂ 25% high: regime "step size", a warning naming epsilon).
    Catches: a virial that leaves out the prior's term, divides by the wrong d, or a regime that says
    "likelihood" for a step-size-dominated estimate."""
    r, said = _run(epsilon=epsilon, num_draws=draws, num_chains=8)
    assert r.diagnostics.virial == pytest.approx(virial, rel=0.03)
    assert r.mean == pytest.approx(D / 2 * 100 / 101 * virial, rel=0.05)
    if virial < 1.05:
        assert r.diagnostics.regime == "likelihood" and said == [], said
    else:
        assert r.diagnostics.regime == "step size"
        assert any("epsilon is too coarse" in s for s in said), said


def test_chains_still_spreading_out_are_not_mixed():
    """No burn-in and a step that needs ~200 steps to relax: the chains start at w* and spread during the
    draws; λ̂ reads low. Catches: a regime that calls unmixed chains "likelihood" (the old trace-drift test
    alone passed chains 35% low)."""
    r, said = _run(epsilon=1e-4, num_burnin=0, num_draws=150)
    assert r.mean < 0.8 * D / 2
    assert r.diagnostics.virial < 0.9 and r.diagnostics.regime == "not mixed"
    assert any("still spreading out" in s for s in said), said


def test_plot_trace_shows_every_metric():
    r, _ = _run(epsilon=1e-3, num_draws=50)
    fig = plot_trace(r)
    axes = fig.get_axes()
    assert len(axes) == 6 and all(len(ax.lines) >= 4 for ax in axes)  # one line per chain (+ reference)
    assert "R-hat" in fig._suptitle.get_text() and math.isfinite(r.diagnostics.r_hat)
