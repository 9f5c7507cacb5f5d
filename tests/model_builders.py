"""Tiny ViT/DeiT shapes and builders shared by the tests."""

import torch
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

import evit_hf


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
