"""Tiny LLaVA and VipLLaVA models, an offline word-level tokenizer and a processor, for the vision-language tests."""

import copy
import functools

import torch
from transformers import (
    CLIPImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    VipLlavaConfig,
    VipLlavaForConditionalGeneration,
    VipLlavaModel,
)

import evit_hf
from evit_hf.vision_language_training import word_level_tokenizer

from .model_builders import TINY_CLIP_VISION


# The model classes (stock -> EViT) the tests of each vision-language family of evit_hf.FAMILIES build.
VISION_LANGUAGE_TESTERS = {
    "llava": {
        LlavaForConditionalGeneration: evit_hf.EViTLlavaForConditionalGeneration,
        LlavaModel: evit_hf.EViTLlavaModel,
    },
    "vipllava": {
        VipLlavaForConditionalGeneration: evit_hf.EViTVipLlavaForConditionalGeneration,
        VipLlavaModel: evit_hf.EViTVipLlavaModel,
    },
}
STOCK_CONFIGS = {"llava": LlavaConfig, "vipllava": VipLlavaConfig}

IMAGE_TOKEN = "<image>"
WORDS = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN, "USER:", "ASSISTANT:", "what", "digit", "is", "this", "?"]
WORDS += [str(digit) for digit in range(10)] + [f"w{index}" for index in range(20)]
IMAGE_TOKEN_ID = WORDS.index(IMAGE_TOKEN)
# A tower of 4 layers (reduction layers 1, 2, 3 by the depth rule), 64 patches of 4 px at 32 px.
TINY_LLAVA_VISION = dict(TINY_CLIP_VISION)
TINY_LLAMA = dict(
    model_type="llama",
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    vocab_size=len(WORDS),
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    initializer_range=0.2,
)


def tiny_llava_config(attn_implementation: str = "eager", **settings) -> LlavaConfig:
    config = LlavaConfig(
        vision_config=TINY_LLAVA_VISION,
        text_config=TINY_LLAMA,
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=64,
        **settings,
    )
    config._attn_implementation = attn_implementation
    return config


def tiny_vipllava_config(attn_implementation: str = "eager", **settings) -> VipLlavaConfig:
    # Feature layers: the outputs of layers 3 and 2 and of layer 0 (hidden states 4, 3 and 1).
    settings.setdefault("vision_feature_layer", [-1, -2, 1])
    config = VipLlavaConfig(
        vision_config=TINY_LLAVA_VISION, text_config=TINY_LLAMA, image_token_index=IMAGE_TOKEN_ID, **settings
    )
    config._attn_implementation = attn_implementation
    return config


@functools.cache
def _cached_stock(kind: str, attn_implementation: str, settings: tuple):
    torch.manual_seed(0)
    if kind == "llava":
        return LlavaForConditionalGeneration(tiny_llava_config(attn_implementation, **dict(settings))).eval()
    return VipLlavaForConditionalGeneration(tiny_vipllava_config(attn_implementation, **dict(settings))).eval()


def tiny_stock(kind: str = "llava", attn_implementation: str = "eager", **settings):
    """A tiny stock LLaVA (or VipLLaVA), random weights from seed 0, cached and deep-copied."""
    return copy.deepcopy(_cached_stock(kind, attn_implementation, tuple(sorted(settings.items()))))


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer of `WORDS` (split on spaces), built offline."""
    return word_level_tokenizer(WORDS, image_token=IMAGE_TOKEN)


def tiny_image_processor(size: int = 32) -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def tiny_stock_processor(config) -> LlavaProcessor:
    return LlavaProcessor(
        image_processor=tiny_image_processor(config.vision_config.image_size),
        tokenizer=tiny_tokenizer(),
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=getattr(config, "vision_feature_select_strategy", "default"),
    )


def save_stock_folder(folder, kind: str = "llava", **settings):
    """A saved tiny stock model with its (stock) processor; returns the model."""
    model = tiny_stock(kind, **settings)
    model.save_pretrained(folder)
    tiny_stock_processor(model.config).save_pretrained(folder)
    return model


def prompt_ids(num_image_tokens: int, batch: int = 2, text: int = 5, seed: int = 0) -> torch.Tensor:
    """Prompts of `num_image_tokens` placeholders then `text` random word tokens (not special, not the image)."""
    generator = torch.Generator().manual_seed(seed)
    words = torch.randint(5, len(WORDS), (batch, text), generator=generator)
    return torch.cat([torch.full((batch, num_image_tokens), IMAGE_TOKEN_ID), words], dim=1)


def tiny_pixels(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
