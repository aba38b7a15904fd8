"""Essential dynamics: osculating-circle geometry against exact answers, cusp consistency against a random
walk, and ED end-to-end on tiny TransformerLens models (features on disk, bounded memory, figures)."""

import tracemalloc

import matplotlib
import numpy as np
import pytest
import torch

from tl_devinterp import CheckpointSeries, ModelConfig, build_model
from tl_devinterp.data import repeated_random_tokens
from tl_devinterp.dynamics import (
    essential_dynamics,
    essential_dynamics_of_features,
    evolute_cusps,
    find_stages,
    gaussian_smooth,
    osculating_circles,
)
from tl_devinterp.dynamics.essential import consistent_cusps, gram_pca
from tl_devinterp.visualisation.dynamics import plot_essential_dynamics

matplotlib.use("Agg")


# --------------------------------------------------------------------------------------------------
# Geometry


def test_circle_has_constant_curvature_and_centres_at_its_middle():
    R, middle = 3.0, np.array([1.0, -2.0])
    th = np.linspace(0, 2 * np.pi, 400, endpoint=False)
    circle = middle + R * np.stack([np.cos(th), np.sin(th)], 1)
    o = osculating_circles(circle)
    assert np.isnan(o.curvature[[0, -1]]).all() and np.isnan(o.centre[[0, -1]]).all()
    np.testing.assert_allclose(o.curvature[1:-1], 1 / R, rtol=1e-4)  # finite-difference bias h^2/4 = 6e-5
    np.testing.assert_allclose(o.radius[1:-1], R, rtol=1e-4)
    np.testing.assert_allclose(o.centre[1:-1], np.broadcast_to(middle, (398, 2)), atol=1e-3)
    assert (o.signed_curvature[1:-1] > 0).all()  # counter-clockwise: turns left
    assert (osculating_circles(circle[::-1]).signed_curvature[1:-1] < 0).all()
    assert len(evolute_cusps(circle)) == 0


def test_centre_lies_toward_the_turn_on_a_parabola():
    x = np.linspace(-1, 1, 201)
    o = osculating_circles(np.stack([x, x**2], 1))
    # y = x^2 at its vertex: curvature 2, centre (0, 1/2) above the curve
    np.testing.assert_allclose(o.curvature[100], 2, rtol=1e-3)
    np.testing.assert_allclose(o.centre[100], [0, 0.5], atol=1e-3)


def test_ellipse_evolute_cusps_sit_at_the_vertices():
    a, b = 2.0, 1.0
    n = 720
    th = np.linspace(-np.pi / 4, 9 * np.pi / 4, n, endpoint=False)  # every vertex away from the ends
    ellipse = np.stack([a * np.cos(th), b * np.sin(th)], 1)
    cusps = evolute_cusps(ellipse)
    vertices = [np.argmin(np.abs(th - v)) for v in np.arange(5) * np.pi / 2]  # 0, π/2, π, 3π/2, 2π
    assert list(cusps) == vertices
    # the evolute is the astroid (a x)^(2/3) + (b y)^(2/3) = (a^2 - b^2)^(2/3)
    c = osculating_circles(ellipse).centre[1:-1]
    lhs = np.abs(a * c[:, 0]) ** (2 / 3) + np.abs(b * c[:, 1]) ** (2 / 3)
    np.testing.assert_allclose(lhs, (a**2 - b**2) ** (2 / 3), rtol=1e-3)


@pytest.mark.parametrize("at_end", [True, False])
def test_evolute_cusp_near_an_end_is_found(at_end):
    """One-sided rule: a vertex 5% of the points from either end, where k cannot fall back by the full
    threshold before the curve stops, is still a cusp; a spiral (curvature monotone to its ends) has none."""
    a, b, n = 2.0, 1.0, 720
    span = (2 * np.pi + np.pi / 4) / 0.95  # vertices at 0, π/2, ..., 2π; the outer one 5% from an end
    start = -np.pi / 4 if at_end else -0.05 * span
    th = np.linspace(start, start + span, n)
    cusps = evolute_cusps(np.stack([a * np.cos(th), b * np.sin(th)], 1))
    assert list(cusps) == [np.argmin(np.abs(th - v)) for v in np.arange(5) * np.pi / 2]
    r = 1 + th - th[0]  # Archimedean spiral: k falls monotonically, so neither end holds an extremum
    assert len(evolute_cusps(np.stack([r * np.cos(th), r * np.sin(th)], 1))) == 0


def test_geometry_validates_its_input():
    with pytest.raises(ValueError, match=r"shape \[T, 2\]"):
        osculating_circles(np.zeros((10, 3)))
    with pytest.raises(ValueError, match="at least 3 points"):
        osculating_circles(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        osculating_circles(np.array([[0, 0], [1, np.nan], [2, 0]]))


# --------------------------------------------------------------------------------------------------
# PCA, smoothing, consistency


def test_gram_pca_matches_svd_and_reads_chunks(monkeypatch):
    X = np.random.default_rng(0).normal(size=(12, 50)).cumsum(0)
    monkeypatch.setattr("tl_devinterp.dynamics.essential.GRAM_CHUNK_BYTES", 8 * 12 * 7)  # 7 columns a chunk
    scores, evr = gram_pca(X, 3)
    Xc = X - X.mean(0)
    U, S, _ = np.linalg.svd(Xc, full_matrices=False)
    np.testing.assert_allclose(np.abs(scores), np.abs(U[:, :3] * S[:3]), rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(evr, S[:3] ** 2 / (S**2).sum(), rtol=1e-10)
    assert (scores[-1] >= scores[0]).all()


def test_gaussian_smooth_with_varying_sigma():
    y = np.random.default_rng(1).normal(size=50)
    assert np.allclose(gaussian_smooth(y, 0.0), y)
    sig = np.r_[np.zeros(25), np.full(25, 3.0)]
    out = gaussian_smooth(y, sig)
    assert np.allclose(out[:25], y[:25]) and not np.allclose(out[25:], y[25:])
    assert np.allclose(gaussian_smooth(y, lambda i: 0.0 * i), y)
    assert np.allclose(gaussian_smooth(np.full(50, 7.0), sig), 7.0)  # weights are normalised
    with pytest.raises(ValueError, match="one per checkpoint"):
        gaussian_smooth(y, np.ones(3))


def test_consistent_cusps_need_every_pair_within_the_window():
    cusps = [np.array([10, 40]), np.array([11, 70]), np.array([12, 41])]
    assert list(consistent_cusps(cusps, window=2, min_pairs=3)) == [11]
    assert list(consistent_cusps(cusps, window=2, min_pairs=2)) == [11, 40]


def _walk(T, D, seed):
    return np.random.default_rng(seed).normal(size=(T, D)).cumsum(0)


def test_random_walk_gives_no_consistent_cusp():
    """PCA of a high-dimensional random walk turns everywhere (Lissajous curves plus noise); each PC pair
    has many cusps, but nearly never one shared by all pairs that persists at a coarser scale."""
    with_cusps = []
    for seed in range(10):
        r = essential_dynamics_of_features(_walk(200, 1000, seed))
        assert sum(len(c) for c in r.cusps) >= 3  # the pairs do turn
        with_cusps.append(len(r.consistent_cusps))
        loose = essential_dynamics_of_features(_walk(200, 1000, seed), min_pairs=1, persistence=None)
        assert len(loose.consistent_cusps) >= 3  # without the consistency rule, noise is everywhere
    assert sum(n > 0 for n in with_cusps) <= 1, with_cusps  # measured: 1 seed in 16


def _corner_walk(T, D, seed, turn, *, third_leg=True):
    """Drift along v1, turn at `turn` to v2 (and at 0.7 T add v3), plus a random walk of half the step size."""
    rng = np.random.default_rng(seed)
    v1, v2, v3 = rng.normal(size=(3, D))
    t = np.arange(T)[:, None]
    drift = np.where(t < turn, t * v1, turn * v1 + (t - turn) * v2)
    if third_leg:
        drift = drift + np.where(t < int(0.7 * T), 0, (t - int(0.7 * T)) * v3)
    return drift + 0.5 * rng.normal(size=(T, D)).cumsum(0)


def test_planted_corner_is_a_consistent_cusp():
    """A 1000-dim walk turning at checkpoint 80 in all three PCs: found, at the right step, every seed."""
    T, D, turn = 200, 1000, 80
    for seed in range(4):
        r = essential_dynamics_of_features(_corner_walk(T, D, seed, turn), steps=100 * np.arange(T))
        assert np.abs(r.consistent_cusps - 100 * turn).min() <= 300, r.consistent_cusps
        near = np.minimum(np.abs(r.consistent_cusps - 100 * turn), np.abs(r.consistent_cusps - 14000))
        assert (near <= 300).all(), r.consistent_cusps  # nothing but the planted turns


def test_planar_turn_needs_two_pairs():
    """A rank-2 path (an L): PC3 is noise, so the turn bends PC1-PC2 and PC2-PC3 but not PC1-PC3."""
    for seed in range(3):
        X = _corner_walk(200, 1000, seed, 80, third_leg=False)
        assert len(essential_dynamics_of_features(X).consistent_cusps) == 0
        assert list(essential_dynamics_of_features(X, min_pairs=2).consistent_cusps) == [80]


# --------------------------------------------------------------------------------------------------
# End to end on tiny models


def _tiny_series(n=10, seed=0):
    """Models moving along a bent path in weight space: θ_t = θ_0 + t·Δ1 (t < n/2), then along Δ2."""
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layers=1, n_heads=2, d_model=16, n_ctx=16, d_vocab=11, seed=seed)
    base = build_model(cfg)
    deltas = [{k: 0.05 * torch.randn_like(v) for k, v in base.state_dict().items()} for _ in range(2)]
    models = []
    for t in range(n):
        m = build_model(cfg)
        a, b = min(t, n // 2), max(0, t - n // 2)
        m.load_state_dict({k: v + a * deltas[0][k] + b * deltas[1][k] for k, v in base.state_dict().items()})
        models.append(m)
    return CheckpointSeries.from_models(models, [10 * t for t in range(n)]), models


def test_essential_dynamics_end_to_end(tmp_path):
    series, models = _tiny_series()
    tokens = repeated_random_tokens(24, 5, 11, seed=3)  # [24, 11]
    r = essential_dynamics(series, tokens, sigma=1.0, batch_size=7, features_dir=tmp_path)
    T = len(series)
    assert r.scores.shape == (T, 3) and r.smoothed.shape == (T, 3)
    assert r.curvature.shape == (3, T) and r.centres.shape == (3, T, 2) and len(r.cusps) == 3
    assert np.all(np.diff(r.explained_variance_ratio) <= 0) and 0.5 < r.explained_variance_ratio.sum() <= 1
    # features went to disk: the memmap holds the true-next-token logit at one position per sequence
    X = np.memmap(tmp_path / "features.f32", dtype=np.float32, mode="r", shape=(T, 24))
    from tl_devinterp.dynamics.essential import fixed_positions

    pos = torch.as_tensor(fixed_positions(24, 11, None, seed=0))
    rows = torch.arange(24)
    with torch.no_grad():
        logits = models[3](tokens)
    np.testing.assert_allclose(X[3], logits[rows, pos, tokens[rows, pos + 1]].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r.proxy_mean, X.mean(1), rtol=1e-5, atol=1e-6)
    frame = r.frame()
    assert len(frame) == 3 * T and {"step", "pc_x", "pc_y", "curvature", "centre_x", "cusp"} <= set(frame.columns)

    out_dir = tmp_path / "outputs"
    outputs = essential_dynamics(series, tokens, proxy="outputs", position=-2, sigma=0.0, batch_size=7,
                                 features_dir=out_dir)
    assert outputs.scores.shape == (T, 3)
    # every logit at position seq - 2 of every sequence, sequence-major (batching must not reorder them)
    V = models[0].cfg.d_vocab
    X = np.memmap(out_dir / "features.f32", dtype=np.float32, mode="r", shape=(T, 24 * V))
    for t in (0, T - 1):
        with torch.no_grad():
            logits = models[t](tokens)[:, -2]  # [24, vocab]
        np.testing.assert_allclose(X[t], logits.flatten().numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="position must lie"):
        essential_dynamics(series, tokens, position=10)
    with pytest.raises(ValueError, match="proxy must be one of"):
        essential_dynamics(series, tokens, proxy="loss")


def test_essential_dynamics_streams_features_with_bounded_memory():
    """A proxy with 10^6 features per checkpoint: X (12 × 10^6 float32 = 48 MB) is never held in RAM."""
    series, _ = _tiny_series(n=12)
    F = 1_000_000

    def proxy(model, tokens):
        w = model.W_E.detach().flatten()
        return w.repeat(F // w.numel() + 1)[:F] * torch.linspace(0, 1, F)

    tracemalloc.start()
    r = essential_dynamics(series, torch.zeros(2, 4, dtype=torch.long), proxy=proxy, sigma=1.0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert r.scores.shape == (12, 3)
    assert peak < 40e6, f"peak numpy allocation {peak / 1e6:.0f} MB"  # one row + one Gram chunk (32 MB)


def test_essential_dynamics_figure_renders(tmp_path):
    T, D = 120, 300
    rng = np.random.default_rng(0)
    t = np.arange(T)[:, None]
    v1, v2 = rng.normal(size=(2, D))
    X = np.where(t < 50, t * v1, 50 * v1 + (t - 50) * v2) + 0.3 * rng.normal(size=(T, D)).cumsum(0)
    r = essential_dynamics_of_features(X, steps=10 * np.arange(T))
    stages = find_stages(r.steps, np.r_[np.linspace(0, 1, 50), np.linspace(1, 0.2, 70)])
    fig = plot_essential_dynamics(r, stages)
    axes = fig.get_axes()
    assert len(axes) == 3
    for ax in axes:
        assert len(ax.collections) >= 3  # trajectory, raw scores, cusp markers
        assert len(ax.patches) > 5  # osculating circles
    fig.savefig(tmp_path / "ed.png")
    assert (tmp_path / "ed.png").stat().st_size > 10_000
    assert len(plot_essential_dynamics(r).get_axes()) == 3


def test_essential_dynamics_resumes_from_its_store(tmp_path):
    """A rerun with the same inputs reads every checkpoint's features back; none is recomputed."""
    series, _ = _tiny_series(n=8)
    tokens = repeated_random_tokens(16, 5, 11, seed=3)
    calls = []

    def proxy(model, toks):
        calls.append(1)
        return model(toks)[:, -2].flatten()

    run = dict(proxy=proxy, key="logits at -2", sigma=1.0, store_dir=tmp_path)  # a closure is named by key=
    first = essential_dynamics(series, tokens, **run)
    assert len(calls) == len(series)
    again = essential_dynamics(series, tokens, **run)
    assert len(calls) == len(series)  # nothing recomputed
    np.testing.assert_array_equal(again.scores, first.scores)
    essential_dynamics(series, tokens[:8], **run)  # other inputs: new store
    assert len(calls) == 2 * len(series)
