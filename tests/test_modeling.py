import math

import pytest
import torch
from transformers import DeiTConfig, DeiTModel, ViTConfig, ViTModel

import evit_hf
from evit_hf.token_reorganization import num_kept_tokens

from .model_builders import DEIT_SMALL, FAMILIES, TINY, main_output, stock_and_evit
from .spec_reference import reference_forward


NUM_PATCHES = (TINY["image_size"] // TINY["patch_size"]) ** 2


def reference_main_output(stock, evit, pixel_values, keep_rate, fuse, prefix):
    finals, kept = reference_forward(
        stock, pixel_values, keep_rate, evit.config.reduction_layers, fuse, num_prefix_tokens=prefix
    )
    if hasattr(stock, "cls_classifier"):  # DeiT with teacher: both heads, averaged
        logits = [(stock.cls_classifier(x[0]) + stock.distillation_classifier(x[1])) / 2 for x in finals]
        return torch.stack(logits), kept
    if hasattr(stock, "classifier"):
        return torch.stack([stock.classifier(x[0]) for x in finals]), kept
    return torch.stack(finals), kept


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "dropped"])
@pytest.mark.parametrize("keep_rate", [0.7, 0.5, 0.25])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_forward_matches_the_spec(family, fuse, keep_rate, attn_implementation, pixel_values):
    stock, evit = stock_and_evit(
        family, keep_rate=keep_rate, fuse_inattentive_tokens=fuse, attn_implementation=attn_implementation
    )
    prefix = FAMILIES[family][2]
    with torch.no_grad():
        output = evit(pixel_values)
        expected, expected_kept = reference_main_output(stock, evit, pixel_values, keep_rate, fuse, prefix)
    torch.testing.assert_close(main_output(output), expected, atol=2e-5, rtol=1e-4)
    assert len(output.kept_token_indices) == len(evit.config.reduction_layers)
    for layer, kept in enumerate(output.kept_token_indices):
        assert kept.dtype == torch.long
        assert kept.tolist() == [per_image[layer] for per_image in expected_kept]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_keep_rate_one_is_the_stock_model(family, attn_implementation, pixel_values):
    stock, evit = stock_and_evit(family, attn_implementation=attn_implementation)
    _, without_layers = stock_and_evit(
        family, attn_implementation=attn_implementation, keep_rate=0.5, reduction_layers=[]
    )
    with torch.no_grad():
        expected = main_output(stock(pixel_values))
        assert torch.equal(main_output(evit(pixel_values, keep_rate=1.0)), expected)
        assert torch.equal(main_output(without_layers(pixel_values)), expected)
        assert not torch.equal(main_output(evit(pixel_values)), expected)  # keep 0.7 does change something


def test_keep_rate_per_call_uses_the_same_weights(pixel_values):
    _, evit = stock_and_evit("vit-classifier")
    with torch.no_grad():
        default = evit(pixel_values, output_hidden_states=True)
        half = evit(pixel_values, keep_rate=0.5, output_hidden_states=True)
        again = evit(pixel_values)
    assert evit.config.keep_rate == 0.7
    assert [k.shape[1] for k in default.kept_token_indices] == [45, 33, 24]
    assert [k.shape[1] for k in half.kept_token_indices] == [32, 17, 9]
    assert half.hidden_states[-1].shape[1] < default.hidden_states[-1].shape[1]
    torch.testing.assert_close(again.logits, default.logits)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "dropped"])
def test_kept_token_indices_follow_patches(fuse, pixel_values):
    _, evit = stock_and_evit("deit-teacher", keep_rate=0.5, fuse_inattentive_tokens=fuse)
    with torch.no_grad():
        kept = evit(pixel_values).kept_token_indices
    assert all(indices.shape[0] == pixel_values.shape[0] for indices in kept)
    for image in range(pixel_values.shape[0]):
        alive = set(range(NUM_PATCHES))  # patches whose token still exists on its own
        for layer, indices in enumerate(kept):
            row = indices[image].tolist()
            patches = [i for i in row if i != -1]
            assert len(set(patches)) == len(patches)
            assert set(patches) <= alive  # a token that was fused or dropped never comes back
            assert row.count(-1) <= (1 if fuse and layer > 0 else 0)
            alive = set(patches)


@pytest.mark.parametrize("family", ["vit-classifier", "deit-teacher"])
def test_attention_backends_agree(family, pixel_values):
    outputs = {}
    for implementation in ("eager", "sdpa", "flex_attention"):
        _, evit = stock_and_evit(family, attn_implementation=implementation)
        try:
            with torch.no_grad():
                outputs[implementation] = evit(pixel_values)
        except (NotImplementedError, RuntimeError) as error:  # flex attention needs a recent torch on CPU
            if implementation == "flex_attention":
                pytest.skip(f"flex attention unavailable here: {error}")
            raise
    for implementation in ("sdpa", "flex_attention"):
        if implementation in outputs:
            torch.testing.assert_close(outputs[implementation].logits, outputs["eager"].logits, atol=1e-5, rtol=1e-5)
            for a, b in zip(
                outputs[implementation].kept_token_indices, outputs["eager"].kept_token_indices, strict=True
            ):
                assert torch.equal(a, b)


@pytest.mark.parametrize("attn_implementation, builds_full_matrix", [("sdpa", False), ("eager", True)])
def test_sdpa_reduction_layers_never_build_the_full_attention_matrix(
    attn_implementation, builds_full_matrix, pixel_values, monkeypatch
):
    _, evit = stock_and_evit("vit-classifier", attn_implementation=attn_implementation)
    product_shapes = []
    original_matmul = torch.matmul

    def recording_matmul(a, b, *args, **kwargs):
        result = original_matmul(a, b, *args, **kwargs)
        product_shapes.append(tuple(result.shape))
        return result

    monkeypatch.setattr(torch, "matmul", recording_matmul)
    with torch.no_grad():
        evit(pixel_values)
    square = [shape for shape in product_shapes if len(shape) == 4 and shape[-1] == shape[-2] and shape[-1] > 1]
    assert bool(square) == builds_full_matrix
    if not builds_full_matrix:  # the class-token rows, one per reduction layer
        assert [shape[2] for shape in product_shapes] == [1] * len(evit.config.reduction_layers)


def test_hidden_states_and_attentions_shrink(pixel_values):
    _, evit = stock_and_evit("deit-classifier", attn_implementation="eager")
    with torch.no_grad():
        output = evit(pixel_values, output_hidden_states=True, output_attentions=True)
    # 2 prefix tokens + 64 patches; reduction layers 1, 2, 3 keep 45, 33, 24 candidates + 1 fused token
    assert [h.shape[1] for h in output.hidden_states] == [66, 66, 48, 36, 27]
    assert [a.shape[-1] for a in output.attentions] == [66, 66, 48, 36]
    assert all(a.shape[-2] == a.shape[-1] for a in output.attentions)


def test_sdpa_returns_no_attentions_like_the_stock_model(pixel_values):
    stock, evit = stock_and_evit("vit-classifier", attn_implementation="sdpa")
    with torch.no_grad():
        assert (
            evit(pixel_values, output_attentions=True).attentions
            == stock(pixel_values, output_attentions=True).attentions
        )
    assert evit.config._attn_implementation == "sdpa"


def test_return_dict_false_gives_a_tuple(pixel_values):
    _, evit = stock_and_evit("vit-classifier")
    with torch.no_grad():
        output = evit(pixel_values, return_dict=False)
    assert isinstance(output, tuple)
    torch.testing.assert_close(output[0], evit(pixel_values).logits)


@pytest.mark.parametrize("family", ["vit-classifier", "deit-teacher"])
def test_interpolate_pos_encoding_at_higher_resolution(family):
    stock, evit = stock_and_evit(family)
    pixel_values = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(3))  # 12 x 12 = 144 patches
    with torch.no_grad():
        output = evit(pixel_values, interpolate_pos_encoding=True)
        expected, expected_kept = reference_main_output(stock, evit, pixel_values, 0.7, True, FAMILIES[family][2])
        stock_logits = stock(pixel_values, interpolate_pos_encoding=True).logits
        evit_full = evit(pixel_values, interpolate_pos_encoding=True, keep_rate=1.0).logits
    assert output.kept_token_indices[0].shape[1] == num_kept_tokens(144, 0.7)
    assert int(output.kept_token_indices[0].max()) < 144
    torch.testing.assert_close(output.logits, expected, atol=2e-5, rtol=1e-4)
    assert torch.equal(evit_full, stock_logits)


def test_invalid_calls_raise_clear_errors(pixel_values):
    _, evit = stock_and_evit("vit-classifier")
    with pytest.raises(ValueError, match=r"keep_rate must be in \(0, 1\]"):
        evit(pixel_values, keep_rate=0.0)
    with pytest.raises(ValueError, match="keep_rate=1.0"):
        evit(pixel_values, attention_mask=torch.ones(3, NUM_PATCHES + 1))


def token_mask(prefix):
    """An attention mask over prefix + 64 patch tokens: image 0 masks patches 5-19, image 2 patches 40-63."""
    mask = torch.ones(3, prefix + NUM_PATCHES, dtype=torch.long)
    mask[0, prefix + 5 : prefix + 20] = 0
    mask[2, prefix + 40 :] = 0
    return mask


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_attention_mask_at_keep_rate_one_is_the_stock_models(family, attn_implementation, pixel_values):
    stock, evit = stock_and_evit(family, attn_implementation=attn_implementation)
    mask = token_mask(FAMILIES[family][2])
    with torch.no_grad():
        expected = main_output(stock(pixel_values, attention_mask=mask))
        output = evit(pixel_values, attention_mask=mask, keep_rate=1.0)
        unmasked = main_output(stock(pixel_values))
    assert torch.equal(main_output(output), expected)
    assert not torch.equal(expected[0], unmasked[0]) and not torch.equal(expected[2], unmasked[2])  # it masks
    torch.testing.assert_close(expected[1], unmasked[1])  # image 1 masks nothing
    assert all(k.tolist() == [list(range(NUM_PATCHES))] * 3 for k in output.kept_token_indices)


@pytest.mark.parametrize("family", ["vit-classifier", "deit-teacher"])
@pytest.mark.parametrize(
    "settings, call",
    [({}, {"keep_rate": 0.5}), ({"keep_rate": 0.5}, {}), ({"keep_rate": 0.5}, {"keep_rate": 0.9})],
    ids=["keep-rate-of-the-call", "keep-rate-of-the-config", "both"],
)
def test_attention_mask_with_token_reduction_raises(family, settings, call, pixel_values):
    _, evit = stock_and_evit(family, **settings)
    mask = token_mask(FAMILIES[family][2])
    with pytest.raises(ValueError, match="attention_mask cannot be combined with token reduction.*keep_rate=1.0"):
        evit(pixel_values, attention_mask=mask, **call)


def masked_image_models(family, attn_implementation="sdpa", **evit_settings):
    """Stock and EViT base models built with a mask token, same weights; the mask token and the position embeddings
    are random, not the zeros they start as."""
    is_deit = family.startswith("deit")
    stock_class, evit_class = (DeiTModel, evit_hf.EViTDeiTModel) if is_deit else (ViTModel, evit_hf.EViTModel)
    config_class, evit_config_class = (
        (DeiTConfig, evit_hf.EViTDeiTConfig) if is_deit else (ViTConfig, evit_hf.EViTConfig)
    )
    torch.manual_seed(0)
    stock = stock_class(config_class(**TINY, attn_implementation=attn_implementation), use_mask_token=True).eval()
    with torch.no_grad():
        stock.embeddings.mask_token.normal_()
        # DeiT starts with zero position embeddings: masked patches would be identical tokens with tied scores.
        stock.embeddings.position_embeddings.normal_(std=0.2)
    evit_config = evit_config_class(**TINY, **evit_settings, attn_implementation=attn_implementation)
    evit = evit_class(evit_config, use_mask_token=True).eval()
    evit.load_state_dict(stock.state_dict())
    return stock, evit


def masked_patches():
    generator = torch.Generator().manual_seed(6)
    return torch.rand(3, NUM_PATCHES, generator=generator) < 0.4


@pytest.mark.parametrize("family, prefix", [("vit-base", 1), ("deit-base", 2)], ids=["vit", "deit"])
def test_bool_masked_pos_at_keep_rate_one_is_the_stock_models(family, prefix, pixel_values):
    stock, evit = masked_image_models(family)
    bool_masked_pos = masked_patches()
    with torch.no_grad():
        expected = stock(pixel_values, bool_masked_pos=bool_masked_pos).last_hidden_state
        output = evit(pixel_values, bool_masked_pos=bool_masked_pos, keep_rate=1.0).last_hidden_state
        unmasked = stock(pixel_values).last_hidden_state
    assert torch.equal(output, expected)
    assert not torch.equal(expected, unmasked)  # the mask token is used


@pytest.mark.parametrize("family, prefix", [("vit-base", 1), ("deit-base", 2)], ids=["vit", "deit"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "dropped"])
def test_bool_masked_pos_with_token_reduction_matches_the_spec(family, prefix, fuse, pixel_values):
    stock, evit = masked_image_models(family, keep_rate=0.5, fuse_inattentive_tokens=fuse)
    bool_masked_pos = masked_patches()
    with torch.no_grad():
        output = evit(pixel_values, bool_masked_pos=bool_masked_pos)
        finals, kept = reference_forward(
            stock, pixel_values, 0.5, evit.config.reduction_layers, fuse, prefix, bool_masked_pos=bool_masked_pos
        )
    torch.testing.assert_close(output.last_hidden_state, torch.stack(finals), atol=2e-5, rtol=1e-4)
    for layer, indices in enumerate(output.kept_token_indices):
        assert indices.tolist() == [per_image[layer] for per_image in kept]


# DeiT-S shapes: the spec's token counts after each reduction layer.
@pytest.fixture(scope="module")
def deit_small_models():
    torch.manual_seed(0)
    vit = evit_hf.EViTForImageClassification(evit_hf.EViTConfig(**DEIT_SMALL)).eval()
    deit = evit_hf.EViTDeiTForImageClassificationWithTeacher(evit_hf.EViTDeiTConfig(**DEIT_SMALL)).eval()
    return {"vit": vit, "distilled-deit": deit}


@pytest.mark.parametrize(
    "keep_rate, fuse, candidates_after",
    [(0.7, True, [139, 99, 71]), (0.7, False, [138, 97, 68]), (0.5, False, [98, 49, 25]), (0.5, True, [99, 51, 27])],
    ids=["0.7-fused", "0.7-dropped", "0.5-dropped", "0.5-fused"],
)
@pytest.mark.parametrize("kind, prefix", [("vit", 1), ("distilled-deit", 2)])
def test_deit_small_token_counts(deit_small_models, kind, prefix, keep_rate, fuse, candidates_after):
    model = deit_small_models[kind]
    model.config.fuse_inattentive_tokens = fuse
    assert model.config.reduction_layers == [3, 6, 9]
    with torch.no_grad():
        output = model(torch.randn(1, 3, 224, 224), keep_rate=keep_rate, output_hidden_states=True)
    counts = [h.shape[1] for h in output.hidden_states]
    assert counts[:4] == [prefix + 196] * 4
    assert [counts[layer + 1] for layer in (3, 6, 9)] == [prefix + c for c in candidates_after]
    assert counts[-1] == prefix + candidates_after[-1]
    assert [k.shape[1] for k in output.kept_token_indices] == [c - int(fuse) for c in candidates_after]
    assert math.isfinite(float(output.logits.sum()))
