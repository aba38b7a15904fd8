import pytest
import torch

from tl_devinterp.models import (
    ModelConfig,
    build_model,
    check_model,
    clone_model,
    head_masks,
    head_weights,
    tl_parameter_names,
    token_cross_entropy,
)

CONFIGS = [
    ModelConfig(n_layers=2, n_heads=4, d_model=32, n_ctx=16, d_vocab=50, attn_only=True, normalization_type="LN"),
    ModelConfig(n_layers=1, n_heads=2, d_model=16, d_head=4, n_ctx=8, d_vocab=20, attn_only=False,
                normalization_type=None),
]


def hooked_transformer(cfg: ModelConfig):
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:
        pytest.skip("this TransformerLens has no HookedTransformer (4.x)")
    return HookedTransformer(HookedTransformerConfig(**cfg.tl_kwargs()))


def models_for(cfg):
    yield build_model(cfg)
    try:
        yield hooked_transformer(cfg)
    except pytest.skip.Exception:
        pass


@pytest.mark.parametrize("cfg", CONFIGS)
def test_head_weights_are_the_models_own_per_head_views(cfg):
    for model in models_for(cfg):
        for layer in range(cfg.n_layers):
            for head in range(cfg.n_heads):
                w = head_weights(model, layer, head)
                assert set(w) == {"W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V"}
                for label in ("W_Q", "W_K", "W_V", "W_O"):
                    assert torch.equal(w[label], getattr(model, label)[layer, head]), (type(model), label)
                for label in ("b_Q", "b_K", "b_V"):
                    assert torch.equal(w[label], getattr(model, label)[layer, head])


def test_head_masks_cover_exactly_one_heads_parameters():
    cfg = CONFIGS[0]
    model = build_model(cfg)
    masks = head_masks(model, 1, 2)
    per_head = 4 * cfg.d_model * cfg.d_head + 3 * cfg.d_head  # W_Q,K,V,O + b_Q,K,V; b_O belongs to no head
    assert sum(int(m.sum()) for m in masks.values()) == per_head
    # Perturbing the masked coordinates changes head 2's views and no other head's.
    params = dict(model.named_parameters())
    before = {h: {k: v.clone() for k, v in head_weights(model, 1, h).items()} for h in range(cfg.n_heads)}
    with torch.no_grad():
        for name, m in masks.items():
            params[name][m] += 1.0
    for h in range(cfg.n_heads):
        after = head_weights(model, 1, h)
        changed = [k for k in after if not torch.equal(after[k], before[h][k])]
        assert changed == ([] if h != 2 else list(after)), (h, changed)


def test_head_masks_reject_missing_heads():
    model = build_model(CONFIGS[0])
    with pytest.raises(ValueError, match="does not exist"):
        head_masks(model, 2, 0)
    with pytest.raises(ValueError, match="does not exist"):
        head_masks(model, 0, 4)


def test_tl_names_map_to_own_parameters():
    model = build_model(CONFIGS[0])
    names = tl_parameter_names(model)
    own = dict(model.named_parameters())
    assert set(names.values()) == set(own)
    assert own[names["blocks.1.attn.q.weight"]] is model.blocks[1].attn.q.weight
    assert names["embed.weight"] in own and names["unembed.weight"] in own


def test_clone_is_equal_and_independent_even_after_a_forward_pass():
    model = build_model(CONFIGS[0])
    x = torch.randint(1, 50, (2, 16))
    model(x)  # a bridge cannot be deep-copied after this
    copy = clone_model(model)
    assert torch.allclose(copy(x), model(x))
    with torch.no_grad():
        next(copy.parameters()).add_(1.0)
    assert not torch.allclose(copy(x), model(x))


def test_token_cross_entropy_matches_transformer_lens_loss():
    model = build_model(CONFIGS[0])
    x = torch.randint(1, 50, (3, 16))
    ce = token_cross_entropy(model(x), x)
    assert ce.shape == (3, 15)
    assert torch.allclose(ce.mean(), model(x, return_type="loss"), atol=1e-6)


def test_config_validation_and_model_check():
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match=r"Unknown option\(s\) .* of ModelConfig"):
        ModelConfig.from_dict({"d_modle": 3})
    with pytest.raises(TypeError, match="TransformerLens model"):
        check_model(torch.nn.Linear(2, 2))
    assert ModelConfig.from_dict(CONFIGS[1].to_dict()) == CONFIGS[1]


def test_a_restrictions_label_is_the_same_for_a_list_and_a_tuple_of_specs():
    """The label seeds the chains' noise: the same restriction written as a tuple or a list samples alike."""
    from tl_devinterp.sampling.restrict import restriction_label

    assert restriction_label(("l0h0", "l1h1")) == restriction_label(["l0h0", "l1h1"]) == "l0h0+l1h1"
    assert restriction_label((1, 3)) == "l1h3"  # a tuple of two ints is one head
