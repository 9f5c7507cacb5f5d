"""EViT (token reorganization for Vision Transformers, ICLR 2022) for Hugging Face transformers."""

from .auto_registration import register_evit_auto_classes
from .configuration_evit import EViTConfig
from .configuration_evit_base import default_reduction_layers
from .configuration_evit_clip import EViTCLIPConfig, EViTCLIPVisionConfig
from .configuration_evit_deit import EViTDeiTConfig
from .configuration_evit_dinov2 import EViTDinov2Config, EViTDinov2WithRegistersConfig
from .configuration_evit_dinov3_vit import EViTDINOv3ViTConfig
from .configuration_evit_metaclip_2 import EViTMetaClip2Config, EViTMetaClip2VisionConfig
from .conversion import convert_timm_checkpoint
from .data import digits_dataset
from .evaluation import evaluate_keep_rates, results_markdown
from .families import FAMILIES, EViTFamily
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
from .modeling_evit_metaclip_2 import (
    EViTMetaClip2ForImageClassification,
    EViTMetaClip2Model,
    EViTMetaClip2VisionModel,
    EViTMetaClip2VisionModelWithProjection,
)
from .patch import apply_evit
from .token_reorganization import num_kept_tokens
from .visualization import visualize_kept_tokens


__version__ = "0.1.0"

register_evit_auto_classes()

__all__ = [
    "Accuracy",
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
    "EViTMetaClip2Config",
    "EViTMetaClip2ForImageClassification",
    "EViTMetaClip2Model",
    "EViTMetaClip2VisionConfig",
    "EViTMetaClip2VisionModel",
    "EViTMetaClip2VisionModelWithProjection",
    "EViTModel",
    "EViTModelOutput",
    "FAMILIES",
    "KeepRateScheduler",
    "TopKAccuracy",
    "__version__",
    "apply_evit",
    "classification_metrics",
    "convert_timm_checkpoint",
    "count_macs",
    "create_model_card",
    "default_reduction_layers",
    "digits_dataset",
    "evaluate_keep_rates",
    "num_kept_tokens",
    "register_evit_auto_classes",
    "results_markdown",
    "scheduled_keep_rate",
    "visualize_kept_tokens",
]
