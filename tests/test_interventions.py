"""Interventions during training: active exactly in their window, frozen heads fixed, plain runs unchanged."""

import json

import pytest
import torch
from transformer_lens.hook_points import HookPoint

from tl_devinterp import (
    CheckpointSeries,
    Intervention,
    ModelConfig,
    build_model,
    clone_model,
    head_weights,
    train,
)
from tl_devinterp.interventions import Intervener
from tl_devinterp.training import TrainConfig


def _states_equal(a: CheckpointSeries, b: CheckpointSeries, step: int) -> bool:
    sa, sb = a.load(step).state_dict(), b.load(step).state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    """The quick preset for 10 steps, no interventions: checkpoints 0, 1, 2, 3, 4, 5, 6, 8, 10."""
    out = tmp_path_factory.mktemp("plain")
    train(out, "quick", progress=False, n_steps=10)
    return out


@pytest.fixture()
def plain(plain_dir):
    return CheckpointSeries.from_dir(plain_dir)


@pytest.fixture()
def tiny():
    return build_model(ModelConfig(n_layers=2, n_heads=2, d_model=16, n_ctx=8, d_vocab=10))


def test_an_empty_intervention_list_is_bit_identical_to_plain_training(tmp_path, plain):
    """Catches an intervention path that perturbs plain training (extra RNG draws, a changed update)."""
    series = train(tmp_path, "quick", progress=False, n_steps=10, interventions=[])
    assert all(_states_equal(series, plain, s) for s in plain.steps)
    assert "interventions" not in json.loads((tmp_path / "manifest.json").read_text())["train_config"]


def test_an_intervention_acts_exactly_in_its_window(tmp_path, plain):
    """One forward with the hook installed per training step in [3, 7), none in evaluation; same init and
    batches before it. The forwards are counted from outside: a torch global forward hook sees every hook
    point's call and whether a TransformerLens hook is on it then (only the intervention installs one; a TL 4.x
    bridge names `hook_z` by its canonical name)."""
    calls = []

    def count(module, inputs, output):
        if isinstance(module, HookPoint) and module.fwd_hooks:
            calls.append(module.name)

    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        series = train(tmp_path, "quick", progress=False, n_steps=10,
                       interventions=[Intervention("blocks.0.attn.hook_z", "zero", head=1, start=3, end=7)])
    finally:
        handle.remove()
    assert len(calls) == 4  # steps 3, 4, 5, 6: one forward each
    assert all(_states_equal(series, plain, s) for s in (0, 1, 2, 3))  # weights after steps < 3: untouched
    assert not _states_equal(series, plain, 4)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["train_config"]["interventions"] == [dict(hook="blocks.0.attn.hook_z", kind="zero", head=1,
                                                              start=3, end=7, value=None)]
    assert TrainConfig.from_dict(manifest["train_config"]).interventions[0] == Intervention(
        "blocks.0.attn.hook_z", "zero", head=1, start=3, end=7)
    # the same config resumes (returns the finished series) instead of being refused as different
    assert train(tmp_path, "quick", progress=False, n_steps=10, interventions=[
        dict(hook="blocks.0.attn.hook_z", kind="zero", head=1, start=3, end=7)]).steps == series.steps


def test_a_frozen_head_does_not_change_even_under_weight_decay(tmp_path):
    """Zeroing only the gradient would let AdamW's decay (and momentum) move the head."""
    series = train(tmp_path, "quick", progress=False, n_steps=10, weight_decay=0.5,
                   interventions=[Intervention("l0h1", "freeze", start=0, end=5)])
    first, mid, last = (series.load(s) for s in (0, 5, 10))
    for name, w in head_weights(first, 0, 1).items():
        assert torch.equal(w, head_weights(mid, 0, 1)[name]), name  # frozen during [0, 5)
        assert not torch.equal(w, head_weights(last, 0, 1)[name]), name  # trains again after
        assert not torch.equal(head_weights(first, 0, 0)[name], head_weights(mid, 0, 0)[name])  # others train


def test_clamping_a_pattern_sets_what_the_head_reads(tiny):
    """Clamping head 1's pattern to the identity makes its z equal its v (the hook's output is used)."""
    tokens = torch.randint(0, 10, (4, 8))
    z, v = [], []
    intervener = Intervener(tiny, [Intervention("blocks.0.attn.hook_pattern", "clamp", head=1, value=torch.eye(8))])
    with intervener(0, tokens), tiny.hooks(fwd_hooks=[("blocks.0.attn.hook_z", lambda x, hook: z.append(x.detach())),
                                                      ("blocks.0.attn.hook_v", lambda x, hook: v.append(x.detach()))]):
        tiny(tokens)
    z, v = z[0], v[0]
    assert torch.allclose(z[:, :, 1], v[:, :, 1]) and not torch.allclose(z[:, :, 0], v[:, :, 0])


def test_mean_ablation_and_reference_clamp(tiny):
    tokens = torch.randint(0, 10, (4, 8))
    seen = []
    with Intervener(tiny, [Intervention("blocks.0.attn.hook_z", "mean", head=0)])(0, tokens), \
            tiny.hooks(fwd_hooks=[("blocks.0.attn.hook_z", lambda x, hook: seen.append(x.detach()))]):
        tiny(tokens)
    assert seen[0][:, :, 0].std(0).max() == 0 and seen[0][:, :, 1].std(0).max() > 0  # one value across the batch
    plain = tiny(tokens)
    with Intervener(tiny, [Intervention("blocks.0.attn.hook_z", "clamp", head=0, value=clone_model(tiny))])(0, tokens):
        assert torch.equal(tiny(tokens), plain)  # clamped to its own activations: nothing changes
    other = build_model(ModelConfig(n_layers=2, n_heads=2, d_model=16, n_ctx=8, d_vocab=10, seed=1))
    with Intervener(tiny, [Intervention("blocks.0.attn.hook_z", "clamp", head=0, value=other)])(0, tokens):
        assert not torch.allclose(tiny(tokens), plain)


def test_a_clamp_to_a_series_step_runs_and_is_recorded(tmp_path, plain_dir):
    value = {"series": str(plain_dir), "step": 10}
    item = Intervention("blocks.1.attn.hook_pattern", "clamp", head=0, value=value)
    train(tmp_path / "run", "quick", progress=False, n_steps=4, interventions=[item])
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["train_config"]["interventions"][0]["value"] == value


def test_bad_interventions_are_refused_with_the_fix(tiny):
    with pytest.raises(ValueError, match="'kind' option of Intervention must be one of"):
        Intervention("blocks.0.attn.hook_z", "zap")
    with pytest.raises(ValueError, match="hook='l0h1'"):
        Intervention("blocks.0.attn.hook_z", "freeze")
    with pytest.raises(ValueError, match="no head axis"):
        Intervention("blocks.0.hook_resid_pre", "zero", head=0)
    with pytest.raises(ValueError, match="required by kind='clamp'"):
        Intervention("blocks.0.attn.hook_z", "clamp")
    with pytest.raises(ValueError, match="empty or negative"):
        Intervention("blocks.0.attn.hook_z", "zero", start=5, end=5)
    with pytest.raises(ValueError, match="no hook point"):
        Intervener(tiny, [Intervention("blocks.5.attn.hook_z", "zero")])
    with pytest.raises(ValueError, match="does not exist"):
        Intervener(tiny, [Intervention("l0h7", "freeze")])
    with pytest.raises(ValueError, match="does not broadcast"):
        with Intervener(tiny, [Intervention("blocks.0.attn.hook_pattern", "clamp", head=0, value=torch.eye(3))])(
                0, torch.zeros(1, 8, dtype=torch.long)):
            tiny(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="never act"):
        train("/tmp/never", "quick", n_steps=5, interventions=[Intervention("l0h0", "freeze", start=5)])


def test_the_cli_reads_interventions_from_the_config_file(tmp_path):
    from tl_devinterp.cli import main

    config = tmp_path / "train.json"
    item = dict(hook="blocks.0.attn.hook_pattern", kind="zero", head=0, start=0, end=2, value=None)
    config.write_text(json.dumps({"n_steps": 3, "interventions": [item]}))
    assert main(["train", "--preset", "quick", "--out", str(tmp_path / "s"), "--config", str(config)]) == 0
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["train_config"]["interventions"] == [item] and manifest["train_config"]["n_steps"] == 3


def test_an_intervened_series_replays_its_clamps_on_any_input(tmp_path, plain_dir):
    """The clamped head scores as it ran in training only through `intervened`, not by its saved weights."""
    from tl_devinterp import previous_token_scores
    from tl_devinterp.interventions import intervened

    previous = torch.zeros(32, 32)
    previous[0, 0] = 1
    previous[torch.arange(1, 32), torch.arange(31)] = 1
    series = train(tmp_path, "quick", progress=False, n_steps=4,
                   interventions=[Intervention("blocks.0.attn.hook_pattern", "clamp", head=0, value=previous, end=4)])
    view = intervened(series)
    assert previous_token_scores(view.load(3), n_seqs=4, seq_len=20)[0, 0] == 1  # clamp active at step 3, cut to 20
    assert previous_token_scores(view.load(4), n_seqs=4)[0, 0] < 0.5  # window over at step 4: own weights
    assert previous_token_scores(series.load(3), n_seqs=4)[0, 0] < 0.5
    with pytest.raises(ValueError, match="records no interventions"):
        intervened(CheckpointSeries.from_dir(plain_dir))
