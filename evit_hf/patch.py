"""Turn a ViT/DeiT model already in memory into EViT, in place."""

from collections.abc import Sequence

from torch import nn
from transformers import (
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    ViTForImageClassification,
    ViTModel,
)
from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

from .configuration_evit import EViTConfig, EViTDeiTConfig
from .modeling_evit import (
    EViTDeiTForImageClassification,
    EViTDeiTForImageClassificationWithTeacher,
    EViTDeiTModel,
    EViTForImageClassification,
    EViTModel,
    convert_layers_to_evit,
)


# Stock class -> (EViT class, EViT config class). Exact classes only: a subclass may have its own forward.
_EVIT_CLASSES = {
    ViTModel: (EViTModel, EViTConfig),
    ViTForImageClassification: (EViTForImageClassification, EViTConfig),
    DeiTModel: (EViTDeiTModel, EViTDeiTConfig),
    DeiTForImageClassification: (EViTDeiTForImageClassification, EViTDeiTConfig),
    DeiTForImageClassificationWithTeacher: (EViTDeiTForImageClassificationWithTeacher, EViTDeiTConfig),
}
_EVIT_CLASSES.update({evit_class: (evit_class, config_class) for evit_class, config_class in _EVIT_CLASSES.values()})

_UNSET = object()


def _evit_config(config, config_class, keep_rate, reduction_layers, fuse_inattentive_tokens):
    """A new EViT configuration from `config`: the model gets its own object, models sharing `config` are untouched."""
    settings = config.to_dict()
    settings.pop("model_type", None)
    for name, value in (
        ("keep_rate", keep_rate),
        ("reduction_layers", reduction_layers),
        ("fuse_inattentive_tokens", fuse_inattentive_tokens),
    ):
        if value is not _UNSET:
            settings[name] = value
        elif not isinstance(config, config_class):
            settings.pop(name, None)  # a plain config: the EViT defaults
    evit_config = config_class.from_dict(settings)
    evit_config._attn_implementation = config._attn_implementation
    evit_config._name_or_path = config._name_or_path
    return evit_config


def apply_evit(
    model: nn.Module,
    keep_rate: float = _UNSET,
    reduction_layers: Sequence[int] | None = _UNSET,
    fuse_inattentive_tokens: bool = _UNSET,
) -> nn.Module:
    """Turns a loaded transformers ViT/DeiT model into EViT, in place, and returns it.

    The weights are untouched and no parameter is added: the model changes class (for example
    `ViTForImageClassification` becomes [`EViTForImageClassification`], still an instance of the former), its layers
    become EViT layers, and it gets its own [`EViTConfig`] / [`EViTDeiTConfig`]. Applied to an EViT model it changes
    only the settings given.

    Args:
        model (`nn.Module`):
            A `ViTModel`, `ViTForImageClassification`, `DeiTModel`, `DeiTForImageClassification` or
            `DeiTForImageClassificationWithTeacher` (or the EViT class of one).
        keep_rate (`float`, *optional*, defaults to 0.7):
            Share of the candidate tokens each reduction layer keeps, in (0, 1].
        reduction_layers (`list[int]`, *optional*):
            0-based indices of the reduction layers; defaults to the paper's (3, 6, 9 for 12 layers).
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
    classes = _EVIT_CLASSES.get(type(model))
    if classes is None:
        supported = ", ".join(sorted({cls.__name__ for cls in _EVIT_CLASSES}))
        raise TypeError(f"apply_evit supports {supported}; got {type(model).__name__}.")
    evit_class, config_class = classes

    old_config = model.config
    new_config = _evit_config(old_config, config_class, keep_rate, reduction_layers, fuse_inattentive_tokens)
    # Attention modules read `config._attn_implementation`, so every module holding the old config gets the new one.
    for module in model.modules():
        if getattr(module, "config", None) is old_config:
            module.config = new_config

    base_model = model.base_model
    base_class = EViTDeiTModel if config_class is EViTDeiTConfig else EViTModel
    for module, new_class in ((base_model, base_class), (model, evit_class)):
        if type(module) is not new_class:
            module.__class__ = new_class
            # transformers looks up what a model records for output_hidden_states/output_attentions by its class;
            # a model built as EViT is registered in PreTrainedModel.__init__, a converted one here.
            _CAN_RECORD_REGISTRY[module] = module._can_record_outputs
    convert_layers_to_evit(base_model)
    return model


__all__ = ["apply_evit"]
