"""Stages from the LLC curve: known boundaries of synthetic curves, the paper's own LLC curve, the table and
the figure."""

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest

from tl_devinterp import Stage, find_stages, stages_frame
from tl_devinterp.training import checkpoint_schedule
from tl_devinterp.visualisation.dynamics import plot_llc_stages

matplotlib.use("Agg")

PAPER_LLC = Path(__file__).parent / "data" / "paper_l2_llc.csv"
STEPS = np.arange(0, 100_001, 100)


def _piecewise(knots: list[tuple[float, float]], noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """λ linear in log(step + 100) between (step, value) knots, plus Gaussian noise of sd `noise`."""
    x = np.log(STEPS + 100)
    kx, ky = zip(*knots)
    y = np.interp(x, np.log(np.array(kx) + 100), ky)
    return y + noise * np.random.default_rng(seed).normal(size=len(y))


def _near(found: int, true: float, factor: float) -> bool:
    return 1 / factor <= (found + 100) / (true + 100) <= factor


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_peak_and_trough_are_boundaries(seed):
    llc = _piecewise([(0, 0), (2000, 10), (8000, 6), (100_000, 12)], noise=0.02, seed=seed)
    stages = find_stages(STEPS, llc)
    assert [s.type for s in stages] == ["A", "B", "A"]
    assert _near(stages[0].end, 2000, 1.15) and _near(stages[1].end, 8000, 1.15), stages
    assert stages[0].start == 0 and stages[-1].end == 100_000
    assert all(a.end == b.start for a, b in zip(stages[:-1], stages[1:]))


def test_plateau_is_a_boundary_at_its_middle():
    llc = _piecewise([(0, 0), (3000, 10), (6000, 10), (100_000, 14)], noise=0.02)
    stages = find_stages(STEPS, llc)
    assert [s.type for s in stages] == ["A", "A"]
    assert _near(stages[0].end, np.sqrt(3100 * 6100) - 100, 1.1), stages  # the plateau's middle in log-step


def test_monotone_curve_is_one_stage_and_falling_is_b():
    assert find_stages(STEPS, _piecewise([(0, 0), (100_000, 5)])) == [Stage(0, 100_000, "A")]
    assert find_stages(STEPS, _piecewise([(0, 5), (100_000, 0)])) == [Stage(0, 100_000, "B")]


DEMO_GRID = np.array(checkpoint_schedule(3000, 16, 14))  # merged log + linear: close pairs 208/214, 1714/1759


def _log_piecewise(steps, knots, offset):
    kx, ky = zip(*knots)
    return np.interp(np.log(steps + offset), np.log(np.array(kx) + offset), ky)


@pytest.mark.parametrize("seed", range(8))
def test_monotone_curves_on_the_demo_grid_are_one_stage(seed):
    """The old rule's kernel shrank at close pairs and cut monotone curves there; SE-level noise must not."""
    x, se = np.log(DEMO_GRID + 1), np.full(len(DEMO_GRID), 0.03)
    noise = se * np.random.default_rng(seed).normal(size=len(x))
    for curve in (0.5 * x, 3 + 3 / (1 + np.exp(-(x - 6) * 3)), 3 + 3 / (1 + np.exp(-(DEMO_GRID - 1500) / 150)),
                  6 - 3 * np.exp(-DEMO_GRID / 500)):
        assert find_stages(DEMO_GRID, curve + noise, se) == [Stage(0, 3000, "A")]
        assert find_stages(DEMO_GRID, -(curve + noise), se) == [Stage(0, 3000, "B")]


@pytest.mark.parametrize("seed", range(6))
def test_known_stages_on_uneven_grids_with_noise_at_the_se(seed):
    # the demo grid: a fall over 8 -> 122 (the one the old rule missed), a rise to 1500, a fall
    se = np.full(len(DEMO_GRID), 0.03)
    llc = _log_piecewise(DEMO_GRID, [(0, 3.1), (8, 3.16), (122, 2.3), (1500, 6.5), (3000, 6.0)], 1)
    llc = llc + se * np.random.default_rng(seed).normal(size=len(llc))
    stages = find_stages(DEMO_GRID, llc, se)
    assert [(s.end, s.type) for s in stages] == [(122, "B"), (1500, "A"), (3000, "B")]
    # a random log-uniform grid merged with a linear one, SEs varying by 3x: peak, trough, slow rise
    rng = np.random.default_rng(100 + seed)
    steps = np.unique(np.r_[0, np.round(np.exp(rng.uniform(0, np.log(1e5), 80))), np.linspace(0, 1e5, 41).round()])
    se = rng.uniform(0.05, 0.15, len(steps))
    llc = _log_piecewise(steps, [(0, 0), (2000, 10), (8000, 6), (20000, 6.5), (30000, 9), (100_000, 12)], 100)
    stages = find_stages(steps, llc + se * rng.normal(size=len(steps)), se)
    assert [s.type for s in stages] == ["A", "B", "A"], stages
    assert _near(stages[0].end, 2000, 1.25) and _near(stages[1].end, 9000, 1.3), stages


def test_paper_llc_curve_gives_the_published_stages():
    """Hoogland et al. (2024), 2-layer LM: boundaries ≈ 900, 6.5k, 8.5k, 17.5k; types A, A, B, A, A."""
    df = pd.read_csv(PAPER_LLC)
    stages = find_stages(df.step, df.llc_mean)
    assert [s.type for s in stages] == ["A", "A", "B", "A", "A"], stages
    ends = [s.end for s in stages[:-1]]
    for found, published in zip(ends, [900, 6500, 8500, 17_500]):
        assert 1 / 1.15 <= found / published <= 1.15, (ends, published)  # measured: 800, 6300, 8500, 18300
    # heavier smoothing loses the weakest boundary (17.5k, where the rise only slows), as documented
    assert len(find_stages(df.step, df.llc_mean, sigma=0.15)) == 4


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
    with pytest.raises(ValueError, match="sigma"):
        find_stages(STEPS, np.arange(len(STEPS), dtype=float), sigma=0)
    with pytest.raises(ValueError, match="one finite, positive standard error per checkpoint"):
        find_stages(np.arange(5), np.arange(5.0), [1, 1, 0, 1, 1])
    with pytest.raises(ValueError, match="z .* must be >= 0"):
        find_stages(np.arange(5), np.arange(5.0), z=-1)


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
