"""EViT (token reorganization for Vision Transformers, ICLR 2022) for Hugging Face transformers."""

from .auto_registration import register_evit_auto_classes
from .configuration_evit import EViTConfig, EViTDeiTConfig, default_reduction_layers
from .modeling_evit import (
    EViTDeiTForImageClassification,
    EViTDeiTForImageClassificationWithTeacher,
    EViTDeiTForImageClassificationWithTeacherOutput,
    EViTDeiTModel,
    EViTForImageClassification,
    EViTImageClassifierOutput,
    EViTModel,
    EViTModelOutput,
)
from .patch import apply_evit
from .token_reorganization import num_kept_tokens


__version__ = "0.1.0"

register_evit_auto_classes()

__all__ = [
    "EViTConfig",
    "EViTDeiTConfig",
    "EViTDeiTForImageClassification",
    "EViTDeiTForImageClassificationWithTeacher",
    "EViTDeiTForImageClassificationWithTeacherOutput",
    "EViTDeiTModel",
    "EViTForImageClassification",
    "EViTImageClassifierOutput",
    "EViTModel",
    "EViTModelOutput",
    "__version__",
    "apply_evit",
    "default_reduction_layers",
    "num_kept_tokens",
    "register_evit_auto_classes",
]
