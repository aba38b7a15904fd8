"""Which heads `analyze` samples: --heads / --layers, the same in AnalysisConfig, and the default at GPT-2 size."""

import pytest

from tl_devinterp.analysis import AnalysisConfig, head_scope
from tl_devinterp.cli import main


def test_heads_and_layers_choose_the_sampled_heads():
    """Catches: --layers/--heads ignored (every head sampled), heads outside the model accepted."""
    assert head_scope(AnalysisConfig(layers=[1]), 2, 4) == ([(1, h) for h in range(4)], None)
    assert head_scope(AnalysisConfig(heads=["l0h3", "L1H0"]), 2, 4) == ([(0, 3), (1, 0)], None)
    with pytest.raises(ValueError, match="layers=.*12 layers"):
        head_scope(AnalysisConfig(layers=[12]), 12, 12)
    with pytest.raises(ValueError, match=r"L0H12.*12 heads"):
        head_scope(AnalysisConfig(heads=["l0h12"]), 12, 12)
    with pytest.raises(TypeError, match="'layers' option of AnalysisConfig must be a list of integers"):
        AnalysisConfig(layers=["1"])


def test_the_default_at_gpt2_size_is_three_layers_at_three_checkpoints():
    """Catches: the default samples all 144 heads of GPT-2 small at every checkpoint (hours a checkpoint on a
    CPU), or the auto scope overriding what the user chose."""
    heads, steps = head_scope(AnalysisConfig(), 12, 12)
    assert sorted({layer for layer, _ in heads}) == [0, 6, 11] and len(heads) == 36 and steps == 3
    assert head_scope(AnalysisConfig(), 2, 4) == ([(layer, h) for layer in range(2) for h in range(4)], None)
    assert head_scope(AnalysisConfig(head_steps=5), 12, 12)[1] is None  # the user's head_steps
    assert len(head_scope(AnalysisConfig(auto_scope=False), 12, 12)[0]) == 144
    assert len(head_scope(AnalysisConfig(layers=[3]), 12, 12)[0]) == 12


def test_the_command_line_reads_heads_and_layers(quick_series_dir, tmp_path, capsys):
    """Catches: the flags missing from the CLI, or a head outside the model found only after sampling."""
    with pytest.raises(SystemExit) as e:
        main(["analyze", str(quick_series_dir), "--out", str(tmp_path / "r"), "--layers", "0", "7", "--quiet"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "layers=[0, 7]" in err and "drop [7]" in err and err.count("\n") == 1
    assert not (tmp_path / "r" / "store").exists()


def test_the_plan_counts_chains_and_coordinates_and_splits_what_does_not_fit(monkeypatch):
    """Catches: a plan that miscounts what it samples, or one that runs out of memory instead of stacking
    fewer chains per forward (and refusing with the fix when even one chain does not fit)."""
    import torch

    import tl_devinterp.sampling.plan as plan_module
    from tl_devinterp.models import ModelConfig, build_model
    from tl_devinterp.sampling import SGLDConfig, resolve_restriction

    model = build_model(ModelConfig(n_layers=2, n_heads=2, d_model=16, n_ctx=16, d_vocab=32))
    tokens = torch.randint(0, 32, (32, 16), generator=torch.Generator().manual_seed(0))
    restrictions = [resolve_restriction(model, (1, h)) for h in range(2)]
    config = SGLDConfig(num_chains=2, num_draws=10, num_burnin=5, batch_size=8, max_batched=4)
    plan = plan_module.plan_llcs(model, tokens, restrictions, config)
    assert (plan.chains, plan.coordinates, plan.steps, plan.max_batched) == (4, 4 * restrictions[0].d, 15, 4)
    assert plan.peak_bytes >= plan.baseline_bytes > 0 and plan.seconds > 0 and "4 chains" in str(plan)

    monkeypatch.setattr(plan_module, "available_memory", lambda device: -1)  # no plan fits (a tiny one may need 0 B more)
    calls = []
    sample = plan_module.sample_llcs  # each probe is one short sampling run with the config it tries
    monkeypatch.setattr(plan_module, "sample_llcs", lambda *a, **k: calls.append(a[3].max_batched) or sample(*a, **k))
    with pytest.raises(ValueError, match="does not fit: sample fewer heads"):
        plan_module.plan_llcs(model, tokens, restrictions, config)
    assert calls == [4, 2, 1]


def test_prior_dominated_estimates_are_said_in_the_headline_and_beside_stages(tmp_path):
    """Catches: a report of prior-dominated LLCs (Trainer checkpoints and GPT-2-size models under the default
    setting) read as the model's LLC, with stages drawn from them and nothing said beside them."""
    import pandas as pd

    from tl_devinterp.analysis import AnalysisResult
    from tl_devinterp.dynamics import Stage
    from tl_devinterp.visualisation.report import analysis_report, proxy_headline

    steps = [0, 10, 20, 30]
    llc = pd.DataFrame(dict(step=steps, scope="model", layer=pd.NA, head=pd.NA, llc_mean=[1.0, 2, 3, 3.1],
                            llc_std=0.1, llc_se=0.05, init_loss=[4.0, 3, 2, 1.9], regime=["prior", "prior", "likelihood", "prior"]))
    assert proxy_headline(llc).startswith("3 of 4 LLC estimates are prior-dominated")
    assert proxy_headline(llc.assign(regime="likelihood")) == ""
    # a regime that names a too-coarse ε first (the demo's) is still counted when the prior dominates too
    coarse = llc.assign(regime="step size", likelihood_fraction=[0.003, 0.9, 0.9, 0.9], prior_share=[1.0, 1.0, 0.1, 0.1])
    assert proxy_headline(coarse).startswith("2 of 4 LLC estimates are prior-dominated")
    result = AnalysisResult(llc=llc, metrics=None, head_classes=None, stages=[Stage(0, 20, "A"), Stage(20, 30, "B")],
                            ed=None, loss_differences=None, attention=[], sample_tokens=[], out_dir=tmp_path)
    page = analysis_report(result, tmp_path / "report.html").read_text()
    assert 'id="proxy-headline"' in page and page.index("proxy-headline") < page.index("checkpoints analysed")
    assert "The stages are derived from LLC estimates of which 3 of 4 are prior-dominated" in page
    clean = analysis_report(AnalysisResult(**{**result.__dict__, "llc": llc.assign(regime="likelihood")}),
                            tmp_path / "clean.html").read_text()
    assert "proxy-headline" not in clean and "prior-dominated:" not in clean
