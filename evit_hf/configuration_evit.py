"""EViT configuration of ViT models (and of the non-distilled DeiT checkpoints, which the Hub stores as ViT).

`save_pretrained` copies this file next to the weights, so it only uses relative imports.
"""

from huggingface_hub.dataclasses import strict
from transformers import ViTConfig

from .configuration_evit_base import (
    _EViTSettingsMixin,
    _settings_checked_first,
    check_keep_rate,
    default_reduction_layers,
)


@_settings_checked_first
@strict
class EViTConfig(_EViTSettingsMixin, ViTConfig):
    r"""
    Configuration of an EViT model built on ViT (also the non-distilled DeiT checkpoints, which the Hub stores as ViT).
    It holds every [`ViTConfig`] field, plus:

    keep_rate (`float`, *optional*, defaults to 0.7):
        Share of the non-prefix tokens that each reduction layer keeps, in (0, 1]. A reduction layer with `n`
        candidate tokens keeps `ceil(keep_rate * n)` of them. 1.0 gives the stock ViT. A list gives one rate per
        reduction layer: given with `reduction_layers`, each rate goes with its layer as written
        (`reduction_layers=[3, 1, 2], keep_rate=[0.9, 0.7, 0.5]`: layer 3 keeps 0.9, stored as layers `[1, 2, 3]`
        with rates `[0.7, 0.5, 0.9]`); given alone, the rates follow the stored layers in ascending order.
    reduction_layers (`list[int]`, *optional*):
        0-based indices of the layers that reorganize tokens after their attention block, each once and below
        `num_hidden_layers`; stored as a sorted list. Defaults (also for `None`) to the paper's `[3, 6, 9]` for 12
        layers, and `round(L/4), round(L/2), round(3L/4)` for other depths `L`.
    fuse_inattentive_tokens (`bool`, *optional*, defaults to `True`):
        Whether the tokens a reduction layer does not keep are fused into one token (weighted by their class-token
        attention) or dropped.

    The three settings are checked whenever they are set: by the constructor, by `from_pretrained` keyword arguments
    and config.json values, and by assignment (`config.keep_rate = 0.5`). A bad value raises a `ValueError` that says
    what is allowed. Changing `num_hidden_layers` is refused while `reduction_layers` holds a layer past the new depth;
    assigning `reduction_layers` out of ascending order while `keep_rate` holds per-layer rates is refused (which
    rate goes with which layer would be a guess): assign both with `config.set_schedule(reduction_layers=...,
    keep_rate=...)` or `config.update({...})`.

    Example:

    ```python
    >>> from evit_hf import EViTConfig, EViTForImageClassification

    >>> config = EViTConfig(keep_rate=0.7)  # ViT-B/16 shape, reduction layers [3, 6, 9]
    >>> model = EViTForImageClassification(config)
    ```"""

    model_type = "evit"
    source_model_types = ("vit",)
    model_class_names = "EViTModel, EViTForImageClassification; ViT and non-distilled DeiT checkpoints"

    keep_rate: float | int | list[float] | tuple[float, ...] = 0.7
    reduction_layers: list[int] | tuple[int, ...] | None = None
    fuse_inattentive_tokens: bool = True


__all__ = ["EViTConfig", "check_keep_rate", "default_reduction_layers"]
