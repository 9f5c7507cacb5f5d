"""EViT LLaVA and VipLLaVA against the spec: image features in the spec's order and count, logits, keep 1 equal to
stock (logits and generate), placeholders from the processor, refusals, and the counts (tokens, MACs)."""

import copy
import itertools

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlavaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    SiglipVisionConfig,
)

import evit_hf
from evit_hf.token_reorganization import num_kept_tokens

from . import spec_reference
from .llava_builders import (
    IMAGE_TOKEN_ID,
    TINY_LLAMA,
    TINY_LLAVA_VISION,
    prompt_ids,
    tiny_pixels,
    tiny_stock,
)


# (reduction layers, keep rate): the defaults, per-layer rates, a reduction in the feature layer only (the tiny
# tower's feature layer -2 is the output of layer 2), one after it (changes nothing), and without fusion below.
SCHEDULES = {
    "default-0.7": (None, 0.7),
    "default-0.5": (None, 0.5),
    "per-layer": ([0, 1, 2], [0.9, 0.6, 0.4]),
    "feature-layer-only": ([2], 0.5),
    "after-feature-layer": ([3], 0.3),
}


def _evit_from(stock, kind="llava", **settings):
    evit_class = (
        evit_hf.EViTLlavaForConditionalGeneration
        if kind == "llava"
        else (evit_hf.EViTVipLlavaForConditionalGeneration)
    )
    evit = evit_hf.apply_evit(copy.deepcopy(stock), **settings)
    assert type(evit) is evit_class
    return evit


def _reference(stock, evit, pixel_values, keep_class_token):
    vision = evit.config.vision_config
    layers = vision.reduction_layers
    rates = vision.keep_rate if isinstance(vision.keep_rate, list) else [vision.keep_rate] * len(layers)
    return spec_reference.reference_llava_image_features(
        stock,
        pixel_values,
        dict(zip(layers, rates, strict=True)),
        vision.fuse_inattentive_tokens,
        evit.config.feature_hidden_states,
        keep_class_token,
    )


def _largest_difference(got, want) -> float:
    """The largest absolute difference relative to the features' scale (random tiny models give features of ~10)."""
    return max(float((a - b).abs().max() / b.abs().max().clamp(min=1)) for a, b in zip(got, want, strict=True))


# Every schedule with both strategies and both backends; the suite runs one case of each schedule (the reference
# takes seconds), --runslow all of them.
FAST_SPEC_CASES = {
    ("default-0.7", "default", "sdpa"),
    ("default-0.5", "default", "eager"),
    ("per-layer", "full", "sdpa"),
    ("feature-layer-only", "full", "eager"),
    ("after-feature-layer", "default", "sdpa"),
}
SPEC_CASES = [
    pytest.param(*case, id="-".join(case), marks=() if case in FAST_SPEC_CASES else pytest.mark.slow)
    for case in itertools.product(SCHEDULES, ["default", "full"], ["eager", "sdpa"])
]


@pytest.mark.parametrize("schedule, strategy, attn_implementation", SPEC_CASES)
def test_image_features_and_logits_equal_the_spec(schedule, strategy, attn_implementation):
    reduction_layers, keep_rate = SCHEDULES[schedule]
    stock = tiny_stock("llava", attn_implementation, vision_feature_select_strategy=strategy)
    evit = _evit_from(stock, keep_rate=keep_rate, reduction_layers=reduction_layers)
    pixel_values = tiny_pixels()
    with torch.no_grad():
        features = evit.get_image_features(pixel_values).pooler_output
        want = _reference(stock, evit, pixel_values, keep_class_token=strategy == "full")
        count = evit_hf.num_image_tokens(evit.config)
        assert [len(f) for f in features] == [len(f) for f in want] == [count, count]
        assert _largest_difference(features, want) < 1e-5
        input_ids = prompt_ids(count)
        logits = evit(input_ids=input_ids, pixel_values=pixel_values).logits
        want_logits = spec_reference.reference_llava_logits(stock, input_ids, want, IMAGE_TOKEN_ID)
    torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-4)


def test_features_are_kept_patches_in_raster_order_then_the_fused_token():
    # Features of the tower before the projector: a projector of identity maps shows the tokens themselves.
    stock = tiny_stock("llava")
    evit = _evit_from(stock, keep_rate=0.5, reduction_layers=[0])
    tower = evit.model.vision_tower
    with torch.no_grad():
        tower_out = tower(tiny_pixels(), output_hidden_states=True, num_layers=3)
        kept = tower_out.kept_token_indices[0]  # [batch, k], highest score first
        evit.model.multi_modal_projector = torch.nn.Identity()
        features = evit.get_image_features(tiny_pixels()).pooler_output
    hidden = tower_out.hidden_states[3]  # the feature layer: the output of layer 2
    for image, image_features in enumerate(features):
        order = kept[image].argsort()
        assert kept[image][order].tolist() == sorted(kept[image].tolist())
        assert torch.equal(image_features[:-1], hidden[image, 1:-1][order])
        assert torch.equal(image_features[-1], hidden[image, -1])  # the fused token last


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_keep_rate_1_gives_stock_logits_and_generate(attn_implementation):
    stock = tiny_stock("llava", attn_implementation)
    evit = _evit_from(stock, keep_rate=1.0)
    input_ids, pixel_values = prompt_ids(64), tiny_pixels()
    with torch.no_grad():
        assert torch.equal(
            evit(input_ids=input_ids, pixel_values=pixel_values).logits,
            stock(input_ids=input_ids, pixel_values=pixel_values).logits,
        )
    arguments = dict(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=4, do_sample=False)
    assert torch.equal(evit.generate(**arguments), stock.generate(**arguments))


def test_reduction_after_the_feature_layer_gives_stock_logits():
    stock = tiny_stock("llava")
    evit = _evit_from(stock, keep_rate=0.3, reduction_layers=[3])
    input_ids, pixel_values = prompt_ids(64), tiny_pixels()
    assert evit_hf.num_image_tokens(evit.config) == 64
    with torch.no_grad():
        assert torch.equal(
            evit(input_ids=input_ids, pixel_values=pixel_values).logits,
            stock(input_ids=input_ids, pixel_values=pixel_values).logits,
        )


def test_generate_reads_fewer_image_tokens():
    evit = _evit_from(tiny_stock("llava"), keep_rate=0.5)
    count = evit_hf.num_image_tokens(evit.config)
    input_ids = prompt_ids(count)
    output = evit.generate(input_ids=input_ids, pixel_values=tiny_pixels(), max_new_tokens=3, do_sample=False)
    assert output.shape == (2, input_ids.shape[1] + 3)


def test_layers_after_the_feature_layer_do_not_run():
    evit = _evit_from(tiny_stock("llava"), keep_rate=0.7)
    ran = []
    for index, layer in enumerate(evit.model.vision_tower.encoder.layers):
        layer.register_forward_hook(lambda module, args, output, index=index: ran.append(index))
    with torch.no_grad():
        evit.get_image_features(tiny_pixels())
    assert ran == [0, 1, 2]  # feature layer -2 of 4 layers: the output of layer 2


def test_a_wrong_number_of_placeholders_names_both_counts_and_the_keep_rate():
    evit = _evit_from(tiny_stock("llava"), keep_rate=0.5)
    count = evit_hf.num_image_tokens(evit.config)
    with pytest.raises(
        ValueError, match=rf"holds {2 * 64} image placeholder.*{2 * count} image features.*keep rate 0.5"
    ):
        evit(input_ids=prompt_ids(64), pixel_values=tiny_pixels())


@pytest.mark.parametrize("keep_rate, fuse", [(0.7, True), (0.5, False), ([0.9, 0.6, 0.4], True)])
@pytest.mark.parametrize("strategy", ["default", "full"])
def test_num_image_tokens_follows_the_spec(keep_rate, fuse, strategy):
    config = evit_hf.EViTLlavaConfig(
        vision_config=TINY_LLAVA_VISION,
        text_config=TINY_LLAMA,
        vision_feature_select_strategy=strategy,
        keep_rate=keep_rate,
        fuse_inattentive_tokens=fuse,
    )
    rates = keep_rate if isinstance(keep_rate, list) else [keep_rate] * 3
    candidates = 64
    for layer, rate in zip([1, 2, 3], rates, strict=True):
        if layer > 2:  # after the feature layer (the output of layer 2)
            break
        kept = num_kept_tokens(candidates, rate)
        candidates = kept + int(fuse) if kept < candidates else candidates
    assert evit_hf.num_image_tokens(config) == candidates + (strategy == "full")
    # 576 for LLaVA-1.5's tower at keep 1; a plain configuration counts as stock
    assert evit_hf.num_image_tokens(LlavaConfig()) == 576
    assert evit_hf.num_image_tokens(evit_hf.EViTLlavaConfig(keep_rate=1.0)) == 576


def test_keep_rate_for_image_tokens_is_the_largest_rate_within_the_budget():
    config = evit_hf.EViTLlavaConfig()
    rate = evit_hf.keep_rate_for_image_tokens(config, 288, image_size=448)
    assert evit_hf.num_image_tokens(config, 448, keep_rate=rate) <= 288
    assert evit_hf.num_image_tokens(config, 448, keep_rate=rate + 1 / 1024) > 288
    assert evit_hf.keep_rate_for_image_tokens(config, 576, image_size=336) == 1.0
    with pytest.raises(ValueError, match="fewest"):
        evit_hf.keep_rate_for_image_tokens(config, 1, image_size=336)


def test_resize_position_embeddings_works_on_the_llava_tower():
    evit = _evit_from(tiny_stock("llava"), keep_rate=0.7)
    reference = copy.deepcopy(evit)
    evit_hf.resize_position_embeddings(evit.model.vision_tower, 48)
    assert evit.config.vision_config.image_size == 48
    pixel_values = tiny_pixels(size=48)
    with torch.no_grad():
        resized = evit.get_image_features(pixel_values).pooler_output
        interpolated = reference.get_image_features(pixel_values, interpolate_pos_encoding=True).pooler_output
    assert len(resized[0]) == evit_hf.num_image_tokens(evit.config)
    assert _largest_difference(resized, interpolated) < 1e-5


# VipLLaVA: several feature layers, which must hold the same tokens.


@pytest.mark.parametrize(
    "reduction_layers, keep_rate, attn_implementation",
    [
        ([0], 0.5, "eager"),
        pytest.param([0], 0.5, "sdpa", marks=pytest.mark.slow),
        pytest.param([3], 0.4, "eager", marks=pytest.mark.slow),
        pytest.param([3], 0.4, "sdpa", marks=pytest.mark.slow),
        pytest.param([0, 3], [0.6, 0.5], "eager", marks=pytest.mark.slow),
        ([0, 3], [0.6, 0.5], "sdpa"),
    ],
)
def test_vipllava_features_and_logits_equal_the_spec(reduction_layers, keep_rate, attn_implementation):
    # Feature layers -2 and 1: the outputs of layers 2 and 0. Reductions at layer 0 (before both) and at layer 3 (after
    # both: it does not run) are allowed.
    stock = tiny_stock("vipllava", attn_implementation, vision_feature_layer=(-2, 1))
    evit = _evit_from(stock, "vipllava", keep_rate=keep_rate, reduction_layers=reduction_layers)
    pixel_values = tiny_pixels()
    with torch.no_grad():
        features = evit.get_image_features(pixel_values).pooler_output
        want = _reference(stock, evit, pixel_values, keep_class_token=False)
        assert _largest_difference(features, want) < 1e-5
        input_ids = prompt_ids(evit_hf.num_image_tokens(evit.config))
        logits = evit(input_ids=input_ids, pixel_values=pixel_values).logits
        want_logits = spec_reference.reference_llava_logits(stock, input_ids, want, IMAGE_TOKEN_ID)
    torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-4)


def test_vipllava_with_several_feature_layers_equals_the_spec():
    stock = tiny_stock("vipllava")  # feature layers: outputs of layers 3, 2, 0
    evit = _evit_from(stock, "vipllava", keep_rate=0.5, reduction_layers=[0])
    pixel_values = tiny_pixels()
    with torch.no_grad():
        features = evit.get_image_features(pixel_values).pooler_output
        want = _reference(stock, evit, pixel_values, keep_class_token=False)
    assert features.shape[1] == evit_hf.num_image_tokens(evit.config) == 33
    assert _largest_difference(features, want) < 1e-5


def test_vipllava_refuses_a_reduction_between_its_feature_layers():
    stock = tiny_stock("vipllava")
    with pytest.raises(ValueError, match=r"reduction layers \[2\] reorganize tokens between them"):
        evit_hf.apply_evit(copy.deepcopy(stock), keep_rate=0.5, reduction_layers=[2])
    evit = _evit_from(stock, "vipllava", keep_rate=0.5, reduction_layers=[0])
    evit.config.reduction_layers = [1]  # assigned after construction: refused at the forward
    with pytest.raises(ValueError, match=r"reduction layers \[1\]"):
        evit.get_image_features(tiny_pixels())


def test_vipllava_default_reduction_layers_fit_before_the_first_feature_layer():
    config = evit_hf.EViTVipLlavaConfig()  # VipLLaVA-7B: feature layers -2, -5, -8, -11, 6 of 24
    assert config.reduction_layers == [2, 3, 4]
    assert evit_hf.num_image_tokens(config) < 576


# Refusals


def test_llava_next_is_refused_with_the_reason():
    config = LlavaNextConfig(vision_config=TINY_LLAVA_VISION, text_config=TINY_LLAMA, image_grid_pinpoints=[[32, 32]])
    with pytest.raises(TypeError, match="whole patch grid"):
        evit_hf.apply_evit(LlavaNextForConditionalGeneration(config))


def test_a_siglip_tower_is_refused_with_the_reason():
    siglip = SiglipVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    with pytest.raises(ValueError, match="no class token"):
        evit_hf.EViTLlavaConfig(vision_config=siglip.to_dict(), text_config=TINY_LLAMA)
    with pytest.raises(ValueError, match="no class token"):
        evit_hf.EViTLlavaConfig(vision_config=siglip, text_config=TINY_LLAMA)
    evit_hf.EViTLlavaConfig(vision_config=CLIPVisionConfig(**TINY_LLAVA_VISION), text_config=TINY_LLAMA)


def test_image_sizes_are_refused():
    evit = _evit_from(tiny_stock("llava"), keep_rate=0.7)
    with pytest.raises(ValueError, match="image_sizes"):
        evit.model.get_image_features(tiny_pixels(), image_sizes=torch.tensor([[32, 32], [32, 32]]))


# MACs


def test_count_macs_is_tower_to_the_feature_layer_projector_and_prefill():
    config = evit_hf.EViTLlavaConfig(vision_config=TINY_LLAVA_VISION, text_config=TINY_LLAMA, keep_rate=1.0)
    vision, text = config.vision_config, config.text_config
    patches, dim = 64, vision.hidden_size
    tokens = patches + 1
    tower = patches * 3 * 16 * dim + 3 * (4 * tokens * dim * dim + 2 * tokens * tokens * dim + tokens * 2 * dim * 64)
    projector = 64 * (dim * text.hidden_size + text.hidden_size**2)
    prompt = 64 + 10
    head_dim = text.hidden_size // text.num_attention_heads
    per_layer = prompt * (2 * 32 * 32 + 2 * 32 * 2 * head_dim + 3 * 32 * 64) + 2 * prompt * prompt * 32
    language_model = text.num_hidden_layers * per_layer + 32 * text.vocab_size
    assert evit_hf.count_macs(config, prompt_length=10) == tower + projector + language_model
    # Fewer image tokens: fewer MACs; the default prompt is 32 text tokens.
    assert evit_hf.count_macs(config, keep_rate=0.5) < evit_hf.count_macs(config)
    assert evit_hf.count_macs(config, prompt_length=32) == evit_hf.count_macs(config)
    with pytest.raises(TypeError, match="prompt_length"):
        evit_hf.count_macs(evit_hf.EViTConfig(), prompt_length=3)


def test_the_family_records_name_the_models():
    families = evit_hf.families.FAMILIES_BY_NAME
    assert families["llava"].models[evit_hf.families.LlavaForConditionalGeneration] is (
        evit_hf.EViTLlavaForConditionalGeneration
    )
    assert evit_hf.families.family_for_model_type("vipllava").name == "vipllava"


# The ordering math on hand-made tensors


def test_raster_order_puts_patches_in_ascending_index_then_fused_tokens_in_tower_order():
    from evit_hf.token_reorganization import raster_order

    positions = torch.tensor([[7, -1, 2, 9, -1, 0], [3, 1, 2, 0, 5, 4]])
    order = raster_order(positions)
    assert order.tolist() == [[5, 2, 0, 3, 1, 4], [3, 1, 2, 0, 5, 4]]
    assert positions.gather(1, order).tolist() == [[0, 2, 7, 9, -1, -1], [0, 1, 2, 3, 4, 5]]
    assert raster_order(torch.tensor([[-1, -1]])).tolist() == [[0, 1]]


def test_candidate_positions_follow_the_last_reduction_layer():
    from evit_hf.token_reorganization import candidate_positions

    kept = torch.tensor([[4, -1, 0], [2, 3, 1]])
    assert candidate_positions(None, 4, 2).tolist() == [[0, 1, 2, 3]] * 2
    assert torch.equal(candidate_positions(kept, 3, 2), kept)  # no fused token appended (or none made)
    assert candidate_positions(kept, 4, 2).tolist() == [[4, -1, 0, -1], [2, 3, 1, -1]]
    with pytest.raises(ValueError, match="5 candidate tokens"):
        candidate_positions(kept, 5, 2)


def test_the_embeddings_as_feature_layer_are_not_reduced():
    # vision_feature_layer 0 reads the embeddings after pre_layrnorm: a reduction in layer 0 comes after them.
    stock = tiny_stock("llava", vision_feature_layer=0)
    evit = _evit_from(stock, keep_rate=0.5, reduction_layers=[0, 2])
    assert evit_hf.num_image_tokens(evit.config) == 64
    pixel_values = tiny_pixels()
    with torch.no_grad():
        got = evit.get_image_features(pixel_values).pooler_output
        # (transformers' own get_image_features captures no hidden state for index 0, which is falsy)
        embeddings = stock.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[0]
        want = stock.model.multi_modal_projector(embeddings[:, 1:])
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
