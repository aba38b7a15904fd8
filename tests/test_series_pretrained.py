"""`CheckpointSeries.from_pretrained` on a locally saved copy of a hub model family (no network).

A Hugging Face cache is laid out as the hub would leave it for Pythia: one snapshot per training checkpoint,
`refs/step{N}` naming it. The series is read in a subprocess with HF_HUB_OFFLINE=1 and HF_HUB_CACHE pointing
at that cache (both are read when huggingface_hub is imported).
"""

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

NAME = "EleutherAI/pythia-70m"
STEPS = [0, 1000]

LOAD = """
import json, sys, torch
from tl_devinterp import CheckpointSeries
series = CheckpointSeries.from_pretrained(sys.argv[1], checkpoint_values=[0, 1000])
tokens = torch.arange(1, 17)[None]
print(json.dumps({"steps": series.steps,
                  "logits": {s: series.load(s)(tokens)[0, :4, :4].tolist() for s in series.steps}}))
"""


def _tokenizer():
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(64)}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), bos_token="t0", eos_token="t0",
        unk_token="t0")


def _save_snapshot(cache, step: int, seed: int) -> torch.Tensor:
    cfg = transformers.GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(seed)
    model = transformers.GPTNeoXForCausalLM(cfg).eval()
    repo = cache / f"models--{NAME.replace('/', '--')}"
    sha = f"{step:040x}"
    model.save_pretrained(repo / "snapshots" / sha)
    _tokenizer().save_pretrained(repo / "snapshots" / sha)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / f"step{step}").write_text(sha)
    with torch.no_grad():
        return model(torch.arange(1, 17)[None]).logits[0, :4, :4]


@pytest.mark.slow
def test_pretrained_checkpoints_load_from_a_local_copy(tmp_path):
    cache = tmp_path / "hub"
    expected = {step: _save_snapshot(cache, step, seed) for seed, step in enumerate(STEPS)}
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "TRANSFORMERS_OFFLINE": "1",
           "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", LOAD, NAME], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["steps"] == STEPS
    for step in STEPS:
        assert torch.allclose(torch.tensor(got["logits"][str(step)]), expected[step], atol=1e-4), step
    assert not torch.allclose(expected[0], expected[1000])  # the two checkpoints differ
