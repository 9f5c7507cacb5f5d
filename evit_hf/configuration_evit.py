"""EViT configurations: a ViT or DeiT configuration plus the token-reorganization settings.

This file is copied next to the weights by `save_pretrained`, so it only uses relative imports.
"""

import math
from collections.abc import Sequence

from huggingface_hub.dataclasses import strict
from transformers import DeiTConfig, ViTConfig


def default_reduction_layers(num_hidden_layers: int) -> list[int]:
    """The paper's reduction layers for a model of `num_hidden_layers` layers.

    Layers 3, 6 and 9 for 12 layers; for other depths round(L/4), round(L/2), round(3L/4), deduplicated and kept inside
    the model.
    """
    candidates = (round(num_hidden_layers / 4), round(num_hidden_layers / 2), round(3 * num_hidden_layers / 4))
    return sorted({index for index in candidates if 0 <= index < num_hidden_layers})


def check_keep_rate(keep_rate: float) -> float:
    """Returns `keep_rate` as a Python float, or raises a `ValueError` saying what is allowed."""
    if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)) or not math.isfinite(keep_rate):
        raise ValueError(f"keep_rate must be a number in (0, 1], got {keep_rate!r}.")
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(
            f"keep_rate must be in (0, 1] (the share of candidate tokens each reduction layer keeps), got {keep_rate}."
        )
    return float(keep_rate)


def check_reduction_layers(reduction_layers: Sequence[int], num_hidden_layers: int) -> list[int]:
    """Returns the reduction layers as a sorted list, or raises a `ValueError` saying what is allowed."""
    layers = list(reduction_layers)
    for index in layers:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_hidden_layers:
            raise ValueError(
                f"reduction_layers holds 0-based layer indices in [0, {num_hidden_layers - 1}] for a model with "
                f"{num_hidden_layers} layers; got {index!r} in {layers}."
            )
    if len(set(layers)) != len(layers):
        raise ValueError(f"reduction_layers must not repeat a layer, got {layers}.")
    return sorted(layers)


class _EViTSettingsMixin:
    """What the ViT and DeiT flavours of the EViT configuration share: validation and loading of plain checkpoints."""

    # The plain checkpoints this configuration reads (their config.json names one of these `model_type`s).
    source_model_types: tuple[str, ...] = ()
    # Trainer gathers every output but these during evaluation: the kept tokens are not predictions.
    keys_to_ignore_at_inference = ["kept_token_indices"]

    def _resolve_evit_settings(self) -> None:
        self.keep_rate = check_keep_rate(self.keep_rate)
        if self.reduction_layers is None:
            self.reduction_layers = default_reduction_layers(self.num_hidden_layers)
        self.reduction_layers = check_reduction_layers(self.reduction_layers, self.num_hidden_layers)
        if not isinstance(self.fuse_inattentive_tokens, bool):
            raise ValueError(f"fuse_inattentive_tokens must be True or False, got {self.fuse_inattentive_tokens!r}.")

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        model_type = config_dict.get("model_type")
        if model_type is not None and model_type != cls.model_type:
            if model_type not in cls.source_model_types:
                supported = ", ".join(repr(name) for name in (cls.model_type, *cls.source_model_types))
                raise ValueError(
                    f"{cls.__name__} reads checkpoints of model_type {supported}, but "
                    f"{pretrained_model_name_or_path} is {model_type!r}. Distilled DeiT checkpoints (model_type "
                    "'deit') load with EViTDeiTForImageClassificationWithTeacher; ViT and non-distilled DeiT "
                    "checkpoints (model_type 'vit') with EViTForImageClassification."
                )
            # A plain ViT/DeiT checkpoint becomes an EViT one: same weights, EViT settings from kwargs or defaults.
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs


@strict
class EViTConfig(_EViTSettingsMixin, ViTConfig):
    r"""
    Configuration of an EViT model built on ViT (also the non-distilled DeiT checkpoints, which the Hub stores as ViT).
    It holds every [`ViTConfig`] field, plus:

    keep_rate (`float`, *optional*, defaults to 0.7):
        Share of the non-prefix tokens that each reduction layer keeps, in (0, 1]. A reduction layer with `n`
        candidate tokens keeps `ceil(keep_rate * n)` of them. 1.0 gives the stock ViT.
    reduction_layers (`list[int]`, *optional*):
        0-based indices of the layers that reorganize tokens after their attention block. Defaults to the paper's
        `[3, 6, 9]` for 12 layers, and `round(L/4), round(L/2), round(3L/4)` for other depths `L`.
    fuse_inattentive_tokens (`bool`, *optional*, defaults to `True`):
        Whether the tokens a reduction layer does not keep are fused into one token (weighted by their class-token
        attention) or dropped.

    Example:

    ```python
    >>> from evit_hf import EViTConfig, EViTForImageClassification

    >>> config = EViTConfig(keep_rate=0.7)  # ViT-B/16 shape, reduction layers [3, 6, 9]
    >>> model = EViTForImageClassification(config)
    ```"""

    model_type = "evit"
    source_model_types = ("vit",)

    keep_rate: float | int = 0.7
    reduction_layers: list[int] | tuple[int, ...] | None = None
    fuse_inattentive_tokens: bool = True

    def __post_init__(self, **kwargs):
        self._resolve_evit_settings()
        super().__post_init__(**kwargs)


@strict
class EViTDeiTConfig(_EViTSettingsMixin, DeiTConfig):
    r"""
    Configuration of an EViT model built on DeiT with a distillation token (model_type "deit" checkpoints such as
    `facebook/deit-small-distilled-patch16-224`). The class and distillation tokens are always kept. It holds every
    [`DeiTConfig`] field, plus:

    keep_rate (`float`, *optional*, defaults to 0.7):
        Share of the non-prefix tokens that each reduction layer keeps, in (0, 1].
    reduction_layers (`list[int]`, *optional*):
        0-based indices of the reduction layers; defaults as in [`EViTConfig`].
    fuse_inattentive_tokens (`bool`, *optional*, defaults to `True`):
        Whether the tokens a reduction layer does not keep are fused into one token or dropped.
    """

    model_type = "evit_deit"
    source_model_types = ("deit",)

    keep_rate: float | int = 0.7
    reduction_layers: list[int] | tuple[int, ...] | None = None
    fuse_inattentive_tokens: bool = True

    def __post_init__(self, **kwargs):
        self._resolve_evit_settings()
        super().__post_init__(**kwargs)


__all__ = ["EViTConfig", "EViTDeiTConfig", "check_keep_rate", "default_reduction_layers"]
