"""Turn a ViT, DeiT, CLIP (vision tower) or DINOv2 model already in memory into EViT, in place."""

from collections.abc import Sequence

from torch import nn
from transformers import (
    CLIPModel,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersForImageClassification,
    Dinov2WithRegistersModel,
    ViTForImageClassification,
    ViTModel,
)
from transformers.models.dinov2.modeling_dinov2 import Dinov2Encoder
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import Dinov2WithRegistersEncoder
from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

from .configuration_evit import (
    EViTCLIPConfig,
    EViTCLIPVisionConfig,
    EViTConfig,
    EViTDeiTConfig,
    EViTDinov2Config,
    EViTDinov2WithRegistersConfig,
)
from .modeling_evit import (
    EViTCLIPModel,
    EViTCLIPVisionModel,
    EViTCLIPVisionModelWithProjection,
    EViTDeiTForImageClassification,
    EViTDeiTForImageClassificationWithTeacher,
    EViTDeiTModel,
    EViTDinov2Encoder,
    EViTDinov2ForImageClassification,
    EViTDinov2Model,
    EViTDinov2WithRegistersEncoder,
    EViTDinov2WithRegistersForImageClassification,
    EViTDinov2WithRegistersModel,
    EViTForImageClassification,
    EViTModel,
    _TokenReductionEncoderMixin,
    convert_layers_to_evit,
)


# Stock class -> (EViT class, EViT config class) of the models apply_evit converts. Exact classes only: a subclass may
# have its own forward.
_STOCK_CLASSES = {
    ViTModel: (EViTModel, EViTConfig),
    ViTForImageClassification: (EViTForImageClassification, EViTConfig),
    DeiTModel: (EViTDeiTModel, EViTDeiTConfig),
    DeiTForImageClassification: (EViTDeiTForImageClassification, EViTDeiTConfig),
    DeiTForImageClassificationWithTeacher: (EViTDeiTForImageClassificationWithTeacher, EViTDeiTConfig),
    CLIPVisionModel: (EViTCLIPVisionModel, EViTCLIPVisionConfig),
    CLIPVisionModelWithProjection: (EViTCLIPVisionModelWithProjection, EViTCLIPVisionConfig),
    CLIPModel: (EViTCLIPModel, EViTCLIPConfig),
    Dinov2Model: (EViTDinov2Model, EViTDinov2Config),
    Dinov2ForImageClassification: (EViTDinov2ForImageClassification, EViTDinov2Config),
    Dinov2WithRegistersModel: (EViTDinov2WithRegistersModel, EViTDinov2WithRegistersConfig),
    Dinov2WithRegistersForImageClassification: (
        EViTDinov2WithRegistersForImageClassification,
        EViTDinov2WithRegistersConfig,
    ),
}
_EVIT_CLASSES = {**_STOCK_CLASSES, **{evit: (evit, config) for evit, config in _STOCK_CLASSES.values()}}

# The sub-models that change class with them: the base models, and DINOv2's encoders (which run the layer loop). CLIP's
# text tower is not here: it stays CLIP's.
_STOCK_SUBMODEL_CLASSES = {
    ViTModel: EViTModel,
    DeiTModel: EViTDeiTModel,
    CLIPVisionModel: EViTCLIPVisionModel,
    Dinov2Model: EViTDinov2Model,
    Dinov2Encoder: EViTDinov2Encoder,
    Dinov2WithRegistersModel: EViTDinov2WithRegistersModel,
    Dinov2WithRegistersEncoder: EViTDinov2WithRegistersEncoder,
}

# Models whose images have no class token: nothing to score the patch tokens with.
_NO_CLASS_TOKEN_MODEL_TYPES = ("siglip", "siglip_vision_model", "siglip2", "siglip2_vision_model")


def _refusal(model: nn.Module) -> str:
    """The `TypeError` message for a model apply_evit does not convert: what it supports, and why not this one."""
    supported = ", ".join(sorted(cls.__name__ for cls in _STOCK_CLASSES))
    message = f"apply_evit supports {supported} (and their EViT classes); got {type(model).__name__}"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _NO_CLASS_TOKEN_MODEL_TYPES:
        return (
            f"{message}, which has no class token: it pools the patch tokens with an attention-pooling head, so there "
            "is no class-token attention to score tokens with, and its output depends on every patch token."
        )
    for name, module in model.named_modules():
        if name and type(module) in _EVIT_CLASSES:
            return (
                f"{message}, which holds a {type(module).__name__} at `{name}` and uses every one of its patch "
                "tokens afterwards (a projector or decoder that expects one token per patch, in place); fewer or "
                "fused tokens would break it. Convert a standalone vision model instead."
            )
    return f"{message}."


_SUBMODEL_CLASSES = {**_STOCK_SUBMODEL_CLASSES, **{evit: evit for evit in _STOCK_SUBMODEL_CLASSES.values()}}

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
    """Turns a loaded transformers ViT, DeiT, CLIP or DINOv2 model into EViT, in place, and returns it.

    The weights are untouched and no parameter is added: the model changes class (for example
    `ViTForImageClassification` becomes [`EViTForImageClassification`], still an instance of the former), its layers
    become EViT layers, and it gets its own EViT configuration. Applied to an EViT model it changes only the settings
    given. For `CLIPModel` only the vision tower changes; the settings live in `config.vision_config`.

    Models without a class token (SigLIP) and models that feed every patch token of their vision tower to something
    else (LLaVA-style vision-language models, masked-image-modeling decoders) raise a `TypeError` that says why.

    Args:
        model (`nn.Module`):
            A `ViTModel`, `ViTForImageClassification`, `DeiTModel`, `DeiTForImageClassification`,
            `DeiTForImageClassificationWithTeacher`, `CLIPVisionModel`, `CLIPVisionModelWithProjection`, `CLIPModel`,
            `Dinov2Model`, `Dinov2ForImageClassification`, `Dinov2WithRegistersModel` or
            `Dinov2WithRegistersForImageClassification` (or the EViT class of one).
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
        raise TypeError(_refusal(model))
    evit_class, config_class = classes

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

    for module in model.modules():
        new_class = evit_class if module is model else _SUBMODEL_CLASSES.get(type(module))
        if new_class is not None and type(module) is not new_class:
            module.__class__ = new_class
            # transformers looks up what a model records for output_hidden_states/output_attentions by its class;
            # a model built as EViT is registered in PreTrainedModel.__init__, a converted one here.
            _CAN_RECORD_REGISTRY[module] = module._can_record_outputs
        if isinstance(module, _TokenReductionEncoderMixin):
            convert_layers_to_evit(module)
    return model


__all__ = ["apply_evit"]
