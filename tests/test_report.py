"""Report, attention views, head plots and the analysis configuration, on synthetic frames (fast)."""

import base64
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from tl_devinterp.analysis import AnalysisConfig, AnalysisResult, top_heads, transition_steps
from tl_devinterp.dynamics import Stage, essential_dynamics_of_features
from tl_devinterp.models import ModelConfig, build_model, parse_head
from tl_devinterp.visualisation.attention import AttentionView, attention_patterns, attention_view
from tl_devinterp.visualisation.head_plots import CLASS_COLORS, plot_head_llcs, plot_head_scores
from tl_devinterp.visualisation.report import analysis_report
from tl_devinterp.visualisation.token_html import loss_difference_html

STEPS = [0, 1, 3, 10, 30, 100, 300, 1000]


def synthetic_result(out_dir) -> AnalysisResult:
    """An AnalysisResult in the documented tidy formats, with 3 stages, 2 layers x 2 heads."""
    rng = np.random.default_rng(0)
    heads = [(la, h) for la in range(2) for h in range(2)]
    llc = pd.DataFrame(
        [dict(step=s, scope="model", layer=pd.NA, head=pd.NA, llc_mean=10 + np.log1p(s), llc_std=0.5, d=500,
              init_loss=3 - np.log1p(s) / 3) for s in STEPS]
        + [dict(step=s, scope="head", layer=la, head=h, llc_mean=rng.random() * np.log1p(s), llc_std=0.1, d=100,
                init_loss=1.0) for s in STEPS[::2] for la, h in heads]
    )
    metrics = pd.DataFrame(
        [dict(step=s, metric=m, layer=la, head=h, value=rng.random()) for s in STEPS for la, h in heads
         for m in ("previous_token", "prefix_matching")]
        + [dict(step=s, metric="loss", layer=pd.NA, head=pd.NA, value=1.0) for s in STEPS]
    )
    classes = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1],
                            "label": ["previous-token", "other", "induction", "other"]})
    stages = [Stage(0, 10, "A"), Stage(10, 300, "A"), Stage(300, 1000, "B")]
    ed = essential_dynamics_of_features(rng.normal(size=(len(STEPS), 20)).cumsum(0), STEPS, n_components=3)
    tokens = ["<bos>"] + [str(t) for t in rng.integers(1, 50, 15)]
    boundaries = [0, 10, 300, 1000]
    loss_diff = pd.concat([pd.DataFrame({"step_from": a, "step_to": b, "position": np.arange(1, 16),
                                         "token": tokens[1:], "loss_diff": rng.normal(size=15)})
                           for a, b in zip(boundaries[:-1], boundaries[1:])])
    pattern = torch.softmax(torch.randn(2, 16, 16).masked_fill(torch.ones(16, 16).triu(1).bool(), -torch.inf), -1)
    attention = [(s, AttentionView(pattern, tokens, ["L0H0", "L1H0"])) for s in boundaries]
    return AnalysisResult(llc=llc, metrics=metrics, head_classes=classes, stages=stages, ed=ed,
                          loss_differences=loss_diff, attention=attention, sample_tokens=tokens, out_dir=out_dir)


EXPECTED_FIGURES = ["llc-stages", "head-llcs", "metrics", "head-scores", "essential-dynamics",
                    *(f"loss-diff-{i}" for i in range(3)), *(f"attention-{i}" for i in range(4))]


@pytest.fixture(scope="module")
def synthetic_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return analysis_report(synthetic_result(out), out / "report.html", figures_dir=out / "figures")


def test_report_has_every_figure_and_is_offline(synthetic_report):
    page = synthetic_report.read_text()
    assert re.findall(r'<figure class="tl-figure" id="fig-([\w-]+)"', page) == EXPECTED_FIGURES
    # nothing is fetched: no src/href to the network, no CDN import, images inline
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', page)
    assert "unpkg.com" not in page and "import " not in page.split("<body>")[1]
    images = re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 5 and all(base64.b64decode(b).startswith(b"\x89PNG") for b in images)
    assert page.count("var CircuitsVis=") == 1  # the bundle is inlined once for all views
    assert page.count('class="circuitsvis"') == 4
    assert sorted(p.name for p in (synthetic_report.parent / "figures").iterdir()) == sorted(
        f"{f}.png" for f in EXPECTED_FIGURES[:5])


def test_loss_difference_colours():
    html = loss_difference_html(["<bos>", "a", "b", "<c>"], [-1.0, 0.5, 0.0])
    spans = re.findall(r'<span class="tok"([^>]*)>([^<]*)</span>', html)
    assert [t for _, t in spans] == ["&lt;bos&gt;", "a", "b", "&lt;c&gt;"]
    assert "rgba(220,40,40,1.00)" in spans[1][0]  # loss fell by the most: full red
    assert "rgba(40,80,220,0.50)" in spans[2][0]  # rose by half the scale: half blue
    assert "0.00)" in spans[3][0]
    with pytest.raises(ValueError, match="one loss difference per predicted token"):
        loss_difference_html(["a", "b"], [1.0, 2.0])


def test_attention_patterns_read_the_hook():
    model = build_model(ModelConfig(n_layers=2, n_heads=2, d_model=16, n_ctx=12, d_vocab=20))
    tokens = torch.arange(10)
    pat = attention_patterns(model, tokens, ["l1h0", (0, 1)])
    _, cache = model.run_with_cache(tokens[None])
    assert pat.shape == (2, 10, 10)
    torch.testing.assert_close(pat[0], cache["blocks.1.attn.hook_pattern"][0, 0])
    torch.testing.assert_close(pat[1], cache["blocks.0.attn.hook_pattern"][0, 1])
    torch.testing.assert_close(pat.sum(-1), torch.ones(2, 10))
    view = attention_view(model, tokens, ["L0H1"], labels=[f"t{i}" for i in range(10)])
    html = view._repr_html_()
    assert html.startswith("<script>") and html.count("CircuitsVis.render(") == 1 and '"t9"' in html
    assert "https://" not in html.split("</script>", 1)[1]
    with pytest.raises(ValueError, match="does not exist"):
        attention_patterns(model, tokens, ["l2h0"])


def test_parse_head():
    assert parse_head("l1h3") == parse_head("L1H3") == parse_head((1, 3)) == (1, 3)
    with pytest.raises(ValueError, match="l1h3"):
        parse_head("head3")


def test_head_plots_draw_one_line_per_head_coloured_by_class():
    result = synthetic_result(None)
    fig = plot_head_llcs(result.llc, result.head_classes)
    axes = fig.axes
    assert [a.get_title() for a in axes] == ["layer 0", "layer 1"]
    lines = [ln for ln in axes[0].get_lines()]
    assert len(lines) == 2
    assert lines[0].get_color() == CLASS_COLORS["previous-token"] and lines[1].get_color() == CLASS_COLORS["other"]
    np.testing.assert_allclose(lines[0].get_ydata(), result.llc.query("scope == 'head' and layer == 0 and head == 0")
                               .sort_values("step")["llc_mean"].astype(float))
    fig = plot_head_scores(result.metrics)
    heatmaps = [a for a in fig.axes if a.get_images()]
    assert [a.get_title() for a in heatmaps] == ["previous token", "prefix matching"]
    assert heatmaps[0].get_images()[0].get_array().shape == (4, len(STEPS))
    with pytest.raises(ValueError, match="no per-head rows"):
        plot_head_llcs(result.llc[result.llc["scope"] == "model"])
    assert {a.get_xscale() for a in plot_head_llcs(result.llc).axes} == {"symlog"}
    assert {a.get_xscale() for a in plot_head_llcs(result.llc, xscale="linear").axes} == {"linear"}
    with pytest.raises(ValueError, match="xscale must be 'log' or 'linear'"):
        plot_head_llcs(result.llc, xscale="ln")


def test_config_from_files_and_overrides(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"num_draws": 7, "attention_heads": ["l0h1"]}))
    (tmp_path / "a.toml").write_text('num_draws = 7\nattention_heads = ["L0H1"]\n[thresholds]\nprefix_matching = 0.2\n')
    a, b = AnalysisConfig.from_file(tmp_path / "a.json"), AnalysisConfig.from_file(tmp_path / "a.toml")
    assert a.sgld.num_draws == b.sgld.num_draws == 7 and a.attention_heads == b.attention_heads == ["L0H1"]
    assert b.thresholds == {"prefix_matching": 0.2} and a.sgld.num_chains == AnalysisConfig().sgld.num_chains
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['num_drawz'\].*valid options"):
        AnalysisConfig.from_dict({"num_drawz": 3})
    with pytest.raises(ValueError, match="'num_chains' option of SGLDConfig must be >= 2"):
        AnalysisConfig.from_dict({"num_chains": 0})
    assert AnalysisConfig.quick(num_draws=5).sgld.num_draws == 5
    nested = AnalysisConfig.from_dict({"sgld": {"epsilon": 3e-4, "num_draws": 9}, "num_draws": 11})
    assert nested.sgld.epsilon == 3e-4 and nested.sgld.num_draws == 11  # flat options win over the table


def test_head_steps_and_top_heads():
    steps = [0, 10, 20, 30, 40, 50, 60, 70]
    llc = pd.DataFrame({"step": steps, "scope": "model", "llc_mean": [1, 1, 1, 1, 5, 9, 9, 9.0]})
    score = pd.DataFrame({"step": steps, "metric": "previous_token", "layer": 0, "head": 0,
                          "value": [0, 0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.9]})
    assert transition_steps(steps, None, llc, score) == steps and transition_steps(steps, 0, llc, score) == []
    # where the LLC (40, 50) and the head score (70, the last anyway; then 20) move, not spread over the index
    assert transition_steps(steps, 4, llc, score) == [0, 40, 50, 70]
    assert transition_steps(steps, 5, llc, score) == [0, 20, 40, 50, 70]
    metrics = pd.DataFrame({"step": [5] * 4, "metric": ["previous_token"] * 2 + ["prefix_matching"] * 2,
                            "layer": [0, 1, 0, 1], "head": [1, 0, 1, 0], "value": [0.9, 0.1, 0.8, 0.7]})
    assert top_heads(metrics) == ["L0H1", "L1H0"]  # the best induction head that is not already shown


def test_report_shows_head_trajectory_clusters(tmp_path):
    from tl_devinterp import cluster_heads

    result = synthetic_result(tmp_path)
    result.head_clusters = cluster_heads([result.llc, result.metrics], n_clusters=2, classes=result.head_classes)
    page = analysis_report(result, tmp_path / "report.html").read_text()
    ids = re.findall(r'<figure class="tl-figure" id="fig-([\w-]+)"', page)
    assert ids.index("head-clusters") == ids.index("head-scores") + 1 and "Heads per cluster and class" in page


def test_stage_table_names_the_head_score_that_moved_most():
    """A stage's row names what formed in it: the largest head-score change between its ends (a fall counts),
    with the values at both ends; model-level metrics and steps outside the stage are ignored."""
    from tl_devinterp.visualisation.report import stage_head_change

    rows = [(0, "previous_token", 0, 1, 0.1), (10, "previous_token", 0, 1, 0.2), (20, "previous_token", 0, 1, 0.9),
            (0, "prefix_matching", 1, 2, 0.5), (10, "prefix_matching", 1, 2, 0.05), (20, "prefix_matching", 1, 2, 0.1),
            (0, "loss", None, None, 9.0), (10, "loss", None, None, 1.0)]
    metrics = pd.DataFrame(rows, columns=["step", "metric", "layer", "head", "value"])
    assert stage_head_change(metrics, 0, 10) == "prefix_matching L1H2 0.50 → 0.05"
    assert stage_head_change(metrics, 10, 20) == "previous_token L0H1 0.20 → 0.90"
    assert stage_head_change(metrics, 0, 5) == "" and stage_head_change(None, 0, 10) == ""
