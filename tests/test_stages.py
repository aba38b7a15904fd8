"""Stages from the LLC curve: the demo run's measured curve, known boundaries of synthetic curves on uneven
grids, monotone curves with noise at the SE, the paper's own LLC curve, the table and the figure."""

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest

from tl_devinterp import AnalysisConfig, Stage, find_stages, stages_frame
from tl_devinterp.dynamics.stages import fit_piecewise_linear, stage_se
from tl_devinterp.visualisation.dynamics import plot_llc_stages

matplotlib.use("Agg")

DATA = Path(__file__).parent / "data"
PAPER_LLC = DATA / "paper_l2_llc.csv"
STEPS = np.arange(0, 100_001, 100)
DEMO = pd.read_csv(DATA / "demo_llc.csv").query("scope == 'model'").sort_values("step")  # 3 chains x 60 draws
DEMO_GRID, DEMO_SE = DEMO.step.to_numpy(), DEMO.llc_se.to_numpy()  # merged log + linear: 208/214, 1714/1759


def _log_piecewise(steps, knots, offset):
    """λ linear in log(step + offset) between (step, value) knots."""
    kx, ky = zip(*knots)
    return np.interp(np.log(np.asarray(steps) + offset), np.log(np.array(kx) + offset), ky)


def _piecewise(knots, noise=0.0, seed=0):
    """On STEPS, linear in log(step + 100), plus Gaussian noise of sd `noise`."""
    return _log_piecewise(STEPS, knots, 100) + noise * np.random.default_rng(seed).normal(size=len(STEPS))


def _near(found: int, true: float, factor: float) -> bool:
    return 1 / factor <= (found + 100) / (true + 100) <= factor


def _within_one_checkpoint(steps, found, true, offset):
    """Boundary `found` is at most one checkpoint beyond the checkpoints around `true` (`true` itself when it
    is one), counting checkpoints within 5% of each other in step + offset (a merged grid's crowds) as one."""
    x = np.log(np.asarray(steps) + offset)
    group = np.r_[0, np.cumsum(np.diff(x) > 0.05)]  # crowded checkpoints share a group
    i = np.searchsorted(x, np.log(true + offset) - 1e-12)  # first checkpoint at or after true
    at = group[int(np.flatnonzero(steps == found)[0])]
    exact = abs(x[i] - np.log(true + offset)) < 1e-12
    return group[i if exact else i - 1] - 1 <= at <= group[i] + 1


def test_demo_curve_gives_the_rise_the_fall_and_the_rise():
    """The demo run: λ̂ falls 3.22 -> 2.36 over steps 8 -> 122 (5.5 SE in all, ~2 SE between neighbours), then
    rises, fastest in 1286 -> 1714 where the previous-token and induction heads form. Boundaries are turns
    and local minima of |dλ̂/dlog t| only (design.md §7): the burst's edges are neither (the rise speeds up
    from the trough on and slows down to the end), so the burst is inside the last A stage; the rule that
    cut it out (any change of speed) also cut steady rises linear in step into 2-3 stages."""
    stages = find_stages(DEMO_GRID, DEMO.llc_mean, DEMO_SE)
    assert stages[0].start == 0 and stages[-1].end == 3000, stages
    assert all(a.end == b.start for a, b in zip(stages[:-1], stages[1:]))
    falls = [s for s in stages if s.type == "B"]
    assert len(falls) == 1, stages
    assert _within_one_checkpoint(DEMO_GRID, falls[0].start, 8, 1), stages
    assert _within_one_checkpoint(DEMO_GRID, falls[0].end, 122, 1), stages
    llc, se = DEMO.set_index("step").llc_mean, DEMO.set_index("step").llc_se
    for s in stages:  # no stage's type contradicts the raw change over it beyond its SE
        change, noise = llc[s.end] - llc[s.start], np.hypot(se[s.end], se[s.start])
        assert change > -noise if s.type == "A" else change < noise, (s, change, noise)
    # measured with the defaults
    assert [(s.end, s.type) for s in stages] == [(8, "A"), (122, "B"), (3000, "A")]


def _monotone_curves(x):
    """Monotone in log-step, slope varying by at most 1.8x over the run: straight, convex, concave."""
    return {"log": 1.5 + 2.5 * x, "convex": 1.5 + 1.8 * x + 0.09 * x**2, "concave": 1.5 + 3.2 * x - 0.09 * x**2}


@pytest.mark.parametrize("seed", range(3))
def test_monotone_curves_on_the_demo_grid_are_one_stage(seed):
    """Noise at the demo's SEs on the demo's merged grid (close pairs) makes no boundary, rising or falling."""
    x = np.log(DEMO_GRID + 1)
    noise = DEMO_SE * np.random.default_rng(seed).normal(size=len(x))
    for curve in _monotone_curves(x).values():
        assert find_stages(DEMO_GRID, curve + noise, DEMO_SE) == [Stage(0, 3000, "A")]
        assert find_stages(DEMO_GRID, -curve + noise, DEMO_SE) == [Stage(0, 3000, "B")]


@pytest.mark.slow
def test_spurious_boundaries_on_noisy_monotone_curves_are_rare():
    """Over 100 noise draws per curve and direction, at most 1 in 20 gets a boundary (measured: 0 of 600;
    the earlier fit, with knots at Akaike's price and never moved after being added: 2 of 600)."""
    x = np.log(DEMO_GRID + 1)
    for curve in _monotone_curves(x).values():
        for sign in (1, -1):
            split = sum(len(find_stages(DEMO_GRID, sign * curve + DEMO_SE * np.random.default_rng(seed).normal(
                size=len(x)), DEMO_SE)) > 1 for seed in range(100))
            print(f"monotone on the demo grid, sign {sign:+d}: {split} of 100 split")
            assert split <= 5, split


DEMO_KNOTS = [(0, 1.5), (8, 3.2), (122, 2.3), (1286, 7.7), (1714, 18.9), (3000, 21.4)]


def _demo_shape_recovered(seed: int) -> bool:
    """The demo's shape on the demo grid with its SEs (rise, fall, slow rise, burst, slow rise) and noise at
    the SE: types A B A (the burst inside the last rise), boundaries within one checkpoint."""
    llc = _log_piecewise(DEMO_GRID, DEMO_KNOTS, 1) + DEMO_SE * np.random.default_rng(seed).normal(size=len(DEMO_GRID))
    stages = find_stages(DEMO_GRID, llc, DEMO_SE)
    return [s.type for s in stages] == ["A", "B", "A"] and all(
        _within_one_checkpoint(DEMO_GRID, s.end, true, 1) for s, (true, _) in zip(stages[:-1], DEMO_KNOTS[1:3]))


@pytest.mark.slow
def test_demo_shape_is_recovered_in_most_noise_draws():
    """The fall is 5.5 SE in all but ~2 SE between neighbours: measured 50 of 50 draws recovered (the earlier
    fit, its knots never moved after being added: 38; its misses lost the fall or placed its ends two
    checkpoints off)."""
    recovered = sum(_demo_shape_recovered(seed) for seed in range(50))
    print(f"demo shape: {recovered} of 50 recovered")
    assert recovered >= 45, recovered


@pytest.mark.parametrize("seed", range(3))
def test_known_stages_on_uneven_grids_with_noise_at_the_se(seed):
    assert _demo_shape_recovered(seed)  # all 50 of the slow test are recovered
    # a random log-uniform grid merged with a linear one, SEs varying by 3x: peak, trough, slow rise, burst
    rng = np.random.default_rng(100 + seed)
    steps = np.unique(np.r_[0, np.round(np.exp(rng.uniform(0, np.log(1e5), 80))), np.linspace(0, 1e5, 41).round()])
    se = rng.uniform(0.05, 0.15, len(steps))
    knots = [(0, 0), (300, 4), (3000, 2), (10_000, 3), (14_000, 12), (100_000, 14)]
    stages = find_stages(steps, _log_piecewise(steps, knots, 1) + se * rng.normal(size=len(steps)), se)
    assert [s.type for s in stages] == ["A", "B", "A"], stages  # the burst is inside the last rise
    assert _near(stages[0].end, 300, 1.1), stages  # measured 289-296
    assert _near(stages[1].end, 3000, 1.3), stages  # a shallow trough (a fall, then a slow rise): measured 2845-3728


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_peak_and_trough_are_boundaries(seed):
    llc = _piecewise([(0, 0), (2000, 10), (8000, 6), (100_000, 12)], noise=0.02, seed=seed)
    stages = find_stages(STEPS, llc)
    assert [s.type for s in stages] == ["A", "B", "A"]
    assert _near(stages[0].end, 2000, 1.05) and _near(stages[1].end, 8000, 1.05), stages
    assert stages[0].start == 0 and stages[-1].end == 100_000
    assert all(a.end == b.start for a, b in zip(stages[:-1], stages[1:]))


def test_plateaus_and_pauses_are_one_boundary_at_their_middle():
    """A flat stretch or a pause (a rise `ratio` times slower than the rises around it) is a boundary at its
    middle in steps, not a stage of its own; a flat-topped peak too; a flat end joins its neighbour."""
    middle = 4500
    for pause in (10, 10.3):  # flat, and a slow but significant rise
        llc = _piecewise([(0, 0), (3000, 10), (6000, pause), (100_000, 14)], noise=0.02)
        stages = find_stages(STEPS, llc)
        assert [s.type for s in stages] == ["A", "A"], (pause, stages)
        assert _near(stages[0].end, middle, 1.2), (pause, stages)  # measured 5200, 5000
    stages = find_stages(STEPS, _piecewise([(0, 0), (3000, 10), (6000, 10), (100_000, 4)], noise=0.02))
    assert [s.type for s in stages] == ["A", "B"] and _near(stages[0].end, middle, 1.2), stages
    assert find_stages(STEPS, _piecewise([(0, 0), (3000, 10), (100_000, 10)], noise=0.02)) == [Stage(0, 100_000, "A")]
    assert find_stages(STEPS, _piecewise([(0, 5), (3000, 5), (100_000, 0)], noise=0.02)) == [Stage(0, 100_000, "B")]


def test_a_burst_after_a_slow_rise_has_no_boundary_at_its_ends():
    """A fall, a slow rise, a burst, a slower rise: B A. The slow rise is no pause (the fall is only 1.6x
    faster in log-step, not `ratio` = 3), and the burst's ends are changes of speed, not local minima.
    Catches: a fit whose knots stay where the greedy search first put them (the first lands in the burst's
    middle; 11 knots, χ² 7314 against the true 3 knots' 953 gave wiggles that became B A A A)."""
    llc = _piecewise([(0, 10), (3000, 4), (20_000, 6), (30_000, 16), (100_000, 17)], noise=0.02)
    assert find_stages(STEPS, llc) == [Stage(0, 3000, "B"), Stage(3000, 100_000, "A")]
    fit = fit_piecewise_linear(np.log(STEPS + 100.0), llc, np.full(len(STEPS), 0.02))
    assert len(fit.knots) <= 6, fit.knots  # measured 6: the three bends, each bracketed by the one-per-gap rule


def test_monotone_curve_is_one_stage_and_falling_is_b():
    assert find_stages(STEPS, _piecewise([(0, 0), (100_000, 5)])) == [Stage(0, 100_000, "A")]
    assert find_stages(STEPS, _piecewise([(0, 5), (100_000, 0)])) == [Stage(0, 100_000, "B")]


def test_piecewise_fit_puts_knots_in_the_gaps_of_the_bends():
    """Noise-free, the fit finds exactly the three bends, each between the checkpoints around it, and
    reproduces the curve; a straight line gets no knot."""
    steps = np.array([0, 1, 3, 7, 20, 50, 90, 200, 450, 1000, 2500, 6000, 9000])
    x = np.log(steps + 1)
    y = np.interp(x, np.log([1, 9, 101, 1401, 9001]), [0, 4, 1, 6, 7])
    fit = fit_piecewise_linear(x, y, np.full(len(x), 0.1))
    assert len(fit.knots) == 3, fit.knots
    for knot, bend in zip(fit.knots, np.log([9, 101, 1401])):
        i = np.searchsorted(x, bend)
        assert x[i - 1] <= knot <= x[i + 1], (knot, bend)
    assert np.abs(fit.rows(x) @ fit.beta - y).max() < 0.2  # within 2 SE
    assert len(fit_piecewise_linear(x, 2 * x + 1, np.full(len(x), 0.1)).knots) == 0


def test_paper_llc_curve_gives_the_published_stages():
    """Hoogland et al. (2024), 2-layer LM: boundaries ≈ 900, 6.5k, 8.5k, 17.5k; types A, A, B, A, A."""
    df = pd.read_csv(PAPER_LLC)
    stages = find_stages(df.step, df.llc_mean)
    assert [s.type for s in stages] == ["A", "A", "B", "A", "A"], stages
    ends = [s.end for s in stages[:-1]]
    # measured: 800, 6200, 8600, 14900. The last is the middle of the flat piece that fits best after the
    # rise out of the trough (-15%; the fit with unmoved knots and the flattest-piece middle gave 22.2k, +27%)
    for found, published, within in zip(ends, [900, 6500, 8500, 17_500], [1.15, 1.15, 1.15, 1.3]):
        assert 1 / within <= found / published <= within, (ends, published)
    # without the floor on a stage's change, the curve's small wiggles past 17.5k become stages of their own
    assert len(find_stages(df.step, df.llc_mean, min_change=0)) > 5


def test_stages_frame_and_validation():
    stages = [Stage(0, 800, "A"), Stage(800, 5000, "B")]
    frame = stages_frame(stages)
    assert list(frame.columns) == ["stage", "start", "end", "type"]
    assert frame.stage.tolist() == [1, 2] and frame.type.tolist() == ["A", "B"]
    assert len(stages_frame([])) == 0
    with pytest.raises(ValueError, match="strictly increasing"):
        find_stages([0, 200, 100, 300, 400], np.arange(5.0))
    with pytest.raises(ValueError, match="NaN"):
        find_stages(np.arange(5), [0, 1, np.nan, 3, 4])
    with pytest.raises(ValueError, match="length >= 4"):
        find_stages(np.arange(3), np.arange(3.0))
    with pytest.raises(ValueError, match="one finite, positive standard error per checkpoint"):
        find_stages(np.arange(5), np.arange(5.0), [1, 1, 0, 1, 1])
    with pytest.raises(ValueError, match=r"^The 'z' option of find_stages must be >= 0; got -1\.$"):
        find_stages(np.arange(5), np.arange(5.0), z=-1)
    with pytest.raises(ValueError, match="'z' option of find_stages must be a finite number; got inf"):
        find_stages(np.arange(5), np.arange(5.0), z=np.inf)
    with pytest.raises(ValueError, match="'ratio' option .* must be > 1; got 1"):
        find_stages(np.arange(5), np.arange(5.0), ratio=1)
    with pytest.raises(ValueError, match="'min_width' option .* must be >= 0"):
        find_stages(np.arange(5), np.arange(5.0), min_width=-0.1)
    with pytest.raises(ValueError, match="'min_change' option .* must be >= 0 and < 1; got 1"):
        find_stages(np.arange(5), np.arange(5.0), min_change=1)
    with pytest.raises(ValueError, match="'stage_ratio' option of AnalysisConfig must be > 1; got 0.5"):
        AnalysisConfig(stage_ratio=0.5)
    with pytest.raises(ValueError, match="step \\+ offset > 0"):
        find_stages(np.arange(5), np.arange(5.0), offset=0)


def test_llc_stage_figure_renders(tmp_path):
    llc = _piecewise([(0, 0), (2000, 10), (8000, 6), (100_000, 12)], noise=0.02)
    stages = find_stages(STEPS, llc)
    fig = plot_llc_stages(STEPS, llc, stages, llc_std=np.full(len(llc), 0.5), loss=np.exp(-STEPS / 2e4))
    axes = fig.get_axes()
    assert len(axes) == 2
    for ax in axes:
        assert len(ax.patches) == len(stages)  # one shaded span per stage
        assert ax.get_xscale() == "symlog"
    colours = {tuple(np.round(p.get_facecolor()[:3], 3)) for p in axes[0].patches}
    assert len(colours) == 2  # A and B in two colours
    assert len(axes[0].collections) == 1  # the ±std band
    assert [t.get_text() for t in axes[0].texts] == ["1A", "2B", "3A"]
    fig.savefig(tmp_path / "llc.png")
    assert (tmp_path / "llc.png").stat().st_size > 10_000
    assert len(plot_llc_stages(STEPS, llc, stages).get_axes()) == 1


# The issue-21 shapes: 40 log-spaced checkpoints (0, 1 ... 1e5), 100 noise draws each, noise 3% of the curve's
# top like the demo's; with the SE given and without (the scatter's).
LOG_GRID = np.r_[0, np.unique(np.round(np.logspace(0, 5, 40)).astype(int))]
LOG_X = np.log(LOG_GRID + 1)
SHAPES = {
    "linear in step": 1 + 10 * LOG_GRID / LOG_GRID[-1],
    "linear in log-step": 1 + 2 * LOG_X,
    "sigmoid burst": 2 + 10 / (1 + np.exp(-(LOG_X - np.log(1000)) / 0.4)),
}


def _draws(curve, with_se, n=100):
    se = 0.03 * np.abs(curve).max() * np.ones_like(curve)
    return ["".join(s.type for s in find_stages(LOG_GRID, curve + se * np.random.default_rng(seed).normal(size=len(curve)),
                                                se if with_se else None)) for seed in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("with_se", [True, False])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_steady_rises_and_one_burst_are_one_stage_in_most_draws(shape, with_se):
    """A rise linear in step or in log-step, or one sigmoid burst, is one A stage (and its mirror one B
    stage), whatever the noise draw and with or without an SE; a stage of the other type is rare. Measured
    (of 100; SE / no SE; rising, falling): linear in step 100 / 95, 99 / 94 (the speed-change rule: 42 /
    40); linear in log-step 100 / 98, 100 / 99; sigmoid 99 / 96, 99 / 93; a stage of the other type in at
    most 3 rising and 6 falling draws. Catches: boundaries at any change of speed (a rise linear in step
    speeds up 10⁵-fold in log-step), turns accepted on noise."""
    for sign, one in ((1, "A"), (-1, "B")):
        found = _draws(sign * SHAPES[shape], with_se)
        other = sum(("B" if one == "A" else "A") in f for f in found)
        print(f"{shape}, {'SE given' if with_se else 'SE from the scatter'}, {one}: one stage in "
              f"{found.count(one)} of 100, the other type in {other}")
        assert found.count(one) >= 90, found
        assert other <= 6, found


@pytest.mark.slow
@pytest.mark.parametrize("with_se", [True, False])
def test_plateau_boundary_within_one_grid_step_of_its_middle(with_se):
    """Rise to 5 by step 300, flat to 3000, rise to 12: one boundary, at the plateau's middle checkpoint
    (log grid: ≈ 950) within one grid step. Measured (of 100): SE given 92 find it, 91 within one step; SE
    from the scatter 85 and 82 (the fit with unmoved knots, boundaries at the middle of its flattest pieces:
    67 and 59 with the SE). Catches: a plateau's middle taken from the free fit's knots (they wander along
    a noisy plateau), a noise dip on the plateau taken for two turns, a pause tested on point estimates of
    a tilted plateau."""
    curve = np.interp(LOG_X, np.log([1, 301, 3001, 100_001]), [0, 5, 5, 12])
    middle = int(np.argmin(abs(LOG_X - np.log(np.sqrt(301 * 3001)))))
    se = 0.03 * 12 * np.ones_like(curve)
    ok = 0
    for seed in range(100):
        stages = find_stages(LOG_GRID, curve + se * np.random.default_rng(seed).normal(size=len(curve)),
                             se if with_se else None)
        ok += len(stages) == 2 and abs(int(np.searchsorted(LOG_GRID, stages[0].end)) - middle) <= 1
    print(f"plateau, {'SE given' if with_se else 'SE from the scatter'}: {ok} of 100 within one grid step")
    assert ok >= (90 if with_se else 75), ok


def test_stage_se_is_the_larger_of_the_chains_se_and_the_scatter():
    """Catches: analyze reading stages against the chains' SE alone (checkpoint-to-checkpoint scatter above it
    makes single checkpoints stages, as on the dense icl-regression grid with 8 chains), or against the scatter
    alone (a smooth curve's slow wiggle, far below the chains' SE, cut into stages)."""
    steps = np.unique(np.round(np.geomspace(1, 3000, 40))).astype(int)
    rise = 10 / (1 + np.exp(-(np.log(steps) - np.log(100)) * 2))
    noisy = rise + np.random.default_rng(0).normal(0, 0.4, len(steps))  # scatter 0.4, chains' SE 0.05
    tiny = np.full(len(steps), 0.05)
    assert len(find_stages(steps, noisy, tiny)) > 1
    assert [s.type for s in find_stages(steps, noisy, stage_se(steps, noisy, tiny))] == ["A"]
    wiggly = rise + 0.3 * np.sin(np.log(steps) * 3)  # smooth: scatter ≪ chains' SE 0.5
    large = np.full(len(steps), 0.5)
    assert len(find_stages(steps, wiggly)) > 1
    assert np.allclose(stage_se(steps, wiggly, large), large)
    assert [s.type for s in find_stages(steps, wiggly, stage_se(steps, wiggly, large))] == ["A"]
    assert np.allclose(stage_se(steps, noisy, np.full(len(steps), np.nan)), stage_se(steps, noisy, np.full(len(steps), 1e-12)))
