"""The MACs and image-token counts of vision-language models (LLaVA) at non-square and tuple image sizes."""

import pytest

import evit_hf

from .llava_builders import TINY_LLAMA, TINY_LLAVA_VISION


NON_SQUARE = {"32x48": (32, 48), "48x32": (48, 32), "list-32x48": [32, 48]}


@pytest.mark.parametrize("image_size", NON_SQUARE.values(), ids=NON_SQUARE.keys())
def test_a_non_square_image_counts_its_own_patch_grid(image_size):
    # 32 x 48 px in patches of 4: 8 x 12 = 96 patches; the "default" strategy passes the patches, not the class token.
    # The same count by hand as the square test in test_llava.py: three tower layers run up to the feature layer.
    config = evit_hf.EViTLlavaConfig(vision_config=TINY_LLAVA_VISION, text_config=TINY_LLAMA, keep_rate=1.0)
    vision, text = config.vision_config, config.text_config
    patches, dim = (image_size[0] // 4) * (image_size[1] // 4), vision.hidden_size
    assert patches == 96
    tokens = patches + 1
    tower = patches * 3 * 16 * dim + 3 * (4 * tokens * dim * dim + 2 * tokens * tokens * dim + tokens * 2 * dim * 64)
    projector = patches * (dim * text.hidden_size + text.hidden_size**2)
    prompt = patches + 10
    head_dim = text.hidden_size // text.num_attention_heads
    per_layer = prompt * (2 * 32 * 32 + 2 * 32 * 2 * head_dim + 3 * 32 * 64) + 2 * prompt * prompt * 32
    language_model = text.num_hidden_layers * per_layer + 32 * text.vocab_size
    assert evit_hf.num_image_tokens(config, image_size) == patches
    assert evit_hf.count_macs(config, image_size=image_size, prompt_length=10) == tower + projector + language_model


@pytest.mark.parametrize("keep_rate", [1.0, 0.5])
def test_height_and_width_count_alike_and_between_the_squares(keep_rate):
    config = evit_hf.EViTLlavaConfig(vision_config=TINY_LLAVA_VISION, text_config=TINY_LLAMA, keep_rate=keep_rate)
    tall, wide = (evit_hf.num_image_tokens(config, size) for size in ((48, 32), (32, 48)))
    assert tall == wide
    assert evit_hf.num_image_tokens(config, 32) < wide < evit_hf.num_image_tokens(config, 48)
    macs = [evit_hf.count_macs(config, image_size=size) for size in (32, (32, 48), (48, 32), 48)]
    assert macs[0] < macs[1] == macs[2] < macs[3]
