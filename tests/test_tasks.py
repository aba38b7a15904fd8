"""The task concept (tl_devinterp.tasks): specs checked in one place, token tasks as tasks of the same kind."""

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from tl_devinterp import CheckpointSeries, estimate_llc, metrics_over_series
from tl_devinterp.data import make_data, token_tensor
from tl_devinterp.tasks import TASKS, MarkovTokens, TokenTask, make_task
from tl_devinterp.training import PRESETS, train


def test_a_token_spec_gives_the_data_make_data_gives():
    """Catches: the token task regenerating other data than `make_data` (other seeds or defaults), which would
    change every token series' results."""
    spec = PRESETS["quick"].data
    task = make_task(spec)
    assert isinstance(task, MarkovTokens) and task.sampler_loss is None  # the sampler's own LM loss
    train_tokens, test_tokens = task.data()
    splits = make_data(spec)
    assert torch.equal(train_tokens, token_tensor(splits["train"])) and torch.equal(test_tokens, token_tensor(splits["test"]))
    assert TokenTask.of_tokens(test_tokens, test_tokens).labels(test_tokens[0])[0] == "<bos>"


@pytest.mark.parametrize("spec, message", [
    ({"kind": "nope"}, r"'kind' option of the data spec must be one of \["),
    ({"kind": "markov", "d_vocab": 32, "seq_len": 8, "n_train": 10}, r"The 'n_test' option of the 'markov' data spec must be given \(>= 1\)"),
    ({"kind": "markov", "d_vocab": 32, "seq_len": 8, "n_train": 0, "n_test": 5}, r"'n_train' option .* must be >= 1; got 0"),
    ({"kind": "markov", "d_vocab": 32, "seq_len": 8, "n_train": 4, "n_test": 5, "alfa": 1}, r"Unknown option\(s\) \['alfa'\]"),
    ({"kind": "markov", "d_vocab": "32", "seq_len": 8, "n_train": 4, "n_test": 5},
     r"^The 'd_vocab' option of the 'markov' data spec must be an integer; got '32' \(str\)\.$"),
    ({"kind": "markov", "d_vocab": 32, "seq_len": 8, "n_train": True, "n_test": 5}, r"'n_train' option .* an integer; got True"),
])
def test_bad_specs_are_refused_naming_the_option(spec, message):
    """Catches: a misspelt or impossible spec reaching data generation (or training) instead of one line naming
    the option and its allowed values."""
    with pytest.raises(ValueError, match=message):
        make_task(spec)


def test_train_refuses_a_bad_spec_before_touching_the_folder(tmp_path):
    """Catches: the spec checked only after the series folder was created (a refused run leaving files)."""
    with pytest.raises(ValueError, match="'kind' option"):
        train(tmp_path / "s", "quick", data={"kind": "nope"}, progress=False)
    assert not (tmp_path / "s").exists()
    assert {"markov", "stdlib"} <= set(TASKS)


def cross_entropy(model, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy written out: position i's logits predict token i + 1, mean over every target."""
    logits = model(tokens)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


QUICK_TEST_LOSS = {0: 3.6962087, 24: 2.8280686, 200: 2.0173334}
"""The `quick` preset's logged test losses (its data, initialisation and batches are seeded): pinned when token
tasks became tasks; a deliberate change of the preset, the data generator or the trainer repins them."""
QUICK_METRICS_200 = {("loss", None): 2.049854, ("icl_score", None): 0.084367, ("bigram_score", None): 2.076072,
                     ("previous_token", (1, 0)): 0.080034, ("copying", (1, 0)): 0.378751}


def test_a_token_series_keeps_its_numbers_through_the_task(quick_series_dir):
    """Token tasks run through the task concept with the numbers they had before it: the trainer's loss, the
    sampler's loss and the metrics equal the computation written out here and the values pinned then.
    Catches: labels shifted by a position or BOS scored as a target, the loss summed or averaged per sequence
    instead of over every target, the sampler's LM loss (its fast forward) drifting from the task's loss, the
    token metrics reading the training split for the test split, and any change of the seeded data or init."""
    series = CheckpointSeries.from_dir(quick_series_dir)
    task = make_task(series.meta["data"])
    train_tokens, test_tokens = task.data()
    # 1. the loss: logged test loss = the written-out cross-entropy on the first 4 test batches of 16
    for step, pinned in QUICK_TEST_LOSS.items():
        model = series.load(step)
        with torch.no_grad():
            assert series.meta["losses"][str(step)]["test"] == pytest.approx(pinned, abs=1e-5)
            assert float(cross_entropy(model, test_tokens[:64])) == pytest.approx(pinned, abs=1e-5)
            assert float(task.loss(model, test_tokens[:8])) == pytest.approx(float(cross_entropy(model, test_tokens[:8])),
                                                                            abs=1e-6)
    # 2. the LLC: the token path (the sampler's LM loss, its fast forward) draws the chains the written-out loss draws
    sgld = dict(num_chains=2, num_draws=10, num_burnin=5, batch_size=16, seed=0, progress=False)
    assert task.sampler_loss is None
    token_path = estimate_llc(model, test_tokens[:64], **sgld)
    by_hand = estimate_llc(model, test_tokens[:64], loss_fn=cross_entropy, **sgld)
    assert token_path.per_chain == pytest.approx(by_hand.per_chain, rel=1e-4)
    assert token_path.mean == pytest.approx(2.6569, abs=1e-3)
    # 3. the metrics: the task's are the library's token metrics on the test split, with their pinned values
    two = series.subset([0, 200])
    metrics = task.metrics_over_series(two, train_tokens, test_tokens, n_seqs=8, progress=False)
    pd.testing.assert_frame_equal(metrics, metrics_over_series(two, tokens=test_tokens, data=train_tokens, n_seqs=8,
                                                               progress=False))
    last = metrics[metrics["step"] == 200]
    for (name, head), pinned in QUICK_METRICS_200.items():
        row = last[(last["metric"] == name) & (last["head"].isna() if head is None else
                                              (last["layer"] == head[0]) & (last["head"] == head[1]))]
        assert float(row["value"].iloc[0]) == pytest.approx(pinned, abs=1e-5), name
