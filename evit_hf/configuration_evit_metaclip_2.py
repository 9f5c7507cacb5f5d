"""EViT configurations of MetaCLIP 2: the vision tower's, which holds the settings, and the whole model's.

`save_pretrained` copies this file next to the weights, so it only uses relative imports.
"""

from huggingface_hub.dataclasses import strict
from transformers import MetaClip2Config, MetaClip2TextConfig, MetaClip2VisionConfig

from .configuration_evit_base import _EViTSettingsMixin, _settings_checked_first, _VisionSettingsMixin


@_settings_checked_first
@strict
class EViTMetaClip2VisionConfig(_EViTSettingsMixin, MetaClip2VisionConfig):
    r"""
    Configuration of the vision tower of an EViT MetaCLIP 2 model. It holds every [`MetaClip2VisionConfig`] field,
    plus `keep_rate`, `reduction_layers` and `fuse_inattentive_tokens` as in [`EViTConfig`]. The class token is the
    only prefix token.
    """

    model_type = "evit_metaclip_2_vision_model"
    source_model_types = ("metaclip_2_vision_model",)
    model_class_names = "EViTMetaClip2VisionModel, EViTMetaClip2VisionModelWithProjection"

    keep_rate: float | int | list[float] | tuple[float, ...] = 0.7
    reduction_layers: list[int] | tuple[int, ...] | None = None
    fuse_inattentive_tokens: bool = True


@strict
class EViTMetaClip2Config(_VisionSettingsMixin, MetaClip2Config):
    r"""
    Configuration of an EViT MetaCLIP 2 model ([`EViTMetaClip2Model`], [`EViTMetaClip2ForImageClassification`]): a
    [`MetaClip2Config`] whose `vision_config` is an [`EViTMetaClip2VisionConfig`], which holds the settings (read and
    assigned here as in [`EViTCLIPConfig`]). The text tower is MetaCLIP 2's.
    """

    model_type = "evit_metaclip_2"
    source_model_types = ("metaclip_2",)
    model_class_names = "EViTMetaClip2Model, EViTMetaClip2ForImageClassification"
    sub_configs_defaults = {"text_config": MetaClip2TextConfig, "vision_config": EViTMetaClip2VisionConfig}


__all__ = ["EViTMetaClip2Config", "EViTMetaClip2VisionConfig"]
