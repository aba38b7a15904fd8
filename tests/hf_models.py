"""Tiny Hugging Face models of the architecture families we support, built offline from transformers configs.

`save_tiny_hf(arch, path)` writes a randomly initialised model (and a word-level tokenizer) with
`save_pretrained`, as a user's Trainer run or a hub snapshot would hold it; `boot(path)` loads it the way a
user does, through `TransformerBridge.boot_transformers`. Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

ARCHS = ("gpt2", "neox", "llama")
"""GPT-2 (fused QKV Conv1D, tied embeddings), GPT-NeoX (fused QKV Linear, rotary), Llama (grouped-query attention)."""

VOCAB = 64


def hf_model(arch: str, seed: int = 0):
    """A freshly initialised tiny causal LM: 2 layers, 4 heads, d_model 32, vocab 64, context 32."""
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=32, vocab_size=VOCAB))
    if arch == "neox":
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(
            num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64,
            max_position_embeddings=32, vocab_size=VOCAB))
    if arch == "llama":  # 4 query heads sharing 2 key/value heads
        return tf.LlamaForCausalLM(tf.LlamaConfig(
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
            intermediate_size=64, max_position_embeddings=32, vocab_size=VOCAB))
    raise ValueError(f"Unknown arch {arch!r}; choose from {ARCHS}.")


def tiny_tokenizer():
    """A word-level tokenizer over `t0 … t63` (t0 is BOS/unknown, t1 EOS), as a transformers tokenizer:
    the text `tN` is token N."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    word = lambda s: AddedToken(s, single_word=True, special=True, normalized=False)  # noqa: E731 (t1 ≠ t1x)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=word("t0"), eos_token=word("t1"),
                                   unk_token=word("t0"))


def save_tiny_hf(arch: str, path: str | os.PathLike, seed: int = 0, model=None) -> Path:
    """Write `model` (default: a fresh `hf_model(arch, seed)`) and the tiny tokenizer to `path`."""
    path = Path(path)
    (model if model is not None else hf_model(arch, seed)).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def boot(path: str | os.PathLike):
    """The TransformerLens bridge of a saved model, booted offline on the CPU."""
    from transformer_lens.model_bridge import TransformerBridge

    os.environ["HF_HUB_OFFLINE"] = "1"
    return TransformerBridge.boot_transformers(str(path), device="cpu").eval()


def trainer_run(arch: str, out: str | os.PathLike, *, max_steps: int = 8, save_steps: int = 2, seed: int = 0) -> Path:
    """A real (CPU) transformers `Trainer` run of `hf_model(arch)` on random tokens: checkpoint-{2,4,...}/
    folders holding config, safetensors weights, tokenizer, optimizer and RNG state, as a user's run does."""
    import datasets
    import transformers as tf

    ids = torch.randint(2, VOCAB, (32, 16), generator=torch.Generator().manual_seed(seed)).tolist()
    args = tf.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, save_steps=save_steps, per_device_train_batch_size=8,
        learning_rate=1e-2, seed=seed, report_to=[], logging_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = tf.Trainer(model=hf_model(arch, seed), args=args, processing_class=tiny_tokenizer(),
                         train_dataset=datasets.Dataset.from_dict({"input_ids": ids, "labels": ids}),
                         data_collator=tf.default_data_collator)
    trainer.train()
    return Path(out)


FAMILIES = ["native", "native-mlp", "hooked", "gpt2", "neox", "llama"]
"""Every architecture family the library supports: native bridges (attention-only, with MLPs), TL 3.x's
HookedTransformer, and HF bridges of GPT-2, GPT-NeoX and Llama (grouped-query attention)."""


def family_model(name: str, tmp_dir: Path):
    """A small model of family `name` (2 layers, 4 heads), in eval mode; pytest.skip for HookedTransformer on
    a TransformerLens without it (4.x). HF families are saved under `tmp_dir` and booted offline."""
    import pytest

    from tl_devinterp.models import HookedTransformer, ModelConfig, build_model

    cfg = ModelConfig(n_layers=2, n_heads=4, d_model=32, n_ctx=32, d_vocab=64, attn_only=name == "native")
    if name == "hooked":
        if HookedTransformer is None:
            pytest.skip("this TransformerLens has no HookedTransformer (4.x)")
        from transformer_lens import HookedTransformerConfig

        return HookedTransformer(HookedTransformerConfig(**cfg.tl_kwargs())).eval()
    if name.startswith("native"):
        return build_model(cfg)
    return boot(save_tiny_hf(name, tmp_dir))
