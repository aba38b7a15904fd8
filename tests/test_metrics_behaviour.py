"""Behavioural metrics on models and data with known answers."""

import math

import pytest
import torch

from tl_devinterp.metrics import (
    bigram_score,
    bigram_table,
    frequent_ngrams,
    icl_score,
    loss_difference,
    ngram_scores,
    per_token_loss,
)
from tl_devinterp.metrics.behaviour import icl_positions, ngram_relative_loss
from tl_devinterp.models import ModelConfig, build_model

V = 8


def direct_path_model(alpha: float):
    """Zero attention, no LayerNorm, W_E = I, W_U = alpha * I: logits = alpha * one_hot(current token).
    alpha = 0 gives uniform logits."""
    model = build_model(ModelConfig(n_layers=1, n_heads=2, d_model=V, n_ctx=16, d_vocab=V, normalization_type=None))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.W_E.copy_(torch.eye(V))
        model.W_U.copy_(alpha * torch.eye(V))
    return model


def test_uniform_logits_lose_log_vocab_everywhere():
    tokens = torch.randint(0, V, (5, 16), generator=torch.Generator().manual_seed(0))
    uniform = direct_path_model(0.0)
    loss = per_token_loss(uniform, tokens, batch_size=2)
    assert loss.shape == (5, 15)
    torch.testing.assert_close(loss, torch.full((5, 15), math.log(V)))
    assert icl_score(uniform, tokens) == pytest.approx(0.0, abs=1e-6)
    assert loss_difference(uniform, uniform, tokens).abs().max() == 0


def test_loss_alignment_and_differences():
    """The repeat-the-current-token model: loss[b, i] is low exactly where tokens[b, i + 1] == tokens[b, i]."""
    alpha = 3.0
    tokens = torch.tensor([[1, 1, 2, 2, 2, 3, 4, 4]])
    repeat = direct_path_model(alpha)
    lse = math.log(math.exp(alpha) + V - 1)
    expected = torch.tensor([[lse - alpha, lse, lse - alpha, lse - alpha, lse, lse, lse - alpha]])
    torch.testing.assert_close(per_token_loss(repeat, tokens), expected)
    # token 7 (repeat of 6) against token 1 (a repeat too) and 5 (new)
    assert icl_score(repeat, tokens, early=5, late=7) == pytest.approx(-alpha, abs=1e-5)
    diff = loss_difference(direct_path_model(0.0), repeat, tokens)  # b - a: negative where the loss fell
    torch.testing.assert_close(diff, expected - math.log(V))
    assert (diff[expected < lse - 1] < 0).all() and (diff[expected > lse - 1] > 0).all()


def test_icl_positions_scale_with_context():
    assert icl_positions(1024) == (50, 500)
    assert icl_positions(64) == (3, 31)
    assert icl_positions(4) == (1, 2)
    with pytest.raises(ValueError, match="early < late"):
        icl_positions(64, early=40, late=10)
    with pytest.raises(ValueError, match="late <= 63"):
        icl_score(direct_path_model(0.0), torch.zeros(2, 64, dtype=torch.long), late=64)


def test_bigram_table_known_sequence_dense_sparse_and_dataset():
    table = bigram_table(torch.tensor([[1, 2, 1, 3]]), 4)
    expected = torch.zeros(4, 4)
    expected[1, 2] = expected[1, 3] = 0.5
    expected[2, 1] = 1.0
    torch.testing.assert_close(table, expected)
    sparse = bigram_table(torch.tensor([[1, 2, 1, 3]]), 4, dense_max=0)
    assert sparse.is_sparse
    torch.testing.assert_close(sparse.to_dense(), expected)
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2, 1], [1, 3], [0]]})  # windows never cross rows
    torch.testing.assert_close(bigram_table(ds, 4), expected)
    torch.testing.assert_close(bigram_table([[1, 2, 1], [1, 3]], 4), expected)
    with pytest.raises(ValueError, match="outside"):
        bigram_table([[1, 9]], 4)


def test_bigram_score_against_uniform_model():
    data = torch.tensor([[1, 2, 1, 3]])
    uniform = direct_path_model(0.0)
    for table in (bigram_table(data, V), bigram_table(data, V, dense_max=0)):
        # cross-entropy from any distribution to uniform is log V; KL subtracts the rows' entropies
        assert bigram_score(uniform, data, table) == pytest.approx(math.log(V), abs=1e-6)
        kl = math.log(V) - (math.log(2) + 0 + math.log(2)) / 3  # rows of tokens 1, 2, 1
        assert bigram_score(uniform, data, table, kl=True) == pytest.approx(kl, abs=1e-6)
    # the repeat model puts mass alpha on the current token, which no bigram of the data continues with
    alpha = 3.0
    lse = math.log(math.exp(alpha) + V - 1)
    assert bigram_score(direct_path_model(alpha), torch.tensor([[1, 3]]), bigram_table(data, V)) == pytest.approx(lse)
    with pytest.raises(ValueError, match="has bigram statistics"):
        bigram_score(uniform, torch.tensor([[3, 1]]), bigram_table(data, V))  # 3 is never followed by anything


def test_frequent_ngrams_and_relative_loss():
    data = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2]])
    assert frequent_ngrams(data, 2, top_k=1).tolist() == [[1, 2]]
    assert frequent_ngrams(data, 3, top_k=5).tolist() == [[1, 2, 3], [2, 3, 1], [3, 1, 2]]  # ties in token order
    tokens = torch.tensor([[5, 1, 2, 7]])
    loss = torch.tensor([[1.0, 4.0, 7.0]])  # loss[:, i] predicts tokens[:, i + 1]
    assert ngram_relative_loss(loss, tokens, torch.tensor([[1, 2]])) == pytest.approx(4.0 - 4.0)
    assert ngram_relative_loss(loss, tokens, torch.tensor([[5, 1]])) == pytest.approx(1.0 - 4.0)
    assert ngram_relative_loss(loss, tokens, torch.tensor([[1, 2, 7], [9, 9, 9]])) == pytest.approx(7.0 - 4.0)
    assert math.isnan(ngram_relative_loss(loss, tokens, torch.tensor([[2, 1]])))
    # with the repeat model, the frequent bigram (4, 4) completes at low loss
    repeat_data = torch.tensor([[4, 4, 4, 4, 1, 2]])
    scores = ngram_scores(direct_path_model(3.0), torch.tensor([[4, 4, 1, 2, 4, 4]]), repeat_data, n=(2,), top_k=1)
    assert list(scores) == [2] and scores[2] < -1.0
    assert ngram_scores(direct_path_model(0.0), repeat_data, repeat_data, n=2)[2] == pytest.approx(0.0, abs=1e-6)


def test_token_validation():
    model = direct_path_model(0.0)
    with pytest.raises(ValueError, match="integer tensor"):
        per_token_loss(model, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="n_ctx"):
        per_token_loss(model, torch.zeros(2, 17, dtype=torch.long))


def test_repeat_positions_find_planted_copies_and_score_the_second():
    from tl_devinterp.data import plant_repeats
    from tl_devinterp.metrics.behaviour import repeat_icl_score, repeat_positions

    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 1000, (16, 40), generator=g)  # large vocabulary: no accidental repeats
    tokens = plant_repeats(clean, min_len=6, max_len=9, seed=1)
    first, second = repeat_positions(tokens, min_len=5)
    changed = (tokens != clean).sum(1)  # the copy overwrote its span
    assert (second.sum(1) == first.sum(1)).all() and (second.sum(1) >= changed - 1).all()
    assert (second.sum(1) >= 5).all() and (second.sum(1) <= 8).all()  # length - 1 predictable tokens
    assert repeat_positions(clean, min_len=5)[1].sum() == 0
    assert not second[:, 0].any() and not (first & second).any()
    loss = torch.ones(16, 39)
    loss[second[:, 1:]] = 0.25  # a model that copies: low loss on the second copies only
    assert repeat_icl_score(loss, tokens, min_len=5) == pytest.approx(-0.75)
    assert math.isnan(repeat_icl_score(loss, clean, min_len=5))
    with pytest.raises(ValueError, match="min_len must be >= 2"):
        repeat_positions(tokens, min_len=1)
