"""Everything downstream of a series on real transformers models: head scores, behavioural metrics, essential
dynamics, text data, `analyze` and the command line, on tiny GPT-2, GPT-NeoX and Llama (GQA) Trainer runs.

Where a number can be computed from the transformers model itself (attention patterns, losses, the OV
circuit from the raw HF weights), the test computes it there, so a layout assumed from native models fails.
"""

import numpy as np
import pandas as pd
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformer_lens.model_bridge import TransformerBridge  # noqa: E402

if not hasattr(TransformerBridge, "boot_transformers"):  # TL 3.x: no transformers bridge
    pytest.skip("needs TransformerBridge.boot_transformers (TransformerLens >= 4)", allow_module_level=True)

from hf_models import ARCHS, VOCAB, tiny_tokenizer  # noqa: E402

from tl_devinterp import CheckpointSeries  # noqa: E402
from tl_devinterp.analysis import AnalysisConfig, analyze, task_data  # noqa: E402
from tl_devinterp.cli import main  # noqa: E402
from tl_devinterp.data import pack_texts, text_files  # noqa: E402
from tl_devinterp.dynamics import essential_dynamics  # noqa: E402
from tl_devinterp.metrics import copying_scores, metrics_over_series, previous_token_scores  # noqa: E402
from tl_devinterp.models import HookedTransformer  # noqa: E402
from tl_devinterp.sampling import llc_over_series  # noqa: E402

TOKENS = torch.randint(2, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))
TL3_UNEMBED_BIAS = pytest.mark.xfail(HookedTransformer is not None, strict=True, raises=AssertionError,
                                     reason="TL 3.9's bridges add an unembedding bias [d_vocab] that HF has not")


def hf_model_at(run, step):
    return transformers.AutoModelForCausalLM.from_pretrained(run / f"checkpoint-{step}",
                                                             attn_implementation="eager").eval()


def hf_ov(model, arch):
    """(W_E [V, d], W_V [L, H, d, dh] per query head, W_O [L, H, dh, d], W_U [d, V]) from the raw HF weights."""
    cfg, L, H = model.config, model.config.num_hidden_layers, model.config.num_attention_heads
    d = cfg.hidden_size
    dh = d // H
    W_V, W_O = [], []
    for layer in range(L):
        if arch == "gpt2":  # Conv1D [in, out]: c_attn columns q | k | v; c_proj rows are head blocks
            attn = model.transformer.h[layer].attn
            v = attn.c_attn.weight[:, 2 * d:].reshape(d, H, dh).permute(1, 0, 2)
            o = attn.c_proj.weight.reshape(H, dh, d)
        elif arch == "neox":  # Linear [out, in]: query_key_value rows are per head (q, k, v) blocks
            attn = model.gpt_neox.layers[layer].attention
            v = attn.query_key_value.weight.reshape(H, 3, dh, d)[:, 2].transpose(1, 2)
            o = attn.dense.weight.reshape(d, H, dh).permute(1, 2, 0)
        else:  # Llama: head h reads key/value head h // (H / n_kv)
            attn = model.model.layers[layer].self_attn
            kv = cfg.num_key_value_heads
            v = attn.v_proj.weight.reshape(kv, dh, d).transpose(1, 2).repeat_interleave(H // kv, dim=0)
            o = attn.o_proj.weight.reshape(d, H, dh).permute(1, 2, 0)
        W_V.append(v)
        W_O.append(o)
    W_E = model.get_input_embeddings().weight
    return W_E, torch.stack(W_V), torch.stack(W_O), model.get_output_embeddings().weight.T


@pytest.mark.parametrize("arch", ARCHS)
def test_head_scores_read_the_models_own_attention_and_weights(hf_run, arch):
    run = hf_run(arch)
    model, hf = CheckpointSeries.from_hf_checkpoints(run).load(8), hf_model_at(run, 8)
    # previous-token: attention i -> i-1 on BOS + random tokens, from the HF model's own attention weights
    from tl_devinterp.metrics import probe_tokens

    probe = probe_tokens(model, "random", n_seqs=8)
    with torch.no_grad():
        attn = torch.stack(hf(probe, output_attentions=True).attentions)  # [layer, batch, head, q, k]
    q = torch.arange(1, probe.shape[1])
    torch.testing.assert_close(previous_token_scores(model, n_seqs=8), attn[..., q, q - 1].mean((1, 3)),
                               atol=1e-5, rtol=1e-4)
    # copying: sum(λ) / sum(|λ|) of the full OV circuit W_E W_V W_O W_U, per head
    W_E, W_V, W_O, W_U = (w.double().detach() for w in hf_ov(hf, arch))
    eig = torch.linalg.eigvals(W_E @ W_V @ W_O @ W_U)  # [layer, head, V]
    expected = (eig.sum(-1).real / eig.abs().sum(-1)).float()
    torch.testing.assert_close(copying_scores(model), expected, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_metrics_and_essential_dynamics_over_a_trainer_series(hf_run, arch, tmp_path):
    run = hf_run(arch)
    series = CheckpointSeries.from_hf_checkpoints(run)
    frame = metrics_over_series(series, tokens=TOKENS, data=TOKENS, n_seqs=8, store_dir=tmp_path)
    heads = frame[frame["metric"] == "prefix_matching"]
    assert len(heads) == 4 * 2 * 4 and heads["value"].between(0, 1).all()  # steps x layers x heads
    loss = frame[frame["metric"] == "loss"].set_index("step")["value"]
    for step in series.steps:  # the mean next-token loss is the HF model's own
        with torch.no_grad():
            expected = hf_model_at(run, step)(TOKENS, labels=TOKENS).loss.item()
        assert loss[step] == pytest.approx(expected, rel=1e-5)
    assert np.isfinite(frame["value"]).all() and {"icl_score", "bigram_score", "ngram_score_2"} <= set(frame["metric"])

    ed = essential_dynamics(series, TOKENS, n_components=2, store_dir=tmp_path)
    assert ed.scores.shape == (4, 2) and np.isfinite(ed.scores).all()
    assert ed.explained_variance_ratio.sum() > 0.5


def test_text_data_is_cut_with_the_models_tokenizer(hf_run, tmp_path):
    """`analyze`'s text data: files and text datasets become [BOS] + words rows of the model's tokenizer."""
    rng = np.random.default_rng(0)
    files = []
    for i in range(2):
        files.append(tmp_path / f"text{i}.txt")
        files[-1].write_text(" ".join(f"t{w}" for w in rng.integers(2, VOCAB, 400)))
    series = CheckpointSeries.from_hf_checkpoints(hf_run("gpt2"))
    task, train, test = task_data(series, files, AnalysisConfig(seq_len=17))
    words = [[int(w[1:]) for w in f.read_text().split()] for f in files]
    expected = torch.tensor([[0, *ws[i:i + 16]] for ws in words for i in range(0, len(ws) - 15, 16)])
    assert torch.equal(train, expected) and torch.equal(test, expected)  # BOS = the tokenizer's t0
    assert task.labels(train[0])[:3] == ["<bos>", f"t{words[0][0]}", f"t{words[0][1]}"]
    dataset = text_files(files)
    assert torch.equal(task_data(series, dataset, AnalysisConfig(seq_len=17))[1], expected)
    assert task_data(series, files[0], AnalysisConfig())[1].shape == (400 // 31, 32)  # default: the model's n_ctx
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        task_data(series, [files[0], tmp_path / "absent.txt"], AnalysisConfig())
    # the same packing with a transformers tokenizer directly, every row in train
    packed = pack_texts(dataset, tiny_tokenizer(), 17, test_fraction=0, bos=0)
    assert torch.equal(torch.tensor(packed["train"]["input_ids"]), expected) and len(packed["test"]) == 0


def _llc_frame(series):
    return llc_over_series(series, TOKENS.repeat(4, 1), num_chains=2, num_draws=3, num_burnin=1, batch_size=8)


@pytest.mark.parametrize("arch", ARCHS)
@TL3_UNEMBED_BIAS
def test_llc_over_a_trainer_series(hf_run, arch):
    series = CheckpointSeries.from_hf_checkpoints(hf_run(arch))
    frame = _llc_frame(series)
    assert frame["step"].tolist() == series.steps and np.isfinite(frame["llc_mean"]).all()
    n_params = sum(p.numel() for p in hf_model_at(hf_run(arch), 2).parameters())
    assert (frame["d"] == n_params).all()  # every weight the forward uses, once


@pytest.mark.parametrize("arch", ARCHS)
def test_head_llcs_over_a_trainer_series(hf_run, arch):
    series = CheckpointSeries.from_hf_checkpoints(hf_run(arch)).subset([2, 8])
    frame = llc_over_series(series, TOKENS.repeat(4, 1), heads=True, num_chains=2, num_draws=3, num_burnin=1,
                            batch_size=8)
    assert len(frame[frame["scope"] == "head"]) == 2 * 2 * 4 and np.isfinite(frame["llc_mean"]).all()


ANALYZE = ["--head-steps", "2", "--num-chains", "2", "--num-draws", "4", "--num-burnin", "2", "--batch-size", "8",
           "--n-sequences", "16", "--n-seqs", "8", "--n-components", "2", "--quiet"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_analyze_a_trainer_run_from_the_command_line(hf_run, arch, tmp_path, capsys):
    """`tl-devinterp analyze RUN_DIR --data FILE` finds the Trainer run and reads the text with its tokenizer."""
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"t{w}" for w in np.random.default_rng(0).integers(2, VOCAB, 2000)))
    out = tmp_path / "report"
    assert main(["analyze", str(hf_run(arch)), "--out", str(out), "--data", str(text), *ANALYZE]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out / "report.html")
    llc = pd.read_csv(out / "results" / "llc.csv")
    model = llc[llc["scope"] == "model"]
    assert model["step"].tolist() == [2, 4, 6, 8] and np.isfinite(llc["llc_mean"]).all()
    assert sorted(set(llc.loc[llc["scope"] == "head", "step"])) == [2, 8]  # every head at the first and last
    metrics = pd.read_csv(out / "results" / "metrics.csv")
    assert len(metrics[metrics["metric"] == "previous_token"]) == 4 * 2 * 4
    tokens = pd.read_csv(out / "results" / "loss_differences.csv")["token"]
    assert tokens.str.fullmatch(r"t\d+").all()  # labelled with the run's tokenizer: its words, not ids


def test_analyze_needs_data_for_a_trainer_run(hf_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["analyze", str(hf_run("neox")), "--out", str(tmp_path / "r"), "--quiet"])
    assert e.value.code == 2 and "--data FILE.txt" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        analyze(hf_run("neox"), tmp_path / "r", data=tmp_path / "absent.txt", progress=False)
