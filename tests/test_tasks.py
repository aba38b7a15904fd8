"""The task concept (tl_devinterp.tasks): specs checked in one place, token tasks as tasks of the same kind."""

import pytest
import torch

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
