"""Turn a model of one of the families in `families.FAMILIES`, already in memory, into EViT, in place."""

from collections.abc import Sequence

from torch import nn

from .families import FAMILIES, NO_CLASS_TOKEN_MODEL_TYPES, family_for_model
from .modeling_evit_base import convert_to_evit


def _supported_classes() -> list[str]:
    return sorted(model_class.__name__ for family in FAMILIES for model_class in family.models)


def _refusal(model: nn.Module) -> str:
    """The `TypeError` message for a model apply_evit does not convert: what it supports, and why not this one."""
    if hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
        return (
            f"apply_evit converts a model, not a compiled wrapper (torch.compile's OptimizedModule around a "
            f"{type(model._orig_mod).__name__}). Apply EViT before compiling: `apply_evit(model)`, then "
            "`torch.compile(model)`."
        )
    for family in FAMILIES:
        reason = family.refused_models.get(type(model))
        if reason is not None:
            return f"apply_evit does not convert {type(model).__name__}: {reason}"
    message = (
        f"apply_evit supports {', '.join(_supported_classes())} (and their EViT classes); got {type(model).__name__}"
    )
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in NO_CLASS_TOKEN_MODEL_TYPES:
        return (
            f"{message}, which has no class token: it pools the patch tokens with an attention-pooling head, so there "
            "is no class-token attention to score tokens with, and its output depends on every patch token."
        )
    for name, module in model.named_modules():
        if name and family_for_model(module) is not None:
            return (
                f"{message}, which holds a {type(module).__name__} at `{name}` and uses every one of its patch "
                "tokens afterwards (a projector or decoder that expects one token per patch, in place); fewer or "
                "fused tokens would break it. Convert a standalone vision model instead."
            )
    return f"{message}."


_UNSET = object()


def _evit_config(config, config_class, keep_rate, reduction_layers, fuse_inattentive_tokens):
    """A new EViT configuration from `config`: the model gets its own object, models sharing `config` are untouched."""
    settings = config.to_dict()
    settings.pop("model_type", None)
    given = {}
    for name, value in (
        ("keep_rate", keep_rate),
        ("reduction_layers", reduction_layers),
        ("fuse_inattentive_tokens", fuse_inattentive_tokens),
    ):
        if value is not _UNSET:
            given[name] = value
        elif not isinstance(config, config_class):
            settings.pop(name, None)  # a plain config: the EViT defaults
    # The settings given go in as from_pretrained's keyword arguments do: per-layer keep rates with the layers given
    # beside them, as written; new layers out of ascending order beside the model's own per-layer rates are refused.
    evit_config = config_class.from_dict(settings, **given)
    evit_config._attn_implementation = config._attn_implementation
    for key in config.sub_configs:  # CLIP: each tower keeps its backend
        if getattr(config, key, None) is not None:
            getattr(evit_config, key)._attn_implementation = getattr(config, key)._attn_implementation
    evit_config._name_or_path = config._name_or_path
    return evit_config


def apply_evit(
    model: nn.Module,
    keep_rate: float = _UNSET,
    reduction_layers: Sequence[int] | None = _UNSET,
    fuse_inattentive_tokens: bool = _UNSET,
) -> nn.Module:
    """Turns a loaded transformers model of a supported family (ViT, DeiT, CLIP, DINOv2, ...: `evit_hf.FAMILIES`)
    into EViT, in place, and returns it.

    The weights are untouched and no parameter is added: the model changes class (for example
    `ViTForImageClassification` becomes [`EViTForImageClassification`], still an instance of the former), its layers
    become EViT layers, and it gets its own EViT configuration. Applied to an EViT model it changes only the settings
    given. For CLIP-style models with a text tower only the vision tower changes; the settings live in
    `config.vision_config`.

    Models without a class token (SigLIP), models that feed every patch token of their vision tower to something
    else (LLaVA-style vision-language models, masked-image-modeling decoders), compiled wrappers and the other models
    a family refuses raise a `TypeError` that says why.

    Args:
        model (`nn.Module`):
            A model of one of the classes in `family.models` for a family of `evit_hf.FAMILIES` (or the EViT class of
            one): `ViTModel`, `ViTForImageClassification`, `DeiTForImageClassificationWithTeacher`, `CLIPModel`,
            `CLIPForImageClassification`, `Dinov2ForImageClassification`, ...
        keep_rate (`float` or `list[float]`, *optional*, defaults to 0.7):
            Share of the candidate tokens each reduction layer keeps, in (0, 1]; or one rate per reduction layer,
            which goes with the layers as given beside it (`reduction_layers=[3, 1, 2], keep_rate=[0.9, 0.7, 0.5]`:
            layer 3 keeps 0.9), or in ascending layer order without them.
        reduction_layers (`list[int]`, *optional*):
            0-based indices of the reduction layers; defaults to the paper's (3, 6, 9 for 12 layers). Stored in
            ascending order, with per-layer keep rates reordered alike.
        fuse_inattentive_tokens (`bool`, *optional*, defaults to `True`):
            Fuse the tokens a reduction layer does not keep into one, or drop them.

    Returns:
        The same `model` object.

    Example:

    ```python
    >>> from transformers import AutoModelForImageClassification
    >>> import evit_hf

    >>> model = AutoModelForImageClassification.from_pretrained("google/vit-base-patch16-224")
    >>> evit_hf.apply_evit(model, keep_rate=0.7, reduction_layers=[3, 6, 9])
    ```
    """
    family = family_for_model(model)
    if family is None:
        raise TypeError(_refusal(model))
    evit_class = family.models.get(type(model), type(model))
    config_class = evit_class.config_class

    old_config = model.config
    new_config = _evit_config(old_config, config_class, keep_rate, reduction_layers, fuse_inattentive_tokens)
    # Modules read their configuration (attention reads `config._attn_implementation`), so every module holding the old
    # one, or one of its sub-configurations (CLIP's text and vision configurations), gets the new one.
    replacements = {id(old_config): new_config}
    for key in old_config.sub_configs:
        if getattr(old_config, key, None) is not None:
            replacements[id(getattr(old_config, key))] = getattr(new_config, key)
    for module in model.modules():
        if id(getattr(module, "config", None)) in replacements:
            module.config = replacements[id(module.config)]

    # The same conversion as the EViT constructors run after the stock one.
    convert_to_evit(model, evit_class)
    return model


__all__ = ["apply_evit"]
