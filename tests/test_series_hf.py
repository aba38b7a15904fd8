"""Series from Hugging Face checkpoints: a transformers Trainer's output_dir and hub revisions, all offline.

Every family of `hf_models` (GPT-2: fused Conv1D QKV and tied embeddings; GPT-NeoX: fused Linear QKV and
rotary; Llama: grouped-query attention) is saved by a real CPU Trainer run, or written into a hand-made hub
cache, and each checkpoint of the series must give the logits of the transformers model it was saved from.
"""

import json
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformer_lens.model_bridge import TransformerBridge  # noqa: E402

if not hasattr(TransformerBridge, "boot_transformers"):  # TL 3.x: no transformers bridge
    pytest.skip("needs TransformerBridge.boot_transformers (TransformerLens >= 4)", allow_module_level=True)

from hf_models import ARCHS, hf_model, save_tiny_hf, tiny_tokenizer  # noqa: E402

from tl_devinterp import CheckpointSeries  # noqa: E402
from tl_devinterp.series import SeriesError  # noqa: E402

TOKENS = torch.arange(1, 17)[None]
RUN_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin")  # pickles a Trainer writes


def hf_logits(folder) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(TOKENS).logits


class _Trap:
    """Unpickling this creates `path`: proof that a file was unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# --------------------------------------------------------------------------------------------------
# transformers Trainer output


@pytest.mark.parametrize("arch", ARCHS)
def test_trainer_checkpoints_load_with_their_own_weights(hf_run, arch):
    """Each step boots its own checkpoint (not a neighbour's, not a stale reused bridge)."""
    run = hf_run(arch)
    series = CheckpointSeries.from_hf_checkpoints(run)
    assert series.steps == [2, 4, 6, 8]
    logits = {}
    for step, model in series:
        assert isinstance(model, TransformerBridge)
        with torch.no_grad():
            logits[step] = model(TOKENS)
        torch.testing.assert_close(logits[step], hf_logits(run / f"checkpoint-{step}"), atol=1e-5, rtol=1e-5)
        assert model.tokenizer.convert_ids_to_tokens(5) == "t5"  # the run's tokenizer
    assert not torch.allclose(logits[2], logits[8], atol=1e-3)  # training moved the weights


def test_trainer_run_files_are_never_unpickled(hf_run, tmp_path):
    """Optimizer, scheduler, RNG state and training args are pickles that may run code: never read."""
    run = tmp_path / "run"
    shutil.copytree(hf_run("gpt2"), run)
    marker = tmp_path / "unpickled"
    for folder in run.glob("checkpoint-*"):
        for name in RUN_FILES:
            (folder / name).write_bytes(pickle.dumps(_Trap(marker)))
    series = CheckpointSeries.from_hf_checkpoints(run)
    for _ in series:
        pass
    assert not marker.exists()


def test_pytorch_model_bin_is_read_as_weights_only(hf_run, tmp_path):
    """A pytorch_model.bin checkpoint loads (same logits), and one holding code is refused, not run."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    shutil.copytree(hf_run("gpt2"), run)
    for folder in run.glob("checkpoint-*"):
        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    series = CheckpointSeries.from_hf_checkpoints(run)
    with torch.no_grad():
        torch.testing.assert_close(series.load(4)(TOKENS), hf_logits(hf_run("gpt2") / "checkpoint-4"))
    marker = tmp_path / "unpickled"
    (run / "checkpoint-4" / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Trap(marker)}))
    with pytest.raises(SeriesError, match="could not be loaded safely"):
        series.load(4)
    assert not marker.exists()


def test_sharded_safetensors_load_and_are_all_fingerprinted(hf_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(hf_run("neox"), run)
    model = hf_model("neox")
    for folder in run.glob("checkpoint-*"):
        (folder / "model.safetensors").unlink()
        transformers.AutoModelForCausalLM.from_pretrained(hf_run("neox") / folder.name).save_pretrained(
            folder, max_shard_size="40KB")
    assert len(list((run / "checkpoint-6").glob("model-*.safetensors"))) > 1
    series = CheckpointSeries.from_hf_checkpoints(run)
    with torch.no_grad():
        torch.testing.assert_close(series.load(6)(TOKENS), hf_logits(hf_run("neox") / "checkpoint-6"))
    before = series.fingerprint(6)
    last = sorted((run / "checkpoint-6").glob("model-*.safetensors"))[-1]
    model.save_pretrained(tmp_path / "other", max_shard_size="40KB")  # one shard's content changes
    shutil.copy(sorted((tmp_path / "other").glob("model-*.safetensors"))[-1], last)
    assert CheckpointSeries.from_hf_checkpoints(run).fingerprint(6) != before


def test_trainer_tokenizer_from_the_run_or_given(hf_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(hf_run("neox"), run)
    for f in run.glob("checkpoint-*/tok*"):
        f.unlink()
    with pytest.raises(SeriesError, match=r"No tokenizer saved in .*pass tokenizer="):
        CheckpointSeries.from_hf_checkpoints(run)
    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    source = CheckpointSeries.from_hf_checkpoints(run, tmp_path / "tok").load(2).tokenizer.name_or_path
    assert source == str(tmp_path / "tok")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert CheckpointSeries.from_hf_checkpoints(run, tok).load(2).tokenizer.name_or_path == str(tmp_path / "tok")
    tiny_tokenizer().save_pretrained(run)  # saved in the run's root
    assert CheckpointSeries.from_hf_checkpoints(run).load(2).tokenizer.name_or_path == str(run)


def test_trainer_fingerprints_follow_the_weight_files(hf_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(hf_run("llama"), run)
    series = CheckpointSeries.from_hf_checkpoints(run)
    prints = {s: series.fingerprint(s) for s in series.steps}
    assert list(prints) == [2, 4, 6, 8] and len(set(prints.values())) == 4
    assert {s: CheckpointSeries.from_hf_checkpoints(run).fingerprint(s) for s in prints} == prints
    shutil.copy(run / "checkpoint-2" / "model.safetensors", run / "checkpoint-8" / "model.safetensors")
    again = CheckpointSeries.from_hf_checkpoints(run)
    assert again.fingerprint(8) == prints[2] and again.fingerprint(4) == prints[4]


def test_trainer_run_errors_name_the_folder(tmp_path):
    with pytest.raises(SeriesError, match="not a directory"):
        CheckpointSeries.from_hf_checkpoints(tmp_path / "absent")
    with pytest.raises(SeriesError, match=r"No checkpoint-\{N\} folders"):
        CheckpointSeries.from_hf_checkpoints(tmp_path)
    save_tiny_hf("gpt2", tmp_path / "checkpoint-3")
    (tmp_path / "checkpoint-3" / "model.safetensors").unlink()
    with pytest.raises(SeriesError, match="checkpoint-3 has no model.safetensors or pytorch_model.bin"):
        CheckpointSeries.from_hf_checkpoints(tmp_path)
    (tmp_path / "checkpoint-3" / "config.json").unlink()
    with pytest.raises(SeriesError, match="checkpoint-3 has no config.json"):
        CheckpointSeries.from_hf_checkpoints(tmp_path)


# --------------------------------------------------------------------------------------------------
# Hub revisions, from a hand-made Hugging Face cache (refs/<revision> -> snapshots/<commit>/)

HUB = {  # repo: (family, revisions, checkpoint_values, expected steps)
    "EleutherAI/pythia-tiny": ("neox", ["step0", "step1000"], None, [0, 1000]),
    "stanford-crfm/tiny-gpt2": ("gpt2", ["checkpoint-100", "checkpoint-400"], None, [100, 400]),
    "someone/tiny-llama": ("llama", ["early", "late"], [10, 20], [10, 20]),
}

LOAD = """
import json, sys, torch
from tl_devinterp import CheckpointSeries
out = {}
for name, (family, revisions, values, steps) in json.loads(sys.argv[1]).items():
    series = CheckpointSeries.from_pretrained(name, revisions=revisions, checkpoint_values=values)
    with torch.no_grad():
        out[name] = {"steps": series.steps, "fingerprints": {s: series.fingerprint(s) for s in series.steps},
                     "logits": {s: series.load(s)(torch.arange(1, 17)[None]).tolist() for s in series.steps}}
print(json.dumps(out))
"""


def _commit(name: str, revision: str) -> str:
    import hashlib

    return hashlib.sha1(f"{name}@{revision}".encode()).hexdigest()


@pytest.mark.slow
def test_hub_revisions_load_offline_from_the_cache(tmp_path):
    cache, expected = tmp_path / "hub", {}
    for i, (name, (arch, revisions, _, steps)) in enumerate(HUB.items()):
        repo = cache / f"models--{name.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True)
        for j, (revision, step) in enumerate(zip(revisions, steps)):
            model = hf_model(arch, seed=10 * i + j).eval()
            save_tiny_hf(arch, repo / "snapshots" / _commit(name, revision), model=model)
            (repo / "refs" / revision).write_text(_commit(name, revision))
            with torch.no_grad():
                expected[name, step] = model(TOKENS).logits
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home"), "HF_HUB_CACHE": str(cache),
           "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", LOAD, json.dumps(HUB)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    for name, (_, revisions, _, steps) in HUB.items():
        assert got[name]["steps"] == steps
        assert got[name]["fingerprints"] == {str(s): _commit(name, r) for s, r in zip(steps, revisions)}
        for step in steps:
            torch.testing.assert_close(torch.tensor(got[name]["logits"][str(step)]), expected[name, step],
                                       atol=1e-5, rtol=1e-5)


def test_revision_steps_come_from_names_or_are_given():
    with pytest.raises(SeriesError, match=r"revision 'main'.*checkpoint_values"):
        CheckpointSeries.from_pretrained("org/model", revisions=["step1", "main"])
    with pytest.raises(SeriesError, match="2 revisions but 1 checkpoint_values"):
        CheckpointSeries.from_pretrained("org/model", revisions=["a", "b"], checkpoint_values=[1])
    series = CheckpointSeries.from_pretrained("org/model", revisions=["checkpoint-20", "step5"])
    assert series.steps == [5, 20] and series.meta["revisions"] == {20: "checkpoint-20", 5: "step5"}
