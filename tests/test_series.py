import json
import os
import pickle

import pytest
import torch

from tl_devinterp import CheckpointSeries, ModelConfig, SeriesError, build_model, head_weights

CFG = ModelConfig(n_layers=1, n_heads=2, d_model=16, n_ctx=8, d_vocab=20)


def test_reads_back_a_series_written_by_our_trainer(quick_series_dir):
    series = CheckpointSeries.from_dir(quick_series_dir)
    manifest = json.loads((quick_series_dir / "manifest.json").read_text())
    assert series.steps == sorted(map(int, manifest["checkpoints"]))
    assert series.steps[0] == 0 and series.steps[-1] == manifest["train_config"]["n_steps"]
    first, last = series.load(series.steps[0]), series.load(series.steps[-1])
    assert not torch.equal(first.W_Q, last.W_Q)  # training changed the weights
    assert manifest["losses"][str(series.steps[-1])]["test"] < manifest["losses"]["0"]["test"]
    assert [s for s, _ in series] == series.steps


def test_tl_training_loop_output_loads(tmp_path):
    """A save_dir written by TransformerLens's own `tools.training.train`."""
    import datasets

    try:
        from transformer_lens.tools.training import TrainConfig, train
    except ImportError:  # TL 3.x
        from transformer_lens.train import HookedTransformerTrainConfig as TrainConfig
        from transformer_lens.train import train

    model = build_model(CFG)
    tokens = torch.randint(1, 20, (64, 8))
    ds = datasets.Dataset.from_dict({"tokens": tokens.tolist()}).with_format("torch")
    cfg = TrainConfig(num_epochs=1, batch_size=8, save_every=3, save_dir=str(tmp_path), print_every=None,
                      device="cpu", lr=1e-2)
    train(model, cfg, ds)
    files = sorted(tmp_path.glob("model_*.pt"))
    assert files, "TransformerLens saved no checkpoints"
    series = CheckpointSeries.from_tl_save_dir(tmp_path, CFG)
    assert len(series) == len(files)
    last = series.load(series.steps[-1])
    saved = torch.load(tmp_path / f"model_{series.steps[-1]}.pt", weights_only=True)
    assert torch.equal(last.state_dict()["blocks.0.attn.q.weight"], saved["blocks.0.attn.q.weight"])


def test_hand_made_pt_folder_in_hookedtransformer_layout_loads(tmp_path):
    """State dicts with HookedTransformer keys (blocks.0.attn.W_Q, [n_heads, d_model, d_head]): converted for a
    bridge on TL 4; on TL 3 loaded into a HookedTransformer, with a clear error for a bridge config."""
    model = build_model(CFG)
    sd = model.state_dict()
    ht = {"embed.W_E": sd["embed.weight"], "pos_embed.W_pos": sd["pos_embed.weight"], "unembed.W_U": sd["unembed.weight"].T,
          "unembed.b_U": torch.zeros(CFG.d_vocab), "ln_final.w": sd["ln_final.weight"], "ln_final.b": sd["ln_final.bias"],
          "blocks.0.ln1.w": sd["blocks.0.ln1.weight"], "blocks.0.ln1.b": sd["blocks.0.ln1.bias"],
          "blocks.0.attn.b_O": sd["blocks.0.attn.o.bias"]}
    for h in range(CFG.n_heads):
        for k, v in head_weights(model, 0, h).items():
            ht.setdefault(f"blocks.0.attn.{k}", []).append(v)
    torch.save({k: torch.stack(v) if isinstance(v, list) else v.clone() for k, v in ht.items()}, tmp_path / "model_7.pt")
    x = torch.randint(1, 20, (2, 8))
    try:
        from transformer_lens import HookedTransformerConfig  # TL 3.x
    except ImportError:
        loaded = CheckpointSeries.from_tl_save_dir(tmp_path, CFG).load(7)
    else:
        with pytest.raises(SeriesError, match="HookedTransformer layout.*HookedTransformerConfig"):
            CheckpointSeries.from_tl_save_dir(tmp_path, CFG).load(7)
        loaded = CheckpointSeries.from_tl_save_dir(tmp_path, HookedTransformerConfig(**CFG.tl_kwargs())).load(7)
    assert torch.allclose(loaded(x), model(x), atol=1e-5)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


def test_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "model_1.pt", "wb") as f:
        pickle.dump({"embed.weight": _Exploit()}, f)
    series = CheckpointSeries.from_tl_save_dir(tmp_path, CFG)
    with pytest.raises(SeriesError, match=r"model_1\.pt.*could not be loaded safely"):
        series.load(1)
    assert not (tmp_path / "pwned_by_pickle").exists()


def test_empty_series_is_an_error(tmp_path):
    with pytest.raises(SeriesError, match="empty"):
        CheckpointSeries.from_tl_save_dir(tmp_path, CFG)
    with pytest.raises(SeriesError, match="empty"):
        CheckpointSeries.from_models([], [])
    with pytest.raises(SeriesError, match=r"manifest.json not found"):
        CheckpointSeries.from_dir(tmp_path)


def test_missing_and_corrupt_checkpoints_are_named(quick_series_dir, tmp_path):
    import shutil

    d = tmp_path / "s"
    shutil.copytree(quick_series_dir, d)
    manifest = json.loads((d / "manifest.json").read_text())
    files = list(manifest["checkpoints"].values())
    (d / files[1]).write_bytes(b"\x00garbage" * 10)  # corrupt
    series = CheckpointSeries.from_dir(d)
    with pytest.raises(SeriesError, match=f"{files[1]}.*corrupt"):
        series.load(int(list(manifest["checkpoints"])[1]))
    (d / files[2]).unlink()  # missing: the manifest no longer matches the files
    with pytest.raises(SeriesError, match=f"files are missing.*{files[2]}"):
        CheckpointSeries.from_dir(d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(SeriesError, match="not valid JSON"):
        CheckpointSeries.from_dir(d)


def test_architecture_that_differs_across_the_series_is_refused(tmp_path):
    other = ModelConfig(n_layers=1, n_heads=2, d_model=24, n_ctx=8, d_vocab=20)
    with pytest.raises(SeriesError, match="different architecture"):
        CheckpointSeries.from_models([build_model(CFG), build_model(other)], [0, 1])
    torch.save(build_model(CFG).state_dict(), tmp_path / "model_0.pt")
    torch.save(build_model(other).state_dict(), tmp_path / "model_5.pt")
    series = CheckpointSeries.from_tl_save_dir(tmp_path, CFG)
    assert series.load(0) is not None
    with pytest.raises(SeriesError, match=r"model_5\.pt does not match.*shapes differ"):
        series.load(5)


def test_from_models_and_lookup_errors():
    models = [build_model(CFG) for _ in range(2)]
    series = CheckpointSeries.from_models(models, [10, 0])
    assert series.steps == [0, 10] and series.load(10) is models[0]
    with pytest.raises(KeyError, match="not in the series"):
        series.load(3)
    with pytest.raises(SeriesError, match="one step per model"):
        CheckpointSeries.from_models(models, [0])


def _fresh_model(step):
    return build_model(CFG)


def test_a_fingerprinted_series_still_pickles():
    """A parallel job ships the series after its fingerprints were taken: no loaded model may travel with it
    (a TransformerBridge does not pickle), and the copy gives the same fingerprint.

    Catches: `fingerprint` keeping the model it loaded for a later `load` (it used to)."""
    series = CheckpointSeries([0], _fresh_model)  # no fingerprint of its own: the loaded model is hashed
    assert series.known_fingerprint(0) is None
    fp = series.fingerprint(0)
    assert pickle.loads(pickle.dumps(series)).fingerprint(0) == fp
