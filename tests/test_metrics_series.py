"""metrics_over_series: one tidy frame, resumable through the result store; classify_heads on it."""

import pytest
import torch

from tl_devinterp.metrics import classify_heads, metrics_over_series, previous_token_scores
from tl_devinterp.models import ModelConfig, build_model
from tl_devinterp.series import CheckpointSeries

CFG = ModelConfig(n_layers=2, n_heads=2, d_model=16, n_ctx=16, d_vocab=12)
PROBE = dict(n_seqs=4, seq_len=16, batch_size=4)


def counting_series(steps=(0, 10, 20)):
    models = {s: build_model(ModelConfig(**{**CFG.to_dict(), "seed": i})) for i, s in enumerate(steps)}
    loads = []

    def load(step):
        loads.append(step)
        return models[step]

    return CheckpointSeries(list(steps), load), loads, models


def test_tidy_frame_with_all_metrics():
    series, _, models = counting_series()
    from tl_devinterp.data import plant_repeats

    tokens = plant_repeats(torch.randint(0, 12, (6, 16), generator=torch.Generator().manual_seed(0)), min_len=5,
                           max_len=7)  # repeat_icl_score needs repeats
    frame = metrics_over_series(series, tokens=tokens, data=tokens, ngram_n=(2, 3), **PROBE)
    assert list(frame.columns) == ["step", "metric", "layer", "head", "value"]
    head_metrics = ["previous_token", "prefix_matching", "duplicate_token", "copying"]
    model_metrics = ["loss", "icl_score", "repeat_icl_score", "ngram_score_2", "ngram_score_3", "bigram_score"]
    assert sorted(frame.metric.unique()) == sorted(head_metrics + model_metrics)
    assert len(frame) == 3 * (4 * 4 + 6)
    assert frame[frame.metric.isin(model_metrics)][["layer", "head"]].isna().all().all()
    assert frame[frame.metric.isin(head_metrics)][["layer", "head"]].notna().all().all()
    assert frame.value.notna().all()
    prev = frame[(frame.step == 10) & (frame.metric == "previous_token")].sort_values(["layer", "head"])
    torch.testing.assert_close(torch.tensor(prev.value.to_numpy(), dtype=torch.float32),
                               previous_token_scores(models[10], **PROBE).flatten())
    with pytest.raises(ValueError, match="need `tokens`"):
        metrics_over_series(series, metrics=["loss"])
    with pytest.raises(ValueError, match="need `data`"):
        metrics_over_series(series, metrics=["bigram_score"], tokens=tokens)
    with pytest.raises(ValueError, match="Unknown metrics"):
        metrics_over_series(series, metrics=["induction"])


def test_resumes_from_the_store(tmp_path):
    series, loads, _ = counting_series()
    tokens = torch.randint(0, 12, (4, 16), generator=torch.Generator().manual_seed(1))
    kw = dict(tokens=tokens, store_dir=tmp_path, **PROBE)
    first = metrics_over_series(series, steps=[0, 10], **kw)  # a run stopped after two checkpoints
    assert loads == [0, 10]
    full = metrics_over_series(series, **kw)
    assert loads == [0, 10, 20]  # only the missing checkpoint was computed
    assert full[full.step < 20].reset_index(drop=True).equals(first)
    again = metrics_over_series(series, **kw)
    assert loads == [0, 10, 20] and again.equals(full)
    metrics_over_series(series, steps=[0], **{**kw, "seed": 1})  # another option: another store, recomputed
    assert loads == [0, 10, 20, 0]
    assert len(list(tmp_path.iterdir())) == 2


def test_classify_heads_from_a_frame():
    series, _, _ = counting_series()
    frame = metrics_over_series(series, **PROBE)
    # tiny random heads (d_head 8) can have large copying scores: zero them; then make head (1, 0) an
    # induction head at step 20 and head (0, 1) a previous-token head at step 10
    frame.loc[frame.metric == "copying", "value"] = 0.0
    at = frame.metric + frame.step.astype(str) + frame.layer.astype(str) + frame["head"].astype(str)
    frame.loc[at == "prefix_matching2010", "value"] = 0.9
    frame.loc[at == "previous_token1001", "value"] = 0.8
    last = classify_heads(frame)
    assert last.set_index(["layer", "head"]).label.to_dict() == {
        (0, 0): "other", (0, 1): "other", (1, 0): "induction", (1, 1): "other"}
    assert classify_heads(frame, step=10).set_index(["layer", "head"]).label[(0, 1)] == "previous-token"
    assert classify_heads(frame, step=20, thresholds={"prefix_matching": 0.95}).label.eq("other").all()
    with pytest.raises(ValueError, match="available steps"):
        classify_heads(frame, step=5)
