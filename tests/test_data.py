import datasets
import pytest
import torch

from tl_devinterp.data import (
    BOS,
    data_form,
    make_data,
    markov_tokens,
    pack_texts,
    plant_repeats,
    repeated_random_tokens,
    stdlib_texts,
    train_tokenizer,
)


def test_repeated_random_tokens_layout():
    x = repeated_random_tokens(5, 7, 30, seed=3)
    assert x.shape == (5, 15) and (x[:, 0] == BOS).all() and (x[:, 1:] != BOS).all()
    assert torch.equal(x[:, 1:8], x[:, 8:])
    assert torch.equal(x, repeated_random_tokens(5, 7, 30, seed=3))


def test_markov_tokens_follow_one_peaked_chain():
    a = markov_tokens(400, 32, 16, alpha=0.1, seed=1)
    b = markov_tokens(400, 32, 16, alpha=0.1, seed=2)  # other sequences, same chain
    assert (a[:, 0] == BOS).all() and (a[:, 1:] >= 1).all() and a.max() < 16

    def bigrams(t):
        counts = torch.zeros(16, 16)
        counts.index_put_((t[:, 1:-1].flatten(), t[:, 2:].flatten()), torch.ones(t[:, 2:].numel()), accumulate=True)
        return counts / counts.sum(1, keepdim=True).clamp(min=1)

    pa, pb = bigrams(a), bigrams(b)
    assert (pa - pb).abs().max() < 0.1  # the same chain
    assert pa[1:].max(1).values.mean() > 0.4  # peaked rows (uniform would be 1/15)
    uniform = markov_tokens(400, 32, 16, alpha=0.0, seed=1)
    assert bigrams(uniform)[1:].max(1).values.mean() < 0.2


def test_plant_repeats_copies_a_span_later_in_the_sequence():
    base = markov_tokens(50, 48, 1000, seed=0)
    out = plant_repeats(base, fraction=1.0, min_len=5, max_len=9, seed=0)
    assert (out[:, 0] == BOS).all()
    for row in out.tolist():
        found = any(row[i:i + 5] == row[j:j + 5] for i in range(1, 44) for j in range(i + 5, 44))
        assert found, row
    untouched = plant_repeats(base, fraction=0.0, seed=0)
    assert torch.equal(untouched, base)
    with pytest.raises(ValueError, match="2\\*max_len\\+1"):
        plant_repeats(base, min_len=4, max_len=30)


def test_stdlib_corpus_tokenizer_and_packing(tmp_path):
    texts = stdlib_texts(max_files=40)
    assert len(texts) == 40 and all(t for t in texts["text"])
    tok = train_tokenizer(texts, 300, cache_dir=tmp_path)
    assert tok.get_vocab_size() == 300 and tok.token_to_id("<|bos|>") == BOS
    assert len(list(tmp_path.glob("bpe-300-*.json"))) == 1  # cached
    assert tok.decode(tok.encode("def f(x):\n    return x").ids) == "def f(x):\n    return x"
    dd = pack_texts(texts, tok, 32, test_fraction=0.2)
    for split in ("train", "test"):
        ids = torch.tensor(dd[split]["input_ids"])
        assert ids.shape[1] == 32 and (ids[:, 0] == BOS).all() and (ids[:, 1:] != BOS).all()
    assert len(dd["test"]) < len(dd["train"])


def test_any_text_dataset_packs_the_same_way(tmp_path):
    docs = [f"document {i}: " + "alpha beta gamma delta one two three four " * 20 for i in range(20)]
    texts = datasets.Dataset.from_dict({"body": docs})
    tok = train_tokenizer(texts, 280, cache_dir=tmp_path, text_column="body")
    with pytest.raises(ValueError, match="no 'text' column"):
        pack_texts(texts, tok, 16)
    dd = pack_texts(texts, tok, 16, text_column="body", test_fraction=0.5)
    assert set(dd) == {"train", "test"}


def test_data_specs_regenerate_identical_data():
    spec = dict(kind="markov", d_vocab=32, seq_len=32, n_train=64, n_test=16, alpha=1.0, repeat_fraction=0.5,
                min_len=4, max_len=8, seed=0)
    a, b = make_data(spec), make_data(spec)
    assert a["train"]["input_ids"] == b["train"]["input_ids"] and len(a["test"]) == 16
    assert a["train"]["input_ids"] != make_data({**spec, "seed": 1})["train"]["input_ids"]
    with pytest.raises(ValueError, match="Unknown data kind"):
        make_data({"kind": "wikipedia"})


def test_data_form_is_decided_once_and_a_tensorlens_tokens_dataset_is_not_text(tmp_path):
    """Catches: a TransformerLens `tokenize_and_concatenate` dataset (column "tokens") read as text by one reader
    and as tokens by another (analyze's old test looked for "input_ids" only), or filtered by a missing column."""
    from tl_devinterp.sampling import filter_dataset

    tokens = repeated_random_tokens(4, 3, 10)
    tl_style = datasets.Dataset.from_dict({"tokens": tokens.tolist()})
    cases = [(torch.utils.data.DataLoader(tokens), "loader"), (tokens, "tensor"), ((tokens, tokens), "tensors"),
             ({"input_ids": tokens}, "mapping"), (tl_style, "dataset"),
             (datasets.Dataset.from_dict({"text": ["a b"]}), "text dataset"), (tmp_path / "a.txt", "text files"),
             (["a.txt", tmp_path / "b.txt"], "text files"), (3, None), ([], None)]
    assert [data_form(data) for data, _ in cases] == [form for _, form in cases]
    kept = filter_dataset(tl_style, lambda row: row[1] == tokens[0, 1].item())
    assert kept["tokens"][0] == tokens[0].tolist()
