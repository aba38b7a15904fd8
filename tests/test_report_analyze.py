"""`analyze` on a trained quick series: outputs, resuming after an interruption, and input errors."""

import pandas as pd
import pytest

import tl_devinterp.sampling.llc_series as llc_module
from tl_devinterp.analysis import AnalysisConfig, analyze
from tl_devinterp.series import CheckpointSeries, SeriesError

FAST = dict(num_chains=2, num_draws=4, num_burnin=2, batch_size=16, head_steps=2, n_test_seqs=32, n_probe_seqs=8)


class Interrupt(Exception):
    pass


def counting_series(path, stop_after=None):
    """The series at `path`, counting loads and raising Interrupt at load number `stop_after`."""
    saved = CheckpointSeries.from_dir(path)

    def loader(step):
        series.loads += 1
        if stop_after is not None and series.loads >= stop_after:
            raise Interrupt
        return saved.load(step)

    series = CheckpointSeries(saved.steps, loader, meta=saved.meta, fingerprint=saved.known_fingerprint)
    series.loads = 0
    return series


@pytest.mark.slow
def test_analyze_resumes_without_recomputing(quick_series_dir, tmp_path, monkeypatch):
    calls = []
    sample = llc_module.sample_llcs
    monkeypatch.setattr(llc_module, "sample_llcs", lambda *a, **k: calls.append(1) or sample(*a, **k))
    out = tmp_path / "report"

    with pytest.raises(Interrupt):  # stopped during the full-model LLCs (after the plan's load): 4 checkpoints done
        analyze(counting_series(quick_series_dir, stop_after=6), out, progress=False, **FAST)
    done = {f: f.stat().st_mtime_ns for f in (out / "store").rglob("step_*.csv")}
    assert len(done) == 4 and len(calls) == 4
    assert not (out / "report.html").exists()

    series = counting_series(quick_series_dir)
    first = analyze(series, out, progress=False, **FAST)
    assert len(calls) == 4 + len(series) - 4 + 2  # only the checkpoints that had not finished, then 2 head steps
    assert {f: f.stat().st_mtime_ns for f in done} == done  # finished results were not rewritten

    files = {f: f.stat().st_mtime_ns for f in (out / "store").rglob("step_*.csv")}
    again = analyze(counting_series(quick_series_dir), out, progress=False, **FAST)
    assert len(calls) == len(series) + 2  # nothing sampled the third time
    assert {f: f.stat().st_mtime_ns for f in files} == files
    pd.testing.assert_frame_equal(first.llc, again.llc)
    pd.testing.assert_frame_equal(first.metrics, again.metrics)

    # what the run wrote
    steps = series.steps
    heads = first.llc[first.llc["scope"] == "head"]
    assert sorted(heads["step"].unique()) == [steps[0], steps[-1]] and len(heads) == 2 * 4  # 2 layers x 2 heads
    assert sorted(first.llc.loc[first.llc["scope"] == "model", "step"]) == steps
    for name in ("llc", "metrics", "head_classes", "stages", "essential_dynamics", "loss_differences"):
        assert (out / "results" / f"{name}.csv").stat().st_size > 0
    stages = pd.read_csv(out / "results" / "stages.csv")
    assert stages["start"].iloc[0] == steps[0] and stages["end"].iloc[-1] == steps[-1]
    assert len(first.attention) == len(first.stages) + 1  # one view per stage boundary
    assert len(first.loss_differences) == len(first.stages) * (len(first.sample_tokens) - 1)
    assert first.report == out / "report.html" and (out / "figures" / "llc-stages.png").exists()


def test_analyze_input_errors(quick_series_dir, tmp_path):
    with pytest.raises(SeriesError, match="is not a directory.*tl-devinterp train"):
        analyze(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(SeriesError, match="manifest.json not found"):
        analyze(tmp_path, tmp_path / "out")
    series = CheckpointSeries.from_dir(quick_series_dir)
    with pytest.raises(SeriesError, match="needs at least 4"):
        analyze(series.subset(series.steps[:3]), tmp_path / "out")
    models = [series.load(s) for s in series.steps[:4]]
    with pytest.raises(ValueError, match="records no data spec.*pass data="):
        analyze(CheckpointSeries.from_models(models, series.steps[:4]), tmp_path / "out")
    with pytest.raises(ValueError, match="sample_index=999 is out of range"):
        analyze(series, tmp_path / "out", sample_index=999)


@pytest.mark.slow
def test_cli_head_steps_none_and_calibrate(quick_series_dir, tmp_path):
    """`--head-steps none` estimates every head at every checkpoint; `--calibrate` records its runs and choice (none within a 400-step budget)."""
    import json

    from tl_devinterp.cli import main

    out = tmp_path / "report"
    main(["analyze", str(quick_series_dir), "--out", str(out), "--quiet", "--head-steps", "none", "--calibrate",
          "--calibrate-steps", "400",
          "--num-chains", "2", "--num-draws", "4", "--num-burnin", "2", "--batch-size", "16", "--n-test-seqs", "32",
          "--n-probe-seqs", "8"])
    llc = pd.read_csv(out / "results" / "llc.csv")
    steps = sorted(llc["step"].unique())
    assert sorted(llc.loc[llc["scope"] == "head", "step"].unique()) == steps
    assert (llc.loc[llc["scope"] == "head"].groupby("step").size() == 4).all()
    assert llc["llc_mean"].notna().all()
    runs = pd.read_csv(out / "results" / "calibration.csv")
    assert runs["checkpoint"].nunique() == 3 and {"nbeta", "epsilon", "num_burnin", "llc_mean"} <= set(runs.columns)
    config = json.loads((out / "config.json").read_text())
    assert "calibration" in config and config["head_steps"] is None
    assert AnalysisConfig.from_file(out / "config.json").calibrate  # the file analyze wrote reads back
    page = (out / "report.html").read_text()
    assert f"chose {config['calibration']}" in page and "sampler diagnostics per checkpoint" in page
