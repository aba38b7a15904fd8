"""LLC over a checkpoint series (resume, stale-result safety) and data-refined sub-distributions."""

import pytest
import torch

from tl_devinterp.data import repeated_random_tokens
from tl_devinterp.models import ModelConfig, build_model
from tl_devinterp.sampling import contains_repeated_span, filter_dataset, llc_over_series
from tl_devinterp.sampling.objective import lm_loss
from tl_devinterp.series import CheckpointSeries

FAST = dict(num_chains=2, num_draws=3, num_burnin=1, batch_size=8)


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def series():
    models = [build_model(ModelConfig(n_layers=1, n_heads=2, d_model=8, n_ctx=12, d_vocab=12, seed=s)) for s in range(3)]
    return CheckpointSeries.from_models(models, [0, 10, 20])


@pytest.fixture(scope="module")
def tokens():
    return repeated_random_tokens(16, 4, 12)


def test_over_series_tidy_frame(series, tokens):
    frame = llc_over_series(series, tokens, heads=True, **FAST)
    assert {"step", "scope", "layer", "head", "llc_mean", "llc_std", "d", "init_loss"} <= set(frame.columns)
    assert len(frame) == 3 * (1 + 2)
    model_rows = frame[frame.scope == "model"]
    assert model_rows.step.tolist() == [0, 10, 20] and model_rows.layer.isna().all()
    assert frame[frame.scope == "head"][["layer", "head"]].values.tolist() == [[0, 0], [0, 1]] * 3
    # different checkpoints, different estimates
    assert model_rows.init_loss.nunique() == 3
    # heads alone (analyze's second pass): the same head numbers without sampling the model again
    heads = llc_over_series(series, tokens, heads=True, model=False, **FAST)
    assert (heads.scope == "head").all()
    assert heads.llc_mean.tolist() == frame[frame.scope == "head"].llc_mean.tolist()
    with pytest.raises(ValueError, match="model=False needs heads"):
        llc_over_series(series, tokens, model=False, **FAST)


def test_over_series_resumes_and_never_reuses_stale_results(series, tokens, tmp_path):
    """Catches: a resume that recomputes finished checkpoints, or reuses one for other settings or data.
    Computed checkpoints are counted by their loads (a series with its own fingerprints loads a checkpoint
    only to compute it)."""
    calls, killed = [], []

    def load(step):
        calls.append(1)
        if len(calls) == 2 and not killed:
            killed.append(1)
            raise Killed  # the first run is killed during the second checkpoint
        return series.load(step)

    counted = CheckpointSeries(series.steps, load, fingerprint=series.fingerprint)
    with pytest.raises(Killed):
        llc_over_series(counted, tokens, store_dir=tmp_path, **FAST)
    calls.clear()
    first = llc_over_series(counted, tokens, store_dir=tmp_path, **FAST)
    assert len(calls) == 2  # only the two missing checkpoints
    calls.clear()
    again = llc_over_series(counted, tokens, store_dir=tmp_path, **FAST)
    assert len(calls) == 0 and again.llc_mean.tolist() == pytest.approx(first.llc_mean.tolist())
    llc_over_series(counted, tokens, store_dir=tmp_path, **{**FAST, "num_draws": 4})
    assert len(calls) == 3  # new hyperparameters: nothing reused
    calls.clear()
    llc_over_series(counted, tokens[:8], store_dir=tmp_path, **FAST)
    assert len(calls) == 3  # new data: nothing reused


def scaled_loss(model, batch):
    """A module-level loss: keyed by its name and code."""
    return 100 * lm_loss(model, batch)


def test_store_never_shares_a_result_between_two_functions(series, tokens, tmp_path):
    """Two lambdas (both `<lambda>`) that compute different losses: the second must not read the first's result.

    Catches: a store keyed by `__qualname__`, which returned the first lambda's init_loss for the second."""
    one = llc_over_series(series, tokens, store_dir=tmp_path, steps=[0], loss_fn=scaled_loss, **FAST)
    plain = llc_over_series(series, tokens, store_dir=tmp_path, steps=[0], loss_fn=lm_loss, **FAST)
    assert one.init_loss[0] == pytest.approx(100 * plain.init_loss[0], rel=1e-4)  # module-level: told apart
    a = llc_over_series(series, tokens, store_dir=tmp_path, steps=[0], key="lm loss",
                        loss_fn=lambda m, b: lm_loss(m, b), **FAST)
    b = llc_over_series(series, tokens, store_dir=tmp_path, steps=[0], key="100 x lm loss",
                        loss_fn=lambda m, b: 100 * lm_loss(m, b), **FAST)
    assert b.init_loss[0] == pytest.approx(100 * a.init_loss[0], rel=1e-4)
    calls = []

    def counting(m, b):  # a closure: its identity cannot be established, so it is refused before any sampling
        calls.append(1)
        return lm_loss(m, b)

    for fn in (lambda m, b: 100 * lm_loss(m, b), counting):
        with pytest.raises(ValueError, match="key="):
            llc_over_series(series, tokens, store_dir=tmp_path, steps=[0], loss_fn=fn, **FAST)
    assert not calls
    llc_over_series(series, tokens, steps=[0], loss_fn=counting, **FAST)  # no store: nothing to confuse
    assert calls


def test_repeated_span_filter():
    pred = contains_repeated_span(3)
    assert pred([0, 5, 6, 7, 1, 5, 6, 7]) and not pred([0, 5, 6, 1, 5, 6, 2])
    rep = repeated_random_tokens(4, 5, 50)
    rand = torch.randint(1, 10_000, (4, 11), generator=torch.Generator().manual_seed(0))
    mixed = torch.cat([rep, rand])
    assert torch.equal(filter_dataset(mixed, pred), rep)
    x, y = filter_dataset((mixed, torch.arange(8)), pred)
    assert y.tolist() == [0, 1, 2, 3]
    from datasets import Dataset

    ds = filter_dataset(Dataset.from_dict({"input_ids": mixed.tolist()}), pred)
    assert ds["input_ids"] == rep.tolist()
    with pytest.raises(ValueError, match="empty"):
        filter_dataset(rand, pred)
