"""EViT configuration of DINOv3 ViT models (rotary position embeddings; registers are prefix tokens).

`save_pretrained` copies this file next to the weights, so it only uses relative imports.
"""

from huggingface_hub.dataclasses import strict
from transformers import DINOv3ViTConfig

from .configuration_evit_base import _EViTSettingsMixin, _settings_checked_first


@_settings_checked_first
@strict
class EViTDINOv3ViTConfig(_EViTSettingsMixin, DINOv3ViTConfig):
    r"""
    Configuration of an EViT DINOv3 ViT model ([`EViTDINOv3ViTModel`]). It holds every [`DINOv3ViTConfig`] field,
    plus `keep_rate`, `reduction_layers` and `fuse_inattentive_tokens` as in [`EViTConfig`]. The class token and the
    `num_register_tokens` register tokens are prefix tokens: always kept, never scored, never rotated.
    """

    model_type = "evit_dinov3_vit"
    source_model_types = ("dinov3_vit",)
    model_class_names = "EViTDINOv3ViTModel"

    keep_rate: float | int | list[float] | tuple[float, ...] = 0.7
    reduction_layers: list[int] | tuple[int, ...] | None = None
    fuse_inattentive_tokens: bool = True


__all__ = ["EViTDINOv3ViTConfig"]
