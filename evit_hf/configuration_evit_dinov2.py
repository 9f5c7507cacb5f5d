"""EViT configurations of DINOv2, with and without registers.

`save_pretrained` copies this file next to the weights, so it only uses relative imports.
"""

from huggingface_hub.dataclasses import strict
from transformers import Dinov2Config, Dinov2WithRegistersConfig

from .configuration_evit_base import _EViTSettingsMixin, _settings_checked_first


@_settings_checked_first
@strict
class EViTDinov2Config(_EViTSettingsMixin, Dinov2Config):
    r"""
    Configuration of an EViT DINOv2 model ([`EViTDinov2Model`], [`EViTDinov2ForImageClassification`]). It holds every
    [`Dinov2Config`] field, plus `keep_rate`, `reduction_layers` and `fuse_inattentive_tokens` as in [`EViTConfig`].
    The class token is the only prefix token.
    """

    model_type = "evit_dinov2"
    source_model_types = ("dinov2",)
    model_class_names = "EViTDinov2Model, EViTDinov2ForImageClassification"

    keep_rate: float | int | list[float] | tuple[float, ...] = 0.7
    reduction_layers: list[int] | tuple[int, ...] | None = None
    fuse_inattentive_tokens: bool = True


@_settings_checked_first
@strict
class EViTDinov2WithRegistersConfig(_EViTSettingsMixin, Dinov2WithRegistersConfig):
    r"""
    Configuration of an EViT DINOv2 model with registers ([`EViTDinov2WithRegistersModel`],
    [`EViTDinov2WithRegistersForImageClassification`]). It holds every [`Dinov2WithRegistersConfig`] field, plus
    `keep_rate`, `reduction_layers` and `fuse_inattentive_tokens` as in [`EViTConfig`]. The class token and the
    `num_register_tokens` register tokens are prefix tokens: always kept, never scored.
    """

    model_type = "evit_dinov2_with_registers"
    source_model_types = ("dinov2_with_registers",)
    model_class_names = "EViTDinov2WithRegistersModel, EViTDinov2WithRegistersForImageClassification"

    keep_rate: float | int | list[float] | tuple[float, ...] = 0.7
    reduction_layers: list[int] | tuple[int, ...] | None = None
    fuse_inattentive_tokens: bool = True


__all__ = ["EViTDinov2Config", "EViTDinov2WithRegistersConfig"]
