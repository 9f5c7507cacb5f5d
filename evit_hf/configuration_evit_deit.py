"""EViT configuration of DeiT models with a distillation token.

`save_pretrained` copies this file next to the weights, so it only uses relative imports.
"""

from huggingface_hub.dataclasses import strict
from transformers import DeiTConfig

from .configuration_evit_base import _EViTSettingsMixin, _settings_checked_first


@_settings_checked_first
@strict
class EViTDeiTConfig(_EViTSettingsMixin, DeiTConfig):
    r"""
    Configuration of an EViT model built on DeiT with a distillation token (model_type "deit" checkpoints such as
    `facebook/deit-small-distilled-patch16-224`). The class and distillation tokens are always kept. It holds every
    [`DeiTConfig`] field, plus:

    keep_rate (`float`, *optional*, defaults to 0.7):
        Share of the non-prefix tokens that each reduction layer keeps, in (0, 1].
    reduction_layers (`list[int]`, *optional*):
        0-based indices of the reduction layers, stored sorted; defaults as in [`EViTConfig`].
    fuse_inattentive_tokens (`bool`, *optional*, defaults to `True`):
        Whether the tokens a reduction layer does not keep are fused into one token or dropped.

    The settings are checked whenever they are set, as in [`EViTConfig`].
    """

    model_type = "evit_deit"
    source_model_types = ("deit",)
    model_class_names = (
        "EViTDeiTModel, EViTDeiTForImageClassification, EViTDeiTForImageClassificationWithTeacher; distilled DeiT "
        "checkpoints"
    )

    keep_rate: float | int | list[float] | tuple[float, ...] = 0.7
    reduction_layers: list[int] | tuple[int, ...] | None = None
    fuse_inattentive_tokens: bool = True


__all__ = ["EViTDeiTConfig"]
