"""EViT configurations of CLIP: the vision tower's, which holds the settings, and the whole model's.

`save_pretrained` copies this file next to the weights, so it only uses relative imports.
"""

from huggingface_hub.dataclasses import strict
from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

from .configuration_evit_base import _EViTSettingsMixin, _settings_checked_first, _VisionSettingsMixin


@_settings_checked_first
@strict
class EViTCLIPVisionConfig(_EViTSettingsMixin, CLIPVisionConfig):
    r"""
    Configuration of the vision tower of an EViT CLIP model ([`EViTCLIPVisionModel`],
    [`EViTCLIPVisionModelWithProjection`], and the vision half of [`EViTCLIPModel`]). It holds every
    [`CLIPVisionConfig`] field, plus `keep_rate`, `reduction_layers` and `fuse_inattentive_tokens` as in
    [`EViTConfig`]. The class token is the only prefix token. Loading from a whole CLIP checkpoint reads its
    `vision_config`.
    """

    model_type = "evit_clip_vision_model"
    source_model_types = ("clip_vision_model",)
    model_class_names = "EViTCLIPVisionModel, EViTCLIPVisionModelWithProjection"

    keep_rate: float | int | list[float] | tuple[float, ...] = 0.7
    reduction_layers: list[int] | tuple[int, ...] | None = None
    fuse_inattentive_tokens: bool = True


@strict
class EViTCLIPConfig(_VisionSettingsMixin, CLIPConfig):
    r"""
    Configuration of an EViT CLIP model ([`EViTCLIPModel`], [`EViTCLIPForImageClassification`]): a [`CLIPConfig`]
    whose `vision_config` is an [`EViTCLIPVisionConfig`]. Only the vision tower reorganizes tokens; the text tower is
    CLIP's.

    `keep_rate`, `reduction_layers` and `fuse_inattentive_tokens` are stored (and checked) in `vision_config`; this
    configuration reads and assigns them there, so that `EViTCLIPConfig(keep_rate=0.5)`,
    `EViTCLIPModel.from_pretrained(folder, keep_rate=0.5)` and `config.keep_rate = 0.5` all set the vision tower's.

    Example:

    ```python
    >>> from evit_hf import EViTCLIPConfig, EViTCLIPModel

    >>> config = EViTCLIPConfig(keep_rate=0.7)  # CLIP ViT-B/32 shape, reduction layers [3, 6, 9]
    >>> model = EViTCLIPModel(config)
    ```"""

    model_type = "evit_clip"
    source_model_types = ("clip",)
    model_class_names = "EViTCLIPModel, EViTCLIPForImageClassification"
    sub_configs_defaults = {"text_config": CLIPTextConfig, "vision_config": EViTCLIPVisionConfig}


__all__ = ["EViTCLIPConfig", "EViTCLIPVisionConfig"]
