"""EViT (token reorganization for Vision Transformers, ICLR 2022) for Hugging Face transformers.

The public names load on first use, as transformers' own do: `import evit_hf` imports neither torch nor transformers,
so that `evit-hf` answers argument errors at once. The EViT classes join transformers' Auto classes on the first Auto
lookup (`AutoConfig`, `AutoModel*`, `AutoImageProcessor`, `pipeline`) or the first public name used, whichever comes
first (`auto_registration.register_on_first_use`).
"""

import importlib
from typing import TYPE_CHECKING

from .auto_registration import register_on_first_use


__version__ = "0.1.0"

# Public name -> the submodule that defines it.
_NAMES_BY_MODULE = {
    "auto_registration": ["register_evit_auto_classes"],
    "calibration": ["calibrate_schedule"],
    "configuration_evit": ["EViTConfig"],
    "configuration_evit_base": ["default_reduction_layers"],
    "configuration_evit_clip": ["EViTCLIPConfig", "EViTCLIPVisionConfig"],
    "configuration_evit_deit": ["EViTDeiTConfig"],
    "configuration_evit_dinov2": ["EViTDinov2Config", "EViTDinov2WithRegistersConfig"],
    "configuration_evit_dinov3_vit": ["EViTDINOv3ViTConfig"],
    "configuration_evit_llava": ["EViTLlavaConfig"],
    "configuration_evit_metaclip_2": ["EViTMetaClip2Config", "EViTMetaClip2VisionConfig"],
    "configuration_evit_vipllava": ["EViTVipLlavaConfig"],
    "conversion": ["convert_timm_checkpoint"],
    "data": ["digits_dataset"],
    "distillation": ["DistillationTrainer"],
    "evaluation": ["evaluate_keep_rates", "results_markdown"],
    "families": ["FAMILIES", "EViTFamily"],
    "fine_tuning": ["leave_process_group"],
    "image_processing_evit": ["EViTImageProcessor"],
    "keep_rate_schedule": ["KeepRateScheduler", "scheduled_keep_rate"],
    "macs": ["count_macs"],
    "metrics": ["Accuracy", "TopKAccuracy", "classification_metrics"],
    "model_card": ["create_model_card"],
    "modeling_evit": ["EViTForImageClassification", "EViTModel"],
    "modeling_evit_base": ["EViTImageClassifierOutput", "EViTModelOutput"],
    "modeling_evit_clip": [
        "EViTCLIPForImageClassification",
        "EViTCLIPModel",
        "EViTCLIPOutput",
        "EViTCLIPVisionModel",
        "EViTCLIPVisionModelOutput",
        "EViTCLIPVisionModelWithProjection",
    ],
    "modeling_evit_deit": [
        "EViTDeiTForImageClassification",
        "EViTDeiTForImageClassificationWithTeacher",
        "EViTDeiTForImageClassificationWithTeacherOutput",
        "EViTDeiTModel",
    ],
    "modeling_evit_dinov2": [
        "EViTDinov2ForImageClassification",
        "EViTDinov2Model",
        "EViTDinov2WithRegistersForImageClassification",
        "EViTDinov2WithRegistersModel",
    ],
    "modeling_evit_dinov3_vit": ["EViTDINOv3ViTModel"],
    "modeling_evit_llava": ["EViTLlavaForConditionalGeneration", "EViTLlavaModel"],
    "modeling_evit_metaclip_2": [
        "EViTMetaClip2ForImageClassification",
        "EViTMetaClip2Model",
        "EViTMetaClip2VisionModel",
        "EViTMetaClip2VisionModelWithProjection",
    ],
    "modeling_evit_vipllava": ["EViTVipLlavaForConditionalGeneration", "EViTVipLlavaModel"],
    "patch": ["apply_evit"],
    "planning": ["keep_rate_for_macs"],
    "processing_evit_llava": ["EViTLlavaProcessor"],
    "resolution": ["resize_position_embeddings"],
    "token_reorganization": ["num_kept_tokens"],
    "vision_language": ["keep_rate_for_image_tokens", "num_image_tokens"],
    "visualization": ["visualize_kept_tokens"],
}
_MODULE_BY_NAME = {name: module for module, names in _NAMES_BY_MODULE.items() for name in names}

if TYPE_CHECKING:
    from .auto_registration import register_evit_auto_classes
    from .calibration import calibrate_schedule
    from .configuration_evit import EViTConfig
    from .configuration_evit_base import default_reduction_layers
    from .configuration_evit_clip import EViTCLIPConfig, EViTCLIPVisionConfig
    from .configuration_evit_deit import EViTDeiTConfig
    from .configuration_evit_dinov2 import EViTDinov2Config, EViTDinov2WithRegistersConfig
    from .configuration_evit_dinov3_vit import EViTDINOv3ViTConfig
    from .configuration_evit_llava import EViTLlavaConfig
    from .configuration_evit_metaclip_2 import EViTMetaClip2Config, EViTMetaClip2VisionConfig
    from .configuration_evit_vipllava import EViTVipLlavaConfig
    from .conversion import convert_timm_checkpoint
    from .data import digits_dataset
    from .distillation import DistillationTrainer
    from .evaluation import evaluate_keep_rates, results_markdown
    from .families import FAMILIES, EViTFamily
    from .fine_tuning import leave_process_group
    from .image_processing_evit import EViTImageProcessor
    from .keep_rate_schedule import KeepRateScheduler, scheduled_keep_rate
    from .macs import count_macs
    from .metrics import Accuracy, TopKAccuracy, classification_metrics
    from .model_card import create_model_card
    from .modeling_evit import EViTForImageClassification, EViTModel
    from .modeling_evit_base import EViTImageClassifierOutput, EViTModelOutput
    from .modeling_evit_clip import (
        EViTCLIPForImageClassification,
        EViTCLIPModel,
        EViTCLIPOutput,
        EViTCLIPVisionModel,
        EViTCLIPVisionModelOutput,
        EViTCLIPVisionModelWithProjection,
    )
    from .modeling_evit_deit import (
        EViTDeiTForImageClassification,
        EViTDeiTForImageClassificationWithTeacher,
        EViTDeiTForImageClassificationWithTeacherOutput,
        EViTDeiTModel,
    )
    from .modeling_evit_dinov2 import (
        EViTDinov2ForImageClassification,
        EViTDinov2Model,
        EViTDinov2WithRegistersForImageClassification,
        EViTDinov2WithRegistersModel,
    )
    from .modeling_evit_dinov3_vit import EViTDINOv3ViTModel
    from .modeling_evit_llava import EViTLlavaForConditionalGeneration, EViTLlavaModel
    from .modeling_evit_metaclip_2 import (
        EViTMetaClip2ForImageClassification,
        EViTMetaClip2Model,
        EViTMetaClip2VisionModel,
        EViTMetaClip2VisionModelWithProjection,
    )
    from .modeling_evit_vipllava import EViTVipLlavaForConditionalGeneration, EViTVipLlavaModel
    from .patch import apply_evit
    from .planning import keep_rate_for_macs
    from .processing_evit_llava import EViTLlavaProcessor
    from .resolution import resize_position_embeddings
    from .token_reorganization import num_kept_tokens
    from .vision_language import keep_rate_for_image_tokens, num_image_tokens
    from .visualization import visualize_kept_tokens


def __getattr__(name: str):
    module_name = _MODULE_BY_NAME.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    # A name used from here is a model, a configuration or a tool that builds them: their `save_pretrained` writes an
    # `auto_map` only once the classes are registered, so register now (torch and transformers are loading anyway).
    register_on_first_use.now()
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_BY_NAME))


register_on_first_use.install()

__all__ = [
    "Accuracy",
    "DistillationTrainer",
    "EViTCLIPConfig",
    "EViTCLIPForImageClassification",
    "EViTCLIPModel",
    "EViTCLIPOutput",
    "EViTCLIPVisionConfig",
    "EViTCLIPVisionModel",
    "EViTCLIPVisionModelOutput",
    "EViTCLIPVisionModelWithProjection",
    "EViTConfig",
    "EViTDINOv3ViTConfig",
    "EViTDINOv3ViTModel",
    "EViTDeiTConfig",
    "EViTDeiTForImageClassification",
    "EViTDeiTForImageClassificationWithTeacher",
    "EViTDeiTForImageClassificationWithTeacherOutput",
    "EViTDeiTModel",
    "EViTDinov2Config",
    "EViTDinov2ForImageClassification",
    "EViTDinov2Model",
    "EViTDinov2WithRegistersConfig",
    "EViTDinov2WithRegistersForImageClassification",
    "EViTDinov2WithRegistersModel",
    "EViTFamily",
    "EViTForImageClassification",
    "EViTImageClassifierOutput",
    "EViTImageProcessor",
    "EViTLlavaConfig",
    "EViTLlavaForConditionalGeneration",
    "EViTLlavaModel",
    "EViTLlavaProcessor",
    "EViTMetaClip2Config",
    "EViTMetaClip2ForImageClassification",
    "EViTMetaClip2Model",
    "EViTMetaClip2VisionConfig",
    "EViTMetaClip2VisionModel",
    "EViTMetaClip2VisionModelWithProjection",
    "EViTModel",
    "EViTModelOutput",
    "EViTVipLlavaConfig",
    "EViTVipLlavaForConditionalGeneration",
    "EViTVipLlavaModel",
    "FAMILIES",
    "KeepRateScheduler",
    "TopKAccuracy",
    "__version__",
    "apply_evit",
    "calibrate_schedule",
    "classification_metrics",
    "convert_timm_checkpoint",
    "count_macs",
    "create_model_card",
    "default_reduction_layers",
    "digits_dataset",
    "evaluate_keep_rates",
    "keep_rate_for_image_tokens",
    "keep_rate_for_macs",
    "leave_process_group",
    "num_image_tokens",
    "num_kept_tokens",
    "register_evit_auto_classes",
    "resize_position_embeddings",
    "results_markdown",
    "scheduled_keep_rate",
    "visualize_kept_tokens",
]
