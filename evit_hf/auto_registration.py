"""Registers the EViT classes with transformers' Auto classes: the one place that does it, run on `import evit_hf`."""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .configuration_evit import EViTConfig, EViTDeiTConfig
from .modeling_evit import (
    EViTDeiTForImageClassification,
    EViTDeiTForImageClassificationWithTeacher,
    EViTDeiTModel,
    EViTForImageClassification,
    EViTModel,
)


def register_evit_auto_classes() -> None:
    """Makes `AutoConfig`, `AutoModel` and `AutoModelForImageClassification` know the "evit" and "evit_deit" types,
    and makes `save_pretrained` write an `auto_map` and copy the code, so that a process without evit_hf loads saved
    folders with `trust_remote_code=True`."""
    AutoConfig.register(EViTConfig.model_type, EViTConfig, exist_ok=True)
    AutoConfig.register(EViTDeiTConfig.model_type, EViTDeiTConfig, exist_ok=True)
    AutoModel.register(EViTConfig, EViTModel, exist_ok=True)
    AutoModel.register(EViTDeiTConfig, EViTDeiTModel, exist_ok=True)
    AutoModelForImageClassification.register(EViTConfig, EViTForImageClassification, exist_ok=True)
    # Like stock DeiT: `config.architectures` picks between the two heads, the first is the default.
    AutoModelForImageClassification.register(
        EViTDeiTConfig, (EViTDeiTForImageClassification, EViTDeiTForImageClassificationWithTeacher), exist_ok=True
    )

    EViTConfig.register_for_auto_class()
    EViTDeiTConfig.register_for_auto_class()
    EViTModel.register_for_auto_class("AutoModel")
    EViTDeiTModel.register_for_auto_class("AutoModel")
    for model_class in (
        EViTForImageClassification,
        EViTDeiTForImageClassification,
        EViTDeiTForImageClassificationWithTeacher,
    ):
        model_class.register_for_auto_class("AutoModelForImageClassification")
