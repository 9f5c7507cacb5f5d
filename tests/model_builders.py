"""Tiny shapes, builders and the testers of every model family, shared by the tests.

`TESTERS` holds one tester per model class that EViT converts (its id, such as `vit-classifier` or
`dinov3-registers`, is a builder name below); `FAMILY_TESTERS` groups their ids by the family of `evit_hf.FAMILIES`.
"""

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import (
    AutoModel,
    AutoModelForImageClassification,
    CLIPConfig,
    CLIPForImageClassification,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    Dinov2WithRegistersModel,
    DINOv3ViTConfig,
    DINOv3ViTModel,
    MetaClip2Config,
    MetaClip2ForImageClassification,
    MetaClip2Model,
    MetaClip2VisionConfig,
    MetaClip2VisionModel,
    MetaClip2VisionModelWithProjection,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

import evit_hf

from . import spec_reference


# Tiny shapes: 8 x 8 = 64 patches, 4 layers (reduction layers 1, 2, 3 by the depth rule), 2 heads.
TINY = dict(
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=32,
    patch_size=4,
    num_labels=5,
    # Larger than the default 0.02 so that random attention is peaked and class-attention scores are far from ties.
    initializer_range=0.2,
)
# Two layers, 4 px patches, 16 px images: 4 x 4 = 16 patches, reduction layers 0 and 1 by the depth rule.
TWO_LAYERS = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=4
)
# DeiT-S: 224 px, patch 16, 196 patches, dim 384, 12 layers, 6 heads.
DEIT_SMALL = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    intermediate_size=1536,
    image_size=224,
    patch_size=16,
    num_labels=10,
    layer_norm_eps=1e-6,
)

# (stock class, EViT class, prefix tokens) for every family and head.
FAMILIES = {
    "vit-base": (ViTModel, evit_hf.EViTModel, 1),
    "vit-classifier": (ViTForImageClassification, evit_hf.EViTForImageClassification, 1),
    "deit-base": (DeiTModel, evit_hf.EViTDeiTModel, 2),
    "deit-classifier": (DeiTForImageClassification, evit_hf.EViTDeiTForImageClassification, 2),
    "deit-teacher": (DeiTForImageClassificationWithTeacher, evit_hf.EViTDeiTForImageClassificationWithTeacher, 2),
}


def stock_config(family: str, **overrides):
    config_class = DeiTConfig if family.startswith("deit") else ViTConfig
    return config_class(**{**TINY, **overrides})


def evit_config(family: str, **overrides):
    config_class = evit_hf.EViTDeiTConfig if family.startswith("deit") else evit_hf.EViTConfig
    return config_class(**{**TINY, **overrides})


def stock_and_evit(family: str, seed: int = 0, attn_implementation: str = "sdpa", shape=None, **evit_settings):
    """A random stock model and an EViT model of the same family with the same weights, both in eval mode."""
    stock_class, evit_class, _ = FAMILIES[family]
    shape = shape or TINY
    torch.manual_seed(seed)
    config_class = DeiTConfig if family.startswith("deit") else ViTConfig
    stock = stock_class(config_class(**shape, attn_implementation=attn_implementation)).eval()
    evit_config_class = evit_hf.EViTDeiTConfig if family.startswith("deit") else evit_hf.EViTConfig
    evit = evit_class(evit_config_class(**shape, **evit_settings, attn_implementation=attn_implementation)).eval()
    evit.load_state_dict(stock.state_dict())
    return stock, evit


def main_output(output):
    """Logits of a classifier, last hidden state of a base model."""
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


# CLIP and DINOv2 with the tiny tower above (64 patches, 4 layers, reduction layers 1, 2, 3, 2 heads).
TINY_TOWER = {key: TINY[key] for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size")}
TINY_TOWER["patch_size"] = TINY["patch_size"]
# CLIP initializes the attention projections with std ~ dim^-0.5 (2 L)^-0.5: a larger factor makes random attention
# peaked, so that class-attention scores are far from ties.
TINY_CLIP_VISION = dict(TINY_TOWER, intermediate_size=64, projection_dim=16, initializer_factor=4.0)
TINY_CLIP_TEXT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    vocab_size=100,
    max_position_embeddings=16,
    projection_dim=16,
    bos_token_id=98,
    eos_token_id=99,
    pad_token_id=1,
)
# DINOv2's MLP is mlp_ratio (4) x hidden. A layer scale other than 1 makes a forgotten `layer_scale1` visible.
TINY_DINOV2 = dict(TINY_TOWER, initializer_range=0.2, layerscale_value=0.5, num_labels=5)
TINY_DINOV2_REGISTERS = dict(TINY_DINOV2, num_register_tokens=3)
# DINOv3 ViT: rotary position embeddings, a plain MLP of intermediate_size, registers in front of the patches.
TINY_DINOV3 = dict(TINY_TOWER, intermediate_size=64, initializer_range=0.2, layerscale_value=0.5)
TINY_DINOV3_REGISTERS = dict(TINY_DINOV3, num_register_tokens=4)

# family: (stock class, EViT class, stock config class, EViT config class, configuration keyword arguments, prefix)
ENCODER_FAMILIES = {
    "clip-vision": (
        CLIPVisionModel,
        evit_hf.EViTCLIPVisionModel,
        CLIPVisionConfig,
        evit_hf.EViTCLIPVisionConfig,
        TINY_CLIP_VISION,
        1,
    ),
    "clip-vision-projection": (
        CLIPVisionModelWithProjection,
        evit_hf.EViTCLIPVisionModelWithProjection,
        CLIPVisionConfig,
        evit_hf.EViTCLIPVisionConfig,
        TINY_CLIP_VISION,
        1,
    ),
    "clip": (
        CLIPModel,
        evit_hf.EViTCLIPModel,
        CLIPConfig,
        evit_hf.EViTCLIPConfig,
        dict(vision_config=TINY_CLIP_VISION, text_config=TINY_CLIP_TEXT, projection_dim=16),
        1,
    ),
    "clip-classifier": (
        CLIPForImageClassification,
        evit_hf.EViTCLIPForImageClassification,
        CLIPConfig,
        evit_hf.EViTCLIPConfig,
        dict(vision_config=TINY_CLIP_VISION, text_config=TINY_CLIP_TEXT, num_labels=5),
        1,
    ),
    # MetaCLIP 2's vision tower is CLIP's; its text tower reads the same tiny settings.
    "metaclip-2-vision": (
        MetaClip2VisionModel,
        evit_hf.EViTMetaClip2VisionModel,
        MetaClip2VisionConfig,
        evit_hf.EViTMetaClip2VisionConfig,
        TINY_CLIP_VISION,
        1,
    ),
    "metaclip-2-vision-projection": (
        MetaClip2VisionModelWithProjection,
        evit_hf.EViTMetaClip2VisionModelWithProjection,
        MetaClip2VisionConfig,
        evit_hf.EViTMetaClip2VisionConfig,
        TINY_CLIP_VISION,
        1,
    ),
    "metaclip-2": (
        MetaClip2Model,
        evit_hf.EViTMetaClip2Model,
        MetaClip2Config,
        evit_hf.EViTMetaClip2Config,
        dict(vision_config=TINY_CLIP_VISION, text_config=TINY_CLIP_TEXT, projection_dim=16),
        1,
    ),
    "metaclip-2-classifier": (
        MetaClip2ForImageClassification,
        evit_hf.EViTMetaClip2ForImageClassification,
        MetaClip2Config,
        evit_hf.EViTMetaClip2Config,
        dict(vision_config=TINY_CLIP_VISION, text_config=TINY_CLIP_TEXT, num_labels=5),
        1,
    ),
    "dinov3": (
        DINOv3ViTModel,
        evit_hf.EViTDINOv3ViTModel,
        DINOv3ViTConfig,
        evit_hf.EViTDINOv3ViTConfig,
        TINY_DINOV3,
        1,
    ),
    "dinov3-registers": (
        DINOv3ViTModel,
        evit_hf.EViTDINOv3ViTModel,
        DINOv3ViTConfig,
        evit_hf.EViTDINOv3ViTConfig,
        TINY_DINOV3_REGISTERS,
        5,
    ),
    "dinov2-base": (Dinov2Model, evit_hf.EViTDinov2Model, Dinov2Config, evit_hf.EViTDinov2Config, TINY_DINOV2, 1),
    "dinov2-classifier": (
        Dinov2ForImageClassification,
        evit_hf.EViTDinov2ForImageClassification,
        Dinov2Config,
        evit_hf.EViTDinov2Config,
        TINY_DINOV2,
        1,
    ),
    "dinov2-registers-base": (
        Dinov2WithRegistersModel,
        evit_hf.EViTDinov2WithRegistersModel,
        Dinov2WithRegistersConfig,
        evit_hf.EViTDinov2WithRegistersConfig,
        TINY_DINOV2_REGISTERS,
        4,
    ),
    "dinov2-registers-classifier": (
        Dinov2WithRegistersForImageClassification,
        evit_hf.EViTDinov2WithRegistersForImageClassification,
        Dinov2WithRegistersConfig,
        evit_hf.EViTDinov2WithRegistersConfig,
        TINY_DINOV2_REGISTERS,
        4,
    ),
}


# MetaCLIP 2's vision tower and projection run CLIP's code (the same mixins on classes of the same layout). The
# modeling suite (tests/test_modeling.py) runs every tester, these two included; this selection stays for tests that
# pick the encoder builders whose code differs.
RUN_BY_CLIPS_TESTS = ("metaclip-2-vision", "metaclip-2-vision-projection")
SPEC_TESTED_ENCODERS = [family for family in ENCODER_FAMILIES if family not in RUN_BY_CLIPS_TESTS]


def encoder_stock_model(family: str, seed: int = 0, attn_implementation: str = "sdpa"):
    """A random stock CLIP/DINOv2 model of `family` in eval mode. Registers start at zero: they get random values, so
    that they are tokens of their own."""
    stock_class, _, config_class, _, settings, _ = ENCODER_FAMILIES[family]
    torch.manual_seed(seed)
    model = stock_class(config_class(**settings, attn_implementation=attn_implementation)).eval()
    if family.startswith("dinov2-registers"):
        with torch.no_grad():
            model.base_model.embeddings.register_tokens.normal_()
    return model


def encoder_stock_and_evit(family: str, seed: int = 0, attn_implementation: str = "sdpa", **evit_settings):
    """A random stock CLIP/DINOv2 model and an EViT model of the same family with the same weights, in eval mode."""
    _, evit_class, _, evit_config_class, settings, _ = ENCODER_FAMILIES[family]
    stock = encoder_stock_model(family, seed, attn_implementation)
    evit_config = evit_config_class(**settings, **evit_settings, attn_implementation=attn_implementation)
    evit = evit_class(evit_config).eval()
    evit.load_state_dict(stock.state_dict())
    return stock, evit


def has_text_tower(builder: str) -> bool:
    """Whether a builder's model takes text too (CLIP and MetaCLIP 2 with both towers)."""
    return builder in ("clip", "metaclip-2")


def text_inputs(batch_size: int = 2):
    """Token ids for the tiny CLIP text tower, each sequence ending with its end-of-text token (the pooled one)."""
    input_ids = torch.randint(2, 98, (batch_size, 7), generator=torch.Generator().manual_seed(5))
    input_ids[:, -1] = TINY_CLIP_TEXT["eos_token_id"]
    return input_ids


def encoder_main_output(output):
    """What each family's model is used for: logits, image embeddings, or the final hidden states."""
    for name in ("logits", "logits_per_image", "image_embeds"):
        if getattr(output, name, None) is not None:
            return getattr(output, name)
    return output.last_hidden_state


# The families of image models (all but the vision-language ones, which serve image-text-to-text: tests/test_llava*.py
# test those against their own reference, with tests/llava_builders.py).
IMAGE_MODEL_FAMILIES = tuple(family for family in evit_hf.FAMILIES if "image-text-to-text" not in family.pipelines)
VISION_LANGUAGE_FAMILIES = tuple(family for family in evit_hf.FAMILIES if family not in IMAGE_MODEL_FAMILIES)

# The builders above that test each family of IMAGE_MODEL_FAMILIES (by its name).
FAMILY_TESTERS = {
    "vit": ("vit-base", "vit-classifier"),
    "deit": ("deit-base", "deit-classifier", "deit-teacher"),
    "clip": ("clip-vision", "clip-vision-projection", "clip", "clip-classifier"),
    "metaclip_2": ("metaclip-2-vision", "metaclip-2-vision-projection", "metaclip-2", "metaclip-2-classifier"),
    "dinov2": ("dinov2-base", "dinov2-classifier"),
    "dinov2_with_registers": ("dinov2-registers-base", "dinov2-registers-classifier"),
    "dinov3_vit": ("dinov3", "dinov3-registers"),
}


def tiny_stock_model(builder: str, seed: int = 0):
    """A random tiny stock model of one of the builders above, in eval mode."""
    if builder in FAMILIES:
        return stock_and_evit(builder, seed)[0]
    return encoder_stock_model(builder, seed)


def builder_classes(builder: str) -> tuple[type, type]:
    """(stock class, EViT class) of a builder."""
    return (FAMILIES.get(builder) or ENCODER_FAMILIES[builder])[:2]


@dataclass(frozen=True)
class Tester:
    """How the tests build and check one model class of a family: its tiny configuration and its spec reference."""

    name: str  # the builder name, used as the test id
    family: str  # the name of its record in evit_hf.FAMILIES
    stock_class: type
    evit_class: type
    stock_config_class: type
    evit_config_class: type
    settings: dict
    prefix: int  # tokens in front of the patches that are never scored
    # reference(stock, pixel_values, keep_rate, reduction_layers, fuse, prefix, input_ids) ->
    # (outputs by field name, kept patch indices per image and reduction layer), from tests/spec_reference.py
    reference: Callable
    takes_text: bool = False  # the model takes token ids too (both towers)
    auto_class: type = AutoModel


REFERENCES = {
    "vit-base": spec_reference.vit_base_outputs,
    "vit-classifier": spec_reference.vit_classifier_outputs,
    "deit-base": spec_reference.vit_base_outputs,
    "deit-classifier": spec_reference.vit_classifier_outputs,
    "deit-teacher": spec_reference.deit_teacher_outputs,
    "clip-vision": spec_reference.clip_vision_outputs,
    "clip-vision-projection": spec_reference.clip_vision_projection_outputs,
    "clip": spec_reference.clip_outputs,
    "clip-classifier": spec_reference.clip_classifier_outputs,
    "metaclip-2-vision": spec_reference.clip_vision_outputs,
    "metaclip-2-vision-projection": spec_reference.clip_vision_projection_outputs,
    "metaclip-2": spec_reference.clip_outputs,
    "metaclip-2-classifier": spec_reference.clip_classifier_outputs,
    "dinov2-base": spec_reference.dinov2_base_outputs,
    "dinov2-classifier": spec_reference.dinov2_classifier_outputs,
    "dinov2-registers-base": spec_reference.dinov2_base_outputs,
    "dinov2-registers-classifier": spec_reference.dinov2_classifier_outputs,
    "dinov3": spec_reference.dinov3_outputs,
    "dinov3-registers": spec_reference.dinov3_outputs,
}


def _tester(family: str, name: str) -> Tester:
    if name in FAMILIES:
        stock_class, evit_class, prefix = FAMILIES[name]
        stock_config_class = DeiTConfig if name.startswith("deit") else ViTConfig
        evit_config_class = evit_hf.EViTDeiTConfig if name.startswith("deit") else evit_hf.EViTConfig
        settings = TINY
    else:
        stock_class, evit_class, stock_config_class, evit_config_class, settings, prefix = ENCODER_FAMILIES[name]
    return Tester(
        name=name,
        family=family,
        stock_class=stock_class,
        evit_class=evit_class,
        stock_config_class=stock_config_class,
        evit_config_class=evit_config_class,
        settings=settings,
        prefix=prefix,
        reference=REFERENCES[name],
        takes_text=has_text_tower(name),
        auto_class=AutoModelForImageClassification if name.endswith(("-classifier", "-teacher")) else AutoModel,
    )


# One tester per model class EViT converts, by builder name, in the order of evit_hf.FAMILIES.
TESTERS = {name: _tester(family, name) for family, names in FAMILY_TESTERS.items() for name in names}


@functools.cache
def _built_stock_model(builder: str, seed: int, attn_implementation: str):
    if builder in FAMILIES:
        stock_class = FAMILIES[builder][0]
        torch.manual_seed(seed)
        return stock_class(stock_config(builder, attn_implementation=attn_implementation)).eval()
    return encoder_stock_model(builder, seed, attn_implementation)


def cached_stock_model(builder: str, seed: int = 0, attn_implementation: str = "sdpa"):
    """A copy of the random tiny stock model of `builder` (the same weights as `tiny_stock_model`): each is built once
    per process, and every caller gets its own copy to change or convert."""
    return copy.deepcopy(_built_stock_model(builder, seed, attn_implementation))


def cached_stock_and_evit(builder: str, seed: int = 0, attn_implementation: str = "sdpa", **evit_settings):
    """`stock_and_evit` / `encoder_stock_and_evit` for any builder, from the cache: the EViT model is a converted copy
    of the stock one (the path the EViT constructors take too), so both have the same weights."""
    stock = cached_stock_model(builder, seed, attn_implementation)
    evit = evit_hf.apply_evit(copy.deepcopy(stock), **evit_settings).eval()
    return stock, evit


def model_inputs(tester: Tester, pixel_values) -> dict:
    """The keyword arguments a tester's model takes for a batch of images (token ids too, for both towers)."""
    if tester.takes_text:
        return {"pixel_values": pixel_values, "input_ids": text_inputs(pixel_values.shape[0])}
    return {"pixel_values": pixel_values}


def evit_settings(model):
    """The configuration holding the EViT settings (CLIP and MetaCLIP 2 keep them in the vision configuration)."""
    return model.config.vision_config if hasattr(model.config, "vision_config") else model.config
