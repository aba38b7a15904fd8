"""Data and models as Hugging Face users hold them: padded batches with an attention_mask, dict batches from a
Trainer-style DataLoader, a model left in train mode, a Llama whose pad token is BOS, an HF model handed in."""

import warnings

import pytest
import torch
from hf_models import VOCAB, boot, hf_model, save_tiny_hf

from tl_devinterp.sampling import SamplerWarning, estimate_head_llcs, estimate_llc, sample_observables

CFG = dict(num_chains=2, num_draws=6, num_burnin=2, batch_size=8, epsilon=1e-3, seed=3, progress=False)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A GPT-2 bridge with GPT2Config's dropout 0.1 (what a Trainer run leaves)."""
    return boot(save_tiny_hf("gpt2", tmp_path_factory.mktemp("gpt2")))


def _tokens(n=16, seq=12):
    return torch.randint(2, VOCAB, (n, seq), generator=torch.Generator().manual_seed(0))


def _padded(tokens, extra=6):
    """The same rows with `extra` junk tokens on the right, masked out, and labels -100 there."""
    junk = torch.randint(2, VOCAB, (len(tokens), extra), generator=torch.Generator().manual_seed(1))
    ids = torch.cat([tokens, junk], 1)
    mask = torch.cat([torch.ones_like(tokens), torch.zeros_like(junk)], 1)
    return {"input_ids": ids, "attention_mask": mask}


def _quiet(f, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SamplerWarning)
        return f(*args, **kw)


def test_padded_and_dict_batches_give_the_numbers_of_the_plain_tokens(gpt2):
    """Catches: attention_mask ignored (the junk after each row enters the loss: another λ̂), a dict batch
    rejected ('too many values to unpack'), or a Trainer-style DataLoader of dict batches read otherwise."""
    tokens = _tokens()
    plain = _quiet(estimate_llc, gpt2, tokens, **CFG)
    padded = _quiet(estimate_llc, gpt2, _padded(tokens), **CFG)
    assert padded.forward == plain.forward == "fast"
    torch.testing.assert_close(padded.loss_trace, plain.loss_trace, rtol=1e-4, atol=1e-5)
    assert padded.mean == pytest.approx(plain.mean, rel=1e-3, abs=1e-4)
    unmasked = _quiet(estimate_llc, gpt2, _padded(tokens)["input_ids"], **CFG)
    assert not torch.allclose(unmasked.loss_trace, plain.loss_trace, rtol=1e-4, atol=1e-5)  # the junk would count

    # A DataLoader of dict rows collated into dict batches, as transformers' default_data_collator makes
    rows = [{"input_ids": t, "labels": t} for t in tokens]
    loader = torch.utils.data.DataLoader(rows, batch_size=8, shuffle=False)
    by_loader = _quiet(estimate_llc, gpt2, loader, **CFG)
    by_tensor = _quiet(estimate_llc, gpt2, torch.utils.data.DataLoader(tokens, batch_size=8, shuffle=False), **CFG)
    torch.testing.assert_close(by_loader.loss_trace, by_tensor.loss_trace)


def test_labels_of_minus_100_leave_positions_out(gpt2):
    """Catches: labels' -100 (DataCollatorForLanguageModeling's padding) ignored."""
    tokens = _tokens()
    batch = _padded(tokens)
    labels = batch["input_ids"].clone()
    labels[:, tokens.shape[1]:] = -100
    by_labels = _quiet(estimate_llc, gpt2, {"input_ids": batch["input_ids"], "labels": labels}, **CFG)
    plain = _quiet(estimate_llc, gpt2, tokens, **CFG)
    assert by_labels.mean == pytest.approx(plain.mean, rel=1e-3, abs=1e-4)


def test_left_padding_is_refused_with_the_fix(gpt2):
    """Catches: left-padded rows sampled with shifted positions, silently."""
    batch = _padded(_tokens())
    batch = {k: v.flip(1) for k, v in batch.items()}
    with pytest.raises(ValueError, match="padding_side"):
        _quiet(estimate_llc, gpt2, batch, **CFG)


def test_a_model_in_train_mode_samples_as_in_eval_and_keeps_its_mode(gpt2):
    """Catches: dropout on during sampling (another λ̂, and the fast-forward check fails into the slow
    forward), or the model's mode not restored."""
    tokens = _tokens()
    gpt2.eval()
    reference = _quiet(estimate_head_llcs, gpt2, tokens, heads=["l1h0"], **CFG)
    gpt2.train()
    try:
        trained = _quiet(estimate_head_llcs, gpt2, tokens, heads=["l1h0"], **CFG)
        assert gpt2.training and all(m.training for m in gpt2.modules())
    finally:
        gpt2.eval()
    assert trained["forward"].tolist() == ["fast"]
    assert trained["llc_mean"].tolist() == pytest.approx(reference["llc_mean"].tolist(), rel=1e-4)


def test_forward_and_note_are_columns_and_a_fallback_warns_its_reason(tmp_path):
    """Catches: which forward ran and the GQA note kept on LLCResult only; a silent fallback to the slow
    forward (here a hook on a hook point)."""
    llama = boot(save_tiny_hf("llama", tmp_path))
    frame = _quiet(estimate_head_llcs, llama, _tokens(), heads=["l0h1"], **CFG)
    assert frame["forward"].tolist() == ["fast"]
    assert "K/V of its group" in frame["note"].iloc[0]
    llama.blocks[0].hook_resid_pre.add_hook(lambda x, hook: x)
    try:
        with pytest.warns(SamplerWarning, match="TransformerLens forward.*hooks attached"):
            result = estimate_llc(llama, _tokens(), **CFG)
    finally:
        llama.reset_hooks()
    assert result.forward.startswith("model: hooks")


def test_a_llama_whose_pad_token_is_bos_samples_through_the_fast_forward(tmp_path):
    """Catches: an embedding with padding_idx (pad = BOS) giving its row a gradient in the fast forward only,
    so every such Llama falls back to the slow forward."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32, intermediate_size=64,
        max_position_embeddings=32, vocab_size=VOCAB, bos_token_id=1, pad_token_id=1))
    bridge = boot(save_tiny_hf("llama", tmp_path, model=model))
    tokens = _tokens()
    tokens[:, 0] = 1  # every row starts with BOS = pad
    with warnings.catch_warnings():
        warnings.simplefilter("error", SamplerWarning)  # no fallback warning
        warnings.filterwarnings("ignore", "LLC of", SamplerWarning)
        assert estimate_llc(bridge, tokens, **CFG).forward == "fast"


def test_an_hf_model_handed_in_is_told_how_to_boot_it():
    """Catches: an HF model met with advice to build_model/boot_native (or 'No loss')."""
    with pytest.raises(TypeError, match="boot_transformers"):
        estimate_llc(hf_model("gpt2"), _tokens(), **CFG)
    with pytest.raises(TypeError, match="boot_transformers"):
        estimate_head_llcs(hf_model("gpt2"), _tokens(), **CFG)


def test_observables_of_padded_rows_count_only_real_tokens(gpt2):
    """Catches: padded observable rows' junk losses traced as if they were tokens."""
    tokens = _tokens()
    kw = dict(CFG, progress=False)
    plain = _quiet(sample_observables, gpt2, tokens, {"loss": tokens[:4]}, **kw)
    padded = _quiet(sample_observables, gpt2, tokens, {"loss": _padded(tokens[:4])}, **kw)
    a, b = plain.traces["loss"], padded.traces["loss"]
    assert b.shape[-1] == a.shape[-1] + 6
    torch.testing.assert_close(torch.as_tensor(b[..., :a.shape[-1]]), torch.as_tensor(a), rtol=1e-4, atol=1e-5)
    assert (b[..., a.shape[-1]:] == 0).all()


def test_per_token_loss_is_nan_on_padding_and_equal_elsewhere(gpt2):
    """Catches: per-token metrics computed on padding, or with dropout on (a model left in train mode)."""
    from tl_devinterp.metrics import per_token_loss

    tokens = _tokens(4)
    batch = _padded(tokens)
    gpt2.train()
    try:
        padded = per_token_loss(gpt2, batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        gpt2.eval()
    plain = per_token_loss(gpt2, tokens)
    n = tokens.shape[1] - 1
    torch.testing.assert_close(padded[:, :n], plain, rtol=1e-4, atol=1e-5)
    assert padded[:, n:].isnan().all()


def test_one_time_checks_run_once_per_checkpoint_not_per_call(gpt2, monkeypatch):
    """Catches: the fast-forward check (a TL and a fast forward+backward) and the unused-parameter probe
    repeated by every call on the same weights (minutes at GPT-2 size), or kept after the weights changed."""
    import tl_devinterp.sampling.objective as objective_module

    calls = []
    check = objective_module.verified_fast_forward
    monkeypatch.setattr(objective_module, "verified_fast_forward", lambda *a, **k: calls.append(1) or check(*a, **k))
    tokens = _tokens()
    with torch.no_grad():
        next(gpt2.parameters()).add_(0.0)  # weights in a state no earlier test checked
    first = _quiet(estimate_llc, gpt2, tokens, **CFG)
    again = _quiet(estimate_head_llcs, gpt2, tokens, heads=["l0h0"], **CFG)
    assert len(calls) == 1 and first.forward == "fast" and again["forward"].tolist() == ["fast"]
    with torch.no_grad():
        next(gpt2.parameters()).add_(0.0)  # an in-place change, as an optimizer step makes
    _quiet(estimate_llc, gpt2, tokens, **CFG)
    assert len(calls) == 2


def test_analyze_of_padded_data_gives_the_numbers_of_the_unpadded_rows(quick_series_dir, tmp_path):
    """`analyze(series, data=...)` with a padded dataset (junk after each row, attention_mask 0 there), as an HF
    user holds it, gives the LLCs and metrics of the unpadded rows. Catches: analyze's data path reading the
    token column alone (the junk enters the sampled loss and the metrics: other numbers)."""
    import datasets
    import pandas as pd

    from tl_devinterp import CheckpointSeries
    from tl_devinterp.analysis import analyze

    saved = CheckpointSeries.from_dir(quick_series_dir)
    series = CheckpointSeries(saved.steps[-4:], saved.load, meta=saved.meta)
    tokens, junk = torch.randint(0, 32, (2, 48, 16), generator=torch.Generator().manual_seed(0))  # d_vocab 32
    padded = {"input_ids": torch.cat([tokens, junk[:, :8]], 1),
              "attention_mask": torch.cat([torch.ones_like(tokens), torch.zeros_like(junk[:, :8])], 1)}
    fast = dict(num_chains=2, num_draws=3, num_burnin=1, batch_size=8, n_test_seqs=8, n_probe_seqs=4, n_components=2,
                heads=["l1h0"], calibrate=False, progress=False)
    plain = _quiet(analyze, series, tmp_path / "plain", data=datasets.Dataset.from_dict({"input_ids": tokens.tolist()}),
                   **fast)
    with_padding = _quiet(analyze, series, tmp_path / "padded", **fast,
                          data=datasets.Dataset.from_dict({k: v.tolist() for k, v in padded.items()}))
    pd.testing.assert_frame_equal(plain.llc, with_padding.llc, rtol=1e-4, atol=1e-5)
    pd.testing.assert_frame_equal(plain.metrics, with_padding.metrics, rtol=1e-4, atol=1e-5)
