"""Head scores: hand-built circuits, the uniform baseline of a fresh model, and TransformerLens's head detector."""

import math

import pytest
import torch

from tl_devinterp.metrics import (
    copying_scores,
    duplicate_token_scores,
    prefix_matching_scores,
    previous_token_scores,
    probe_tokens,
    uniform_baseline,
)
from tl_devinterp.models import HookedTransformer, ModelConfig, build_model, head_weights

KINDS = ["bridge"] + (["hooked"] if HookedTransformer is not None else [])  # hooked: TL 3.x only


def make_model(kind, cfg: ModelConfig):
    if kind == "bridge":
        return build_model(cfg)
    from transformer_lens import HookedTransformerConfig

    return HookedTransformer(HookedTransformerConfig(**cfg.tl_kwargs())).eval()


def all_scores(model, **kw):
    return {
        "previous_token": previous_token_scores(model, **kw),
        "prefix_matching": prefix_matching_scores(model, **kw),
        "duplicate_token": duplicate_token_scores(model, **kw),
        "copying": copying_scores(model),
    }


V, N = 128, 24  # vocabulary, context


def induction_circuit(kind):
    """A 2-layer attn-only model without LayerNorm whose head 0.0 attends to the previous token and whose
    head 1.0 is an induction head (K-composition with 0.0); heads x.1 are zero (uniform attention).

    Residual stream: [token one-hot (V) | position one-hot (N) | previous token one-hot (V)].
    """
    cfg = ModelConfig(n_layers=2, n_heads=2, d_model=2 * V + N, d_head=V, n_ctx=N, d_vocab=V,
                      attn_only=True, normalization_type=None)
    model = make_model(kind, cfg)
    tok, pos, prev = torch.arange(V), V + torch.arange(N), V + N + torch.arange(V)
    c = 30 * math.sqrt(V)  # attention logits 30 apart after the 1/sqrt(d_head) scale: a hard argmax
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.W_E[tok, tok] = 1
        W_pos = model.W_pos if kind == "hooked" else model.state_dict()["pos_embed.weight"]  # TL 3.9 bridge: no W_pos
        W_pos[torch.arange(N), pos] = 1
        model.W_U[tok, tok] = 1
        h0, h1 = head_weights(model, 0, 0), head_weights(model, 1, 0)
        h0["W_Q"][pos, torch.arange(N)] = c  # query at i: c * e_i
        h0["W_K"][pos[:-1], torch.arange(1, N)] = 1  # key at j: e_{j+1}  -> scores c where j = i - 1
        h0["W_V"][tok, tok] = 1
        h0["W_O"][tok, prev] = 1  # write the token into the "previous token" subspace of the next position
        h1["W_Q"][tok, tok] = c  # query: my token
        h1["W_K"][prev, tok] = 1  # key: the token before you (K-composition with head 0.0)
        h1["W_V"][tok, tok] = 1
        h1["W_O"][tok, tok] = 1  # copy the attended token: OV circuit = identity
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_hand_built_heads_score_one_on_their_own_score(kind):
    model = induction_circuit(kind)
    s = all_scores(model, n_seqs=32, seq_len=N - 1, seed=1)
    assert s["previous_token"][0, 0] > 0.99
    assert s["prefix_matching"][1, 0] > 0.9  # < 1 only where r repeats a token (then attention splits)
    assert s["copying"][1, 0] > 0.999
    assert s["copying"][0, 0].abs() < 1e-6 and s["copying"][:, 1].abs().max() < 1e-6  # no OV path to logits
    # everything else stays at (or below) the uniform baseline
    for name, table in s.items():
        other = torch.ones_like(table, dtype=torch.bool)
        other[{"previous_token": (0, 0), "prefix_matching": (1, 0), "copying": (1, 0)}.get(name, (0, 0))] = False
        if name == "duplicate_token":
            other[:] = True
        assert table[other].max() < 0.15, (name, table)
    # the zero heads attend uniformly: exactly the analytic baseline
    torch.testing.assert_close(s["previous_token"][:, 1], torch.full((2,), uniform_baseline(1, N - 1)))
    half = (N - 2) // 2
    torch.testing.assert_close(s["prefix_matching"][:, 1], torch.full((2,), uniform_baseline(half + 1, 2 * half + 1)))


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_model_scores_near_uniform_baseline(kind):
    model = make_model(kind, ModelConfig(n_layers=2, n_heads=4, d_model=64, n_ctx=64, d_vocab=256, seed=3))
    s = all_scores(model, n_seqs=16, seq_len=64, seed=0)
    half = 63 // 2
    base = {
        "previous_token": uniform_baseline(1, 64),  # mean over i = 1..63 of 1/(i+1) ≈ 0.059
        "prefix_matching": uniform_baseline(half + 1, 2 * half + 1),  # queries 32..62 ≈ 0.022
        "duplicate_token": uniform_baseline(half + 1, 2 * half + 1),
    }
    for name, b in base.items():
        assert s[name].shape == (2, 4)
        assert ((s[name] - b).abs() < 0.25 * b).all(), (name, s[name], b)
    assert s["copying"].abs().max() < 0.5  # random OV circuits: eigenvalues of both signs, std ≈ 0.1 at d_head 16


def test_probe_tokens_are_seeded_and_avoid_bos():
    model = build_model(ModelConfig(n_ctx=32, d_vocab=5))
    a = probe_tokens(model, "repeated", n_seqs=50, seq_len=21, seed=4)
    assert a.shape == (50, 21) and (a[:, 0] == 0).all() and (a[:, 1:] != 0).all()
    assert torch.equal(a[:, 1:11], a[:, 11:]) and torch.equal(a, probe_tokens(model, "repeated", n_seqs=50, seq_len=21, seed=4))
    r = probe_tokens(model, "random", n_seqs=50, seq_len=32, seed=4)
    assert r.shape == (50, 32) and (r[:, 1:] != 0).all() and set(r[:, 1:].unique().tolist()) == {1, 2, 3, 4}
    with pytest.raises(ValueError, match="n_ctx"):
        previous_token_scores(model, seq_len=33)
    with pytest.raises(ValueError, match="kind"):
        probe_tokens(model, "bigram")
    with pytest.raises(TypeError, match="TransformerLens"):
        previous_token_scores(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("kind", KINDS)
def test_agrees_with_transformer_lens_head_detector(kind):
    """TL's "mul" score is sum(A * D) / sum(A) over the whole [L, L] pattern; rows of A sum to 1, so it is our
    mean over the scored queries times (number of scored queries) / L, exactly when each scored query has one
    target (r without repeated tokens, which we check). Tolerance 1e-5."""
    head_detector = pytest.importorskip("transformer_lens.head_detector")
    cfg = ModelConfig(n_layers=2, n_heads=4, d_model=32, n_ctx=24, d_vocab=4096, seed=5)
    model = make_model(kind, cfg)
    torch.manual_seed(0)
    with torch.no_grad():  # large random QK weights: attention patterns far from uniform, whatever the init
        for layer in range(2):
            for head in range(4):
                for name in ("W_Q", "W_K"):
                    head_weights(model, layer, head)[name].normal_(0, 0.3)
    L, n_seqs, seed = 23, 6, 0
    half = (L - 1) // 2
    for probe, pattern, ours, queries in [
        ("random", "previous_token_head", previous_token_scores, L - 1),
        ("repeated", "duplicate_token_head", duplicate_token_scores, half),
        ("repeated", "induction_head", prefix_matching_scores, half),
    ]:
        tokens = probe_tokens(model, probe, n_seqs=n_seqs, seq_len=L, seed=seed)
        if probe == "repeated":
            assert all(len(set(row[1:half + 1].tolist())) == half for row in tokens), "pick another seed"
        prompts = {f"seq{i}": tokens[i:i + 1] for i in range(n_seqs)}
        # detect_head tokenizes its prompts (the whole list first, then each one)
        model.to_tokens = lambda s, p=prompts: torch.cat([p[k] for k in s]) if isinstance(s, list) else p[s]
        theirs = head_detector.detect_head(model, list(prompts), pattern)
        mine = ours(model, n_seqs=n_seqs, seq_len=L, seed=seed, batch_size=4)
        assert mine.max() - mine.min() > 0.03  # heads differ, so the comparison means something
        torch.testing.assert_close(theirs.float(), mine * queries / L, atol=1e-5, rtol=1e-4)


def test_classify_hand_built_heads():
    from tl_devinterp.metrics import classify_heads

    s = all_scores(induction_circuit("bridge"), n_seqs=16, seq_len=N - 1, seed=1)
    labels = classify_heads(s)
    assert list(labels.columns[:3]) == ["layer", "head", "label"]
    assert labels.set_index(["layer", "head"]).label.to_dict() == {
        (0, 0): "previous-token", (0, 1): "other", (1, 0): "induction", (1, 1): "other"}
    strict = classify_heads(s, thresholds={"prefix_matching": 1.01, "previous_token": 1.01})
    assert list(strict.label) == ["other", "other", "copying", "other"]  # head 1.0 still copies
    with pytest.raises(ValueError, match="Unknown thresholds"):
        classify_heads(s, thresholds={"induction": 0.5})
