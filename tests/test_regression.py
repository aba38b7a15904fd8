"""The regression tasks (tasks.regression): data layout, loss, reference predictors and metrics against values
computed by hand, bad specs refused, and `train --preset P-quick` then `analyze` end to end on the CLI."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from tl_devinterp.cli import main
from tl_devinterp.models import ModelConfig
from tl_devinterp.tasks import (
    ICLRegression,
    SparseRegression,
    dmmse_predictions,
    make_task,
    ridge_predictions,
)
from tl_devinterp.tasks.regression import effective_rank, masked_mse
from tl_devinterp.training import PRESETS, train


def test_ridge_and_dmmse_predictions_by_hand():
    """Catches: the predictors using the current pair (or none) instead of the pairs before it, a wrong
    regulariser, or posterior weights with the wrong sign or scale."""
    x = torch.tensor([[[1.0], [3.0]]])  # D=1, K=2
    y = torch.tensor([[2.0, 5.0]])
    # ridge, noise 1: w = (1*2)/(1^2 + 1) = 1 after the first pair, so y2 is predicted as 3; y1 as 0
    assert torch.allclose(ridge_predictions(x, y, 1.0), torch.tensor([[0.0, 3.0]]))
    # dMMSE, pool {+1, -1}, noise 1: weights exp(-(2-1)^2/2) and exp(-(2+1)^2/2): w = tanh(2), y2 = 3 tanh(2)
    pool = torch.tensor([[1.0], [-1.0]])
    assert torch.allclose(dmmse_predictions(x, y, pool, 1.0), torch.tensor([[0.0, 3 * math.tanh(2.0)]]), atol=1e-6)


def test_reference_losses_match_their_closed_forms():
    """Catches: a data generator or predictor off by the noise or the prior: with no pair seen, both predict 0
    and lose D + σ² (Gaussian tasks); with a pool of one task, dMMSE knows w and loses σ² only."""
    task = ICLRegression({"kind": "icl-regression", "D": 3, "K": 4, "noise": 0.25, "n_test": 8192})
    x, y, _ = task.sample(8192, 2)
    ridge = ridge_predictions(x, y, 0.25)
    first = ((ridge[:, 0] - y[:, 0]) ** 2).mean()
    assert abs(first - (3 + 0.25)) < 0.15  # SE of the mean of (w.x + e)^2 ~ sqrt(2)*3.25/sqrt(8192) ~ 0.05
    assert ((ridge[:, -1] - y[:, -1]) ** 2).mean() < first  # ridge improves with pairs seen
    one = ICLRegression({"kind": "icl-regression", "D": 3, "K": 4, "M": 1, "noise": 0.25, "n_test": 8192})
    x, y, _ = one.sample(8192, 2)
    dmmse = ((dmmse_predictions(x, y, one.pool, 0.25) - y) ** 2).mean()
    assert abs(dmmse - 0.25) < 0.02  # SE ~ 0.25*sqrt(2/32768)
    assert one.reference()["dmmse"].shape == (8192, 4)


def test_icl_tokens_loss_and_metrics_of_a_silent_model():
    """Catches: x and y tokens swapped or misplaced, the loss read at y positions or averaged over unmarked ones,
    and metrics that do not come from the predictions (a model predicting 0 has loss mean y², prediction norm 0,
    ICL score = the change of E y² over the context, loss_minus_ridge = its loss minus ridge's)."""
    task = ICLRegression({"kind": "icl-regression", "D": 2, "K": 3, "noise": 0.1, "n_train": 8, "n_test": 64})
    (inputs, targets, mask), test = task.data()
    x, y, _ = task.sample(8, 1)
    assert torch.equal(inputs[:, 0::2, 1:], x) and torch.equal(inputs[:, 1::2, 0], y)
    assert (inputs[:, 0::2, 0] == 0).all() and (inputs[:, 1::2, 1:] == 0).all()
    assert torch.equal(targets[:, 0::2, 0], y) and torch.equal(mask[0], torch.tensor([1.0, 0, 1, 0, 1, 0]))
    model = task.build_model(ModelConfig(n_layers=1, n_heads=1, d_model=8, n_ctx=6, d_vocab=3, attn_only=False))
    with torch.no_grad():
        model.W_U.zero_()
        model.b_U.zero_()
    assert torch.isclose(masked_mse(model, (inputs, targets, mask)), (y ** 2).mean())
    with torch.no_grad():
        rows = {(m, layer): v for m, layer, _, v in task.metrics(model, test)}
    y_test = test[1][:, 0::2, 0]
    per_k = (y_test ** 2).mean(0)
    ridge = ((task.reference()["ridge"] - y_test) ** 2).mean()
    assert rows[("prediction_norm", None)] == 0
    assert rows[("loss", None)] == pytest.approx(float(per_k.mean()), rel=1e-5)
    assert rows[("icl_score", None)] == pytest.approx(float(per_k[-1] - per_k[0]), rel=1e-4, abs=1e-6)
    assert rows[("loss_minus_ridge", None)] == pytest.approx(float(per_k.mean() - ridge), rel=1e-4)
    assert rows[("ln_weight_norm", 0)] == pytest.approx(math.sqrt(2 * 8))  # ln1 and ln2 weights start at 1
    assert rows[("unembed_norm", None)] == 0


def test_effective_rank():
    """Catches: an effective rank that counts zero singular values or ignores their spread."""
    assert effective_rank(torch.diag(torch.tensor([1.0, 1.0, 0.0]))) == pytest.approx(2.0)
    assert effective_rank(torch.ones(4, 3)) == pytest.approx(1.0)


def test_sparse_targets_and_attention_metrics_of_uniform_attention():
    """Catches: a target that depends on another token than the relevant one, and attention metrics read at
    another query or key: with W_Q = 0 every position attends uniformly, so the last query puts 1/T on the
    relevant token with entropy log T."""
    task = SparseRegression({"kind": "sparse-regression", "D": 3, "T": 5, "relevant": 2, "n_train": 4, "n_test": 16})
    (x, targets, mask), test = task.data()
    assert torch.allclose(targets[:, -1], x[:, 2] @ task.teacher.T) and (targets[:, :-1] == 0).all()
    assert torch.equal(mask[0], torch.tensor([0.0, 0, 0, 0, 1]))
    model = task.build_model(ModelConfig(n_layers=1, n_heads=2, d_model=8, n_ctx=5, d_vocab=3, attn_only=True))
    with torch.no_grad():
        model.blocks[0].attn.W_Q.zero_()
        model.blocks[0].attn.b_Q.zero_()
        rows = {(m, h): v for m, _, h, v in task.metrics(model, test)}
    for h in (0, 1):
        assert rows[("relevant_attention", h)] == pytest.approx(1 / 5, abs=1e-5)
        assert rows[("attention_entropy", h)] == pytest.approx(math.log(5), abs=1e-5)


@pytest.mark.parametrize("spec, message", [
    ({"kind": "icl-regression", "K": 0}, r"The 'K' option of the 'icl-regression' data spec must be >= 1; got 0"),
    ({"kind": "icl-regression", "D": 0}, r"'D' option .* must be >= 1; got 0"),
    ({"kind": "sparse-regression", "D": 0}, r"'D' option .* must be >= 1; got 0"),
    ({"kind": "sparse-regression", "T": 8, "relevant": 8}, r"'relevant' option .* an integer in \[0, T - n_relevant\] = \[0, 7\]; got 8"),
    ({"kind": "sparse-regression", "T": 4, "n_relevant": 5}, r"^The 'n_relevant' option .* an integer in \[1, T\] = \[1, 4\]; got 5"),
    ({"kind": "sparse-regression", "T": 0}, r"'T' option .* must be >= 1; got 0"),
    ({"kind": "icl-regression", "K": 2.5}, r"'K' option .* must be an integer; got 2.5"),
    ({"kind": "icl-regression", "M": 0}, r"'M' option .* must be >= 1; got 0"),
    ({"kind": "icl-regression", "k": 3}, r"Unknown option\(s\) \['k'\] .* valid options: \['D', 'K', 'M',"),
    ({"kind": "icl-regresion"}, r"'kind' option of the data spec must be one of \[.*'icl-regression'"),
])
def test_bad_regression_specs_are_refused(spec, message):
    """Catches: impossible shapes reaching data generation (an empty context, a relevant token past the end, more
    relevant tokens than the sequence holds, blamed on the option that is wrong), a misspelt option ignored."""
    with pytest.raises(ValueError, match=message):
        make_task(spec)


def test_the_command_line_refuses_a_bad_spec_in_one_line(tmp_path, capsys):
    """Catches: a spec error surfacing as a traceback (not a TLDevinterpError) or after the folder was made."""
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": {"kind": "sparse-regression", "T": 4, "relevant": 4}}))
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--preset", "sparse-regression-quick", "--out", str(tmp_path / "s"), "--config", str(bad)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "'relevant' option" in err and "[0, 3]" in err
    assert not (tmp_path / "s").exists()


def test_a_model_that_cannot_read_the_task_is_refused_before_training(tmp_path):
    """Catches: a d_vocab other than the token dimension (W_E cannot embed the inputs), or a context shorter than
    the sequences (W_pos cannot place them), found mid-training."""
    with pytest.raises(ValueError, match="d_vocab must be the 'icl-regression' task's token dimension 4"):
        train(tmp_path / "s", "icl-regression-quick", model=ModelConfig(n_ctx=16, d_vocab=5), progress=False)
    with pytest.raises(ValueError, match=r"n_ctx \(8\) is shorter than the 'icl-regression' task's sequences \(16"):
        train(tmp_path / "s", "icl-regression-quick", model=ModelConfig(n_ctx=8, d_vocab=4), progress=False)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("preset", ["icl-regression-quick", "sparse-regression-quick"])
def test_train_then_analyze_a_regression_preset_on_the_command_line(preset, tmp_path, capsys):
    """Catches: a token assumption left anywhere in train or analyze (data, loss, sampler, metrics, essential
    dynamics, attention, report) for a task whose model reads real vectors. A tiny override of the preset keeps
    it cheap."""
    train_config, analysis = tmp_path / "train.json", tmp_path / "analysis.json"
    train_config.write_text(json.dumps(dict(n_steps=24, n_log_checkpoints=4, n_linear_checkpoints=2, data={
        **PRESETS[preset].data, "n_train": 256, "n_test": 64})))
    analysis.write_text(json.dumps(dict(num_chains=2, num_draws=6, num_burnin=2, head_steps=2, n_test_seqs=32,
                                        n_clusters=2)))
    assert main(["train", "--preset", preset, "--out", str(tmp_path / "s"), "--config", str(train_config)]) == 0
    assert main(["analyze", str(tmp_path / "s"), "--out", str(tmp_path / "r"), "--config", str(analysis),
                 "--quiet"]) == 0
    llc = pd.read_csv(tmp_path / "r" / "results" / "llc.csv")
    model_llc = llc[llc["scope"] == "model"]
    assert len(model_llc) >= 5 and np.isfinite(model_llc["llc_mean"]).all() and (llc["scope"] == "head").any()
    metrics = set(pd.read_csv(tmp_path / "r" / "results" / "metrics.csv")["metric"])
    expected = {"icl_score", "prediction_norm", "loss_minus_ridge", "loss_minus_dmmse", "ln_weight_norm",
                "pos_effective_rank"} if preset.startswith("icl") else {"relevant_attention", "attention_entropy"}
    assert expected <= metrics
    assert (tmp_path / "r" / "figures" / "metrics.png").exists() and (tmp_path / "r" / "report.html").exists()
