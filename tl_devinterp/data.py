"""Token data: synthetic tasks, the Python standard library as a local corpus, and any text dataset.

Every dataset here is a `datasets.DatasetDict` with `train` and `test` splits whose `input_ids` column holds
fixed-length sequences that start with BOS. Token 0 is BOS in all data made here (synthetic tasks and our
tokenizer). A data *spec* (a small dict, stored in series manifests) regenerates the same data anywhere:
`make_data(spec)`.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import sysconfig
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from jaxtyping import Int
from tqdm.auto import tqdm

from .errors import InvalidValueError, MissingFileError
from .files import atomic_write

BOS = 0
BOS_TEXT = "<|bos|>"


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


# --------------------------------------------------------------------------------------------------
# Synthetic tasks


def repeated_random_tokens(
    n_seqs: int, half_len: int, d_vocab: int, *, seed: int = 0, bos: int | None = BOS
) -> Int[torch.Tensor, "n_seqs seq"]:
    """`[BOS] + r + r` with r uniform random tokens (never BOS): the classic induction probe.

    Sequence length is `2 * half_len + 1` (or `2 * half_len` with `bos=None`).
    """
    if d_vocab < 3:
        raise InvalidValueError(f"d_vocab must be >= 3 for random tokens besides BOS, got {d_vocab}.")
    r = torch.randint(1, d_vocab, (n_seqs, half_len), generator=_generator(seed))
    parts = [r, r] if bos is None else [torch.full((n_seqs, 1), bos), r, r]
    return torch.cat(parts, dim=1)


def markov_tokens(
    n_seqs: int, seq_len: int, d_vocab: int, *, alpha: float = 0.0, chain_seed: int = 0, seed: int = 0
) -> Int[torch.Tensor, "n_seqs seq_len"]:
    """BOS, then tokens from one fixed global Markov chain over 1..d_vocab-1.

    Each row of the transition matrix is Dirichlet(alpha) (small alpha: peaked bigrams); `alpha=0` gives
    i.i.d. uniform tokens. `chain_seed` fixes the chain, `seed` the sampled sequences, so train and test
    splits share one chain. A model learns unigram, then bigram statistics from it (Bietti et al. 2023).
    """
    g = _generator(seed)
    v = d_vocab - 1
    if alpha <= 0:
        body = torch.randint(0, v, (n_seqs, seq_len - 1), generator=g)
    else:
        gc = _generator(chain_seed)
        gamma = torch._standard_gamma(torch.full((v, v), float(alpha)), generator=gc)
        trans = gamma / gamma.sum(-1, keepdim=True)
        body = torch.empty(n_seqs, seq_len - 1, dtype=torch.long)
        body[:, 0] = torch.randint(0, v, (n_seqs,), generator=g)
        for i in range(1, seq_len - 1):
            body[:, i] = torch.multinomial(trans[body[:, i - 1]], 1, generator=g).squeeze(-1)
    return torch.cat([torch.full((n_seqs, 1), BOS), body + 1], dim=1)


def plant_repeats(
    tokens: Int[torch.Tensor, "n_seqs seq"],
    *,
    fraction: float = 1.0,
    min_len: int = 4,
    max_len: int = 16,
    seed: int = 0,
) -> Int[torch.Tensor, "n_seqs seq"]:
    """Copy a random span of each chosen sequence to a later random offset (an in-context repeat).

    A `fraction` of the sequences get one span of length in [min_len, max_len]; position 0 (BOS) is never
    part of a span. Returns a new tensor.
    """
    n, seq = tokens.shape
    if not 0.0 <= fraction <= 1.0:
        raise InvalidValueError(f"fraction must be in [0, 1], got {fraction}.")
    if not 1 <= min_len <= max_len or 2 * max_len + 1 > seq:
        raise InvalidValueError(
            f"Need 1 <= min_len <= max_len and 2*max_len+1 <= sequence length ({seq}); "
            f"got min_len={min_len}, max_len={max_len}."
        )
    g = _generator(seed)
    out = tokens.clone()
    chosen = torch.rand(n, generator=g) < fraction
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g)
    u = torch.rand(n, 2, generator=g)
    for i in torch.nonzero(chosen).flatten().tolist():
        length = int(lengths[i])
        free = seq - 1 - 2 * length  # room left around the two copies
        gap = int(u[i, 0] * (free + 1))  # distance between the end of the source and the copy
        src = 1 + int(u[i, 1] * (free - gap + 1))
        dst = src + length + gap
        out[i, dst : dst + length] = out[i, src : src + length]
    return out


# --------------------------------------------------------------------------------------------------
# Text corpora


def stdlib_texts(max_files: int | None = None) -> datasets.Dataset:
    """The Python standard library's own source files as a `text` dataset (present on every machine)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    if not files:
        raise MissingFileError(f"No .py files under the standard library path {root}.")
    files = files[:max_files] if max_files else files
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    return datasets.Dataset.from_dict({"text": texts, "path": [str(p.relative_to(root)) for p in files]})


def default_cache_dir() -> Path:
    return Path(os.environ.get("TL_DEVINTERP_CACHE", Path.home() / ".cache" / "tl_devinterp"))


def train_tokenizer(texts: datasets.Dataset, vocab_size: int, *, cache_dir: str | os.PathLike | None = None,
                    text_column: str = "text"):
    """A byte-level BPE tokenizer trained locally on `texts`, BOS as id 0; cached on disk by content hash."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    h = hashlib.sha256(str(vocab_size).encode())
    for t in texts[text_column]:
        h.update(t.encode("utf-8", "replace"))
    file = Path(cache_dir or default_cache_dir()) / f"bpe-{vocab_size}-{h.hexdigest()[:12]}.json"
    if file.exists():
        return Tokenizer.from_file(str(file))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS_TEXT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts[text_column], trainer=trainer)
    assert tok.token_to_id(BOS_TEXT) == BOS
    file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(file, tok.to_str())  # a cut cache file would fail every later run
    return tok


def text_files(paths: str | os.PathLike | list[str | os.PathLike]) -> datasets.Dataset:
    """Text files as a `text` dataset, one document per file (what `tl-devinterp analyze --data` reads)."""
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    absent = [str(p) for p in paths if not p.is_file()]
    if absent:
        raise MissingFileError(f"Text data file(s) not found: {absent}. Give paths of plain text files.")
    texts = [read_text(p) for p in paths]
    return datasets.Dataset.from_dict({"text": texts, "path": [str(p) for p in paths]})


_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def read_text(path: Path) -> str:
    """A text file's contents: UTF-8, or the encoding its byte-order mark names (UTF-8, UTF-16, UTF-32), or
    UTF-16 without one (every other byte NUL). Anything else (Latin-1, binary) is refused, naming the file and
    the fix, rather than decoded with replacement characters and tokenised as if it were text."""
    data = path.read_bytes()
    encoding = next((enc for bom, enc in _BOMS if data.startswith(bom)), None)
    if encoding is None and data.count(0) and len(data) % 2 == 0:
        for parity, enc in ((1, "utf-16-le"), (0, "utf-16-be")):  # mostly ASCII text: its high bytes are NUL
            if data[parity::2].count(0) >= 0.9 * (len(data) // 2):
                encoding = enc
    try:
        text = data.decode(encoding or "utf-8")
    except UnicodeDecodeError as e:
        raise InvalidValueError(
            f"{path} is not {encoding or 'UTF-8'} text (byte 0x{data[e.start]:02x} at offset {e.start}): it may be "
            f"Latin-1 / Windows-1252, or not text at all. Convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8 {path} "
            f"> {path.stem}.utf8{path.suffix}) and pass that file.") from None
    control = sum(c < " " and c not in "\t\n\r\f\v" for c in text)
    if "\x00" in text or control > 0.01 * len(text):
        raise InvalidValueError(f"{path} holds binary data ({text.count(chr(0))} NUL and {control} control "
                                f"characters), not text: pass plain text files (UTF-8, or UTF-16 with a byte-order "
                                f"mark).")
    return text


def pack_texts(
    texts: datasets.Dataset, tokenizer, seq_len: int, *, text_column: str = "text", test_fraction: float = 0.1,
    seed: int = 0, bos: int = BOS, progress: bool = True,
) -> datasets.DatasetDict:
    """Tokenize a text dataset and pack it into fixed-length `[bos] + seq_len-1 tokens` rows.

    `tokenizer` is a `tokenizers.Tokenizer` or a transformers tokenizer (give its `bos`). Documents are
    assigned to train or test by a hash of their text, so the split is stable; `test_fraction=0` puts every
    row in train.
    """
    if text_column not in texts.column_names:
        raise InvalidValueError(
            f"The dataset has no {text_column!r} column (columns: {texts.column_names}); pass text_column=."
        )
    body = seq_len - 1
    rows: dict[str, list[list[int]]] = {"train": [], "test": []}
    for text in tqdm(texts[text_column], desc="tokenizing", unit="doc", leave=False, disable=not progress):
        ids = tokenizer.encode(text, add_special_tokens=False)
        ids = getattr(ids, "ids", ids)  # a tokenizers Encoding, or a transformers list of ids
        digest = int(hashlib.sha256(f"{seed}:{text}".encode("utf-8", "replace")).hexdigest()[:8], 16)
        split = "test" if digest / 0xFFFFFFFF < test_fraction else "train"
        rows[split].extend([bos, *ids[i : i + body]] for i in range(0, len(ids) - body + 1, body))
    for split, r in rows.items():
        if not r and (split == "train" or test_fraction > 0):
            raise InvalidValueError(f"No {split} sequences of length {seq_len}: the corpus is too small for that length.")
    return datasets.DatasetDict({s: datasets.Dataset.from_dict({"input_ids": r}) for s, r in rows.items()})


# --------------------------------------------------------------------------------------------------
# Specs: one dict regenerates a dataset (stored in series manifests)


def make_data(spec: dict[str, Any], *, cache_dir: str | os.PathLike | None = None) -> datasets.DatasetDict:
    """Build the dataset a spec describes. Kinds:

    - `{"kind": "markov", d_vocab, seq_len, n_train, n_test, alpha, repeat_fraction, min_len, max_len, seed}`:
      a global Markov chain (alpha=0: uniform random tokens) with in-context repeats planted.
    - `{"kind": "stdlib", vocab_size, seq_len, max_files, repeat_fraction, min_len, max_len, seed}`: the Python
      standard library's source, BPE-tokenized, optionally with planted repeats.
    """
    kind = spec.get("kind")
    seed = int(spec.get("seed", 0))
    if kind == "markov":
        splits = {}
        for i, (split, n) in enumerate((("train", spec["n_train"]), ("test", spec["n_test"]))):
            toks = markov_tokens(n, spec["seq_len"], spec["d_vocab"], alpha=spec.get("alpha", 0.0),
                                 chain_seed=seed, seed=seed * 1000 + i + 1)
            splits[split] = _with_repeats(toks, spec, seed * 1000 + i + 101)
        return datasets.DatasetDict({s: datasets.Dataset.from_dict({"input_ids": t.tolist()}) for s, t in splits.items()})
    if kind == "stdlib":
        texts = stdlib_texts(spec.get("max_files"))
        dd = pack_texts(texts, spec_tokenizer(spec, cache_dir=cache_dir), spec["seq_len"], seed=seed)
        if spec.get("repeat_fraction", 0):
            dd = datasets.DatasetDict({
                s: datasets.Dataset.from_dict({"input_ids": _with_repeats(
                    torch.tensor(d["input_ids"]), spec, seed * 1000 + i + 101).tolist()})
                for i, (s, d) in enumerate(dd.items())
            })
        return dd
    raise InvalidValueError(f"Unknown data kind {kind!r}; known kinds: 'markov', 'stdlib'.")


def spec_tokenizer(spec: dict[str, Any], *, cache_dir: str | os.PathLike | None = None):
    """The tokenizer of a text spec (trained once, then read from the cache); None for synthetic token data."""
    if spec.get("kind") != "stdlib":
        return None
    return train_tokenizer(stdlib_texts(spec.get("max_files")), spec["vocab_size"], cache_dir=cache_dir)


def _with_repeats(tokens: torch.Tensor, spec: dict[str, Any], seed: int) -> torch.Tensor:
    fraction = spec.get("repeat_fraction", 0.0)
    if not fraction:
        return tokens
    return plant_repeats(tokens, fraction=fraction, min_len=spec.get("min_len", 4),
                         max_len=spec.get("max_len", 16), seed=seed)


TOKEN_COLUMNS = ("input_ids", "tokens")
"""The columns a dataset's token ids are read from: ours and transformers' `input_ids`, TransformerLens's
`tokenize_and_concatenate` `tokens`."""


def data_form(data: Any) -> str | None:
    """What form `data` is in, decided here once for every reader: "loader" (a torch DataLoader), "tensor" (one
    tensor), "tensors" (a list or tuple of tensors), "mapping" (a dict or a tokenizer's BatchEncoding), "dataset"
    (a `datasets.Dataset` with a token column, `TOKEN_COLUMNS`), "text dataset" (one without), "text files" (a
    path or a list of paths); None for anything else."""
    if isinstance(data, torch.utils.data.DataLoader):
        return "loader"
    if isinstance(data, torch.Tensor):
        return "tensor"
    if isinstance(data, (str, os.PathLike)):
        return "text files"
    if isinstance(data, (list, tuple)) and data:
        if all(isinstance(t, torch.Tensor) for t in data):
            return "tensors"
        return "text files" if all(isinstance(d, (str, os.PathLike)) for d in data) else None
    if isinstance(data, datasets.Dataset):
        return "dataset" if any(c in data.column_names for c in TOKEN_COLUMNS) else "text dataset"
    return "mapping" if hasattr(data, "keys") else None


def token_column(data) -> str:
    """The column of a `datasets.Dataset` that holds its token ids (`TOKEN_COLUMNS`, in that order)."""
    column = next((c for c in TOKEN_COLUMNS if c in data.column_names), None)
    if column is None:
        raise InvalidValueError(f"The dataset has no token column {' or '.join(map(repr, TOKEN_COLUMNS))} (columns: "
                                f"{data.column_names}); tokenize it first with tl_devinterp.data.pack_texts.")
    return column


def token_tensor(data: datasets.Dataset | torch.Tensor) -> Int[torch.Tensor, "n seq"]:
    """The token ids of a dataset (`token_column`) or a token tensor as one `[n, seq]` long tensor."""
    if isinstance(data, torch.Tensor):
        return data.long()
    return torch.as_tensor(np.asarray(data.with_format("numpy")[token_column(data)]), dtype=torch.long)
