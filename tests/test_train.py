import json

import pytest
import torch

from tl_devinterp import CheckpointSeries, SeriesError
from tl_devinterp.training import PRESETS, checkpoint_schedule, train


def test_schedule_is_log_spaced_early_and_linear_late():
    s = checkpoint_schedule(10_000, 10, 10)
    assert s[0] == 0 and s[-1] == 10_000 and s == sorted(set(s))
    early = [x for x in s if 0 < x < 1000]
    assert len(early) >= 6  # dense early (log-spaced) ...
    assert set(range(0, 10_001, 1000)) <= set(s)  # ... and evenly spaced later
    assert max(b - a for a, b in zip(s, s[1:])) <= 1000
    dense = checkpoint_schedule(10_000, 10, 10, extra_steps=range(1100, 2000, 100))
    assert set(dense) - set(s) == set(range(1100, 2000, 100)) and set(s) <= set(dense)
    with pytest.raises(ValueError, match=r"extra_steps \[10001\] lie outside"):
        checkpoint_schedule(10_000, 10, 10, extra_steps=[5, 10_001])


def test_extra_steps_reach_the_manifest_only_when_given():
    from tl_devinterp.training import TrainConfig

    assert "extra_steps" not in TrainConfig().to_dict()  # older manifests still match and resume
    config = TrainConfig(extra_steps=[7])
    assert TrainConfig.from_dict(config.to_dict()).extra_steps == [7]


def test_learning_rate_warms_up_then_holds_or_falls_linearly(tmp_path):
    """Catches: the one-cycle schedule off by a step (the peak missed, an update at lr 0 before the end), applied
    to runs that did not ask for it (or written into their manifests, which would then no longer resume), or
    computed but not used by the trainer."""
    from tl_devinterp.training import TrainConfig, learning_rate

    constant = TrainConfig(n_steps=8, warmup_steps=4, lr=1.0)
    assert [learning_rate(constant, s) for s in range(8)] == [0.25, 0.5, 0.75, 1, 1, 1, 1, 1]
    cycle = TrainConfig(n_steps=8, warmup_steps=4, lr=1.0, lr_schedule="linear")
    assert [learning_rate(cycle, s) for s in range(8)] == [0.25, 0.5, 0.75, 1, 1, 0.75, 0.5, 0.25]
    assert "lr_schedule" not in constant.to_dict() and TrainConfig.from_dict(cycle.to_dict()).lr_schedule == "linear"
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="cosine")
    runs = {kind: train(tmp_path / kind, "quick", n_steps=2, n_log_checkpoints=0, n_linear_checkpoints=2,
                        lr_schedule=kind, progress=False) for kind in ("constant", "linear")}
    first, second = ([runs[k].load(step).W_E for k in runs] for step in (1, 2))
    assert torch.equal(*first) and not torch.equal(*second)  # the same first update at lr, the second at lr / 2


def test_a_stopped_run_resumes_exactly(tmp_path, monkeypatch, quick_series_dir):
    import tl_devinterp.training as T

    weights = []
    write = T.atomic_write

    def stop_at_fifth_checkpoint(path, content):  # the process stops before the 5th checkpoint's first file
        if path.name.startswith("step_"):
            weights.append(path.name)
            if len(weights) == 5:
                raise KeyboardInterrupt
        write(path, content)

    monkeypatch.setattr(T, "atomic_write", stop_at_fifth_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "s", "quick", progress=False)
    stopped = CheckpointSeries.from_dir(tmp_path / "s")  # readable after the stop
    assert len(stopped) == 4
    monkeypatch.undo()
    resumed = train(tmp_path / "s", "quick", progress=False)
    reference = CheckpointSeries.from_dir(quick_series_dir)
    assert resumed.steps == reference.steps
    a, b = resumed.load(resumed.steps[-1]).state_dict(), reference.load(reference.steps[-1]).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_another_config_into_the_same_dir_is_refused(tmp_path):
    train(tmp_path, "quick", progress=False, n_steps=3)
    with pytest.raises(SeriesError, match="different configuration"):
        train(tmp_path, "quick", progress=False, n_steps=4)
    series = train(tmp_path, "quick", progress=False, n_steps=4, overwrite=True)
    assert series.steps[-1] == 4
    assert json.loads((tmp_path / "manifest.json").read_text())["complete"] is True


def test_bad_arguments():
    with pytest.raises(ValueError, match="known presets"):
        train("/tmp/never", "gpt5")
    with pytest.raises(ValueError, match="must equal the model's n_ctx"):
        train("/tmp/never", "quick", data={**PRESETS["quick"].data, "seq_len": 16})


@pytest.mark.slow
def test_demo_preset_forms_previous_token_and_induction_heads(tmp_path):
    """The issue's acceptance check: layer-1 prefix matching rises from the uniform baseline to >= 0.3."""
    from tl_devinterp import prefix_matching_scores, previous_token_scores

    series = train(tmp_path, "demo", progress=False)
    first, last = series.load(series.steps[0]), series.load(series.steps[-1])
    pm0, pm1 = prefix_matching_scores(first)[1].max(), prefix_matching_scores(last)[1].max()
    assert pm0 < 0.1 and pm1 >= 0.3, (pm0, pm1)
    assert previous_token_scores(last)[0].max() >= 0.3


def test_a_text_series_carries_its_tokenizer(tmp_path):
    """The stdlib language-model path end to end, on a slice of the corpus and a tiny model."""
    from tokenizers import Tokenizer

    from tl_devinterp import ModelConfig

    data = dict(kind="stdlib", vocab_size=300, seq_len=32, max_files=30, seed=0)
    series = train(tmp_path, "stdlib", progress=False, model=ModelConfig(d_model=32, n_ctx=32, d_vocab=300),
                   data=data, n_steps=4, batch_size=4)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["tokenizer"] == "tokenizer.json" and manifest["data"] == data
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size() == 300 and tok.token_to_id("<|bos|>") == 0
    assert series.steps[-1] == 4 and series.load(4).cfg.d_vocab == 300
