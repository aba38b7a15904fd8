"""compare_series aligns two series with the right differences and SEs; cluster_heads groups heads by trajectory."""

import numpy as np
import pandas as pd
import pytest

from tl_devinterp import Intervention, cluster_heads, compare_series, plot_head_clusters, train
from tl_devinterp.compare import phase_change

STEPS = [0, 10, 100, 1000]


def _analysis_dir(path, *, llc, se, pm, extra_step=None):
    """An analyze output folder with llc/metrics/stages CSVs: model LLC `llc[i]` ± `se`, head L1H0's
    prefix-matching score `pm[i]`, the other head at 0.1."""
    steps = STEPS + ([extra_step] if extra_step else [])
    llc = list(llc) + [0.0] * (len(steps) - len(llc))
    pm = list(pm) + [0.0] * (len(steps) - len(pm))
    results = path / "results"
    results.mkdir(parents=True)
    pd.DataFrame([dict(step=s, scope="model", layer=pd.NA, head=pd.NA, llc_mean=v, llc_std=1.0, llc_se=se, d=10,
                       init_loss=1.0) for s, v in zip(steps, llc)]).to_csv(results / "llc.csv", index=False)
    rows = [dict(step=s, metric="prefix_matching", layer=1, head=0, value=v) for s, v in zip(steps, pm)]
    rows += [dict(step=s, metric="prefix_matching", layer=1, head=1, value=0.1) for s in steps]
    rows += [dict(step=s, metric="loss", layer=pd.NA, head=pd.NA, value=5.0 - i) for i, s in enumerate(steps)]
    pd.DataFrame(rows).to_csv(results / "metrics.csv", index=False)
    pd.DataFrame([dict(stage=1, start=0, end=steps[-1], type="A")]).to_csv(results / "stages.csv", index=False)
    return path


def test_compare_aligns_common_steps_with_difference_and_its_se(tmp_path):
    """Catches a wrong sign, SEs added instead of in quadrature, and unaligned steps."""
    a = _analysis_dir(tmp_path / "a", llc=[1, 2, 3, 4], se=0.3, pm=[0.0, 0.2, 0.5, 0.9])
    b = _analysis_dir(tmp_path / "b", llc=[1, 3, 5, 4, 9], se=0.4, pm=[0.0, 0.1, 0.2, 0.35, 0.8], extra_step=5000)
    c = compare_series(a, b, labels=("base", "ablated"))
    llc = c.aligned[c.aligned["quantity"] == "llc"]
    assert llc["step"].tolist() == STEPS  # step 5000 exists in b only
    assert llc["diff"].tolist() == [0, 1, 2, 0] and np.allclose(llc["diff_se"], 0.5)
    assert c.aligned.loc[c.aligned["quantity"] == "loss", "diff_se"].isna().all()  # no SE, none invented
    pm = c.aligned[(c.aligned["quantity"] == "prefix_matching") & (c.aligned["head"] == 0)]
    assert np.allclose(pm["diff"], [0, -0.1, -0.3, -0.55])
    phases = c.phase_changes.set_index("series")
    assert phases.loc["base", "step"] == 100 and phases.loc["ablated", "step"] == 1000
    assert phases.loc["ablated", "final"] == 0.8  # the best score at b's own last step
    assert set(c.stages["series"]) == {"base", "ablated"}
    out = c.write(tmp_path / "cmp")
    page = out.read_text()
    assert 'id="fig-compare-curves"' in page and 'id="fig-compare-heads"' in page
    assert (tmp_path / "cmp" / "comparison.csv").exists() and (tmp_path / "cmp" / "figures" / "compare-curves.png").exists()


def test_phase_change_is_the_first_crossing_of_the_best_head():
    frame = pd.DataFrame(dict(step=[0, 0, 5, 5, 9, 9], metric="prefix_matching", layer=[1] * 6,
                              head=[0, 1] * 3, value=[0.0, 0.1, 0.2, 0.31, 0.5, 0.2]))
    assert phase_change(frame) == dict(metric="prefix_matching", threshold=0.3, step=5, layer=1, head=1, final=0.5)
    never = phase_change(frame, threshold=0.6)
    assert pd.isna(never["step"]) and never["final"] == 0.5
    with pytest.raises(ValueError, match="no per-head 'copying'"):
        phase_change(frame, metric="copying")


def test_compare_two_trained_series(tmp_path):
    """End to end on series folders: an intervened run against its plain twin, head scores measured."""
    plain = train(tmp_path / "plain", "quick", progress=False, n_steps=20)
    ablated = train(tmp_path / "ablated", "quick", progress=False, n_steps=20,
                    interventions=[Intervention("blocks.0.attn.hook_z", "zero", head=0)])
    c = compare_series(tmp_path / "plain", tmp_path / "ablated", n_test_seqs=16, n_probe_seqs=8)
    assert sorted(c.aligned["step"].unique()) == plain.steps == ablated.steps
    loss = c.aligned[c.aligned["quantity"] == "loss"]
    assert loss["diff"].iloc[0] == 0 and (loss["diff"].iloc[1:] != 0).any()  # same init, then apart
    with pytest.raises(ValueError, match="head score"):
        compare_series(tmp_path / "plain", tmp_path / "ablated", metric="loss")


def _trajectories():
    """Six heads in three shapes: rising early (L0H0, L0H1), rising late (L1H0, L1H1), flat (L0H2, L1H2)."""
    steps = np.array([0, 10, 100, 1000, 3000])
    shapes = {"early": [0, 0.8, 0.9, 0.9, 0.9], "late": [0, 0, 0.05, 0.6, 0.9], "flat": [0.05] * 5}
    kind = {(0, 0): "early", (0, 1): "early", (1, 0): "late", (1, 1): "late", (0, 2): "flat", (1, 2): "flat"}
    rng = np.random.default_rng(0)
    rows = [dict(step=s, metric="previous_token", layer=la, head=h, value=v + 0.01 * rng.normal())
            for (la, h), k in kind.items() for s, v in zip(steps, shapes[k])]
    return pd.DataFrame(rows), kind


def test_cluster_heads_recovers_trajectory_shapes_and_relates_them_to_classes():
    metrics, kind = _trajectories()
    classes = pd.DataFrame([dict(layer=la, head=h, label=k) for (la, h), k in kind.items()])
    c = cluster_heads(metrics, n_clusters=3, classes=classes)
    groups = c.assignments.groupby("cluster")["label"].apply(set).tolist()
    assert sorted(map(sorted, groups)) == [["early"], ["flat"], ["late"]]
    assert (c.table.to_numpy().max(1) == 2).all()  # each cluster holds the two heads of one class
    assert c.linkage.shape == (5, 4)
    # an LLC frame (head rows) combines with the metrics; quantities can be chosen
    llc = metrics.assign(scope="head", llc_mean=metrics["value"] * 100)
    both = cluster_heads([llc, metrics], n_clusters=3, classes=classes)
    assert set(both.curves["quantity"]) == {"rllc", "previous_token"}
    assert both.curves["normalised"].abs().max() <= 1 + 1e-9
    fig = plot_head_clusters(both)
    assert len(fig.axes) == 1 + 3  # dendrogram + one panel per cluster


def test_cluster_heads_normalisation_and_errors():
    metrics, _ = _trajectories()
    shape_only = cluster_heads(metrics, n_clusters=2, normalise="head")
    curves = shape_only.curves.groupby(["layer", "head"])["normalised"]
    assert np.allclose(curves.min(), 0) and np.allclose(curves.max(), 1)
    with pytest.raises(ValueError, match="normalise must be one of"):
        cluster_heads(metrics, normalise="zscore")
    with pytest.raises(ValueError, match="No per-head rows of"):
        cluster_heads(metrics, quantities=["rllc"])
    with pytest.raises(ValueError, match="Expected an LLC frame"):
        cluster_heads(pd.DataFrame({"x": [1]}))
    with pytest.raises(ValueError, match="at least 2"):
        cluster_heads(metrics[metrics["step"] == 0])
