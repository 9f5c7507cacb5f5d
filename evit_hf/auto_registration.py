"""Registers the EViT classes with transformers' Auto classes: the one place that does it, run on `import evit_hf`."""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForZeroShotImageClassification,
)

from .configuration_evit import (
    EViTCLIPConfig,
    EViTCLIPVisionConfig,
    EViTConfig,
    EViTDeiTConfig,
    EViTDinov2Config,
    EViTDinov2WithRegistersConfig,
)
from .image_processing_evit import EViTImageProcessor
from .modeling_evit import (
    EViTCLIPModel,
    EViTCLIPVisionModel,
    EViTCLIPVisionModelWithProjection,
    EViTDeiTForImageClassification,
    EViTDeiTForImageClassificationWithTeacher,
    EViTDeiTModel,
    EViTDinov2ForImageClassification,
    EViTDinov2Model,
    EViTDinov2WithRegistersForImageClassification,
    EViTDinov2WithRegistersModel,
    EViTForImageClassification,
    EViTModel,
)


def register_evit_auto_classes() -> None:
    """Makes `AutoConfig`, `AutoModel`, `AutoModelForImageClassification` (and, for CLIP,
    `AutoModelForZeroShotImageClassification`) know the EViT model types, and makes `save_pretrained` write an
    `auto_map` and copy the code, so that a process without evit_hf loads saved folders with
    `trust_remote_code=True`."""
    for config_class in (
        EViTConfig,
        EViTDeiTConfig,
        EViTCLIPConfig,
        EViTCLIPVisionConfig,
        EViTDinov2Config,
        EViTDinov2WithRegistersConfig,
    ):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        config_class.register_for_auto_class()

    # Where one configuration has two models, `config.architectures` picks (as for stock DeiT); the first is the
    # default.
    base_models = {
        EViTConfig: EViTModel,
        EViTDeiTConfig: EViTDeiTModel,
        EViTCLIPConfig: EViTCLIPModel,
        EViTCLIPVisionConfig: (EViTCLIPVisionModel, EViTCLIPVisionModelWithProjection),
        EViTDinov2Config: EViTDinov2Model,
        EViTDinov2WithRegistersConfig: EViTDinov2WithRegistersModel,
    }
    classifiers = {
        EViTConfig: EViTForImageClassification,
        EViTDeiTConfig: (EViTDeiTForImageClassification, EViTDeiTForImageClassificationWithTeacher),
        EViTDinov2Config: EViTDinov2ForImageClassification,
        EViTDinov2WithRegistersConfig: EViTDinov2WithRegistersForImageClassification,
    }
    for auto_class, models in ((AutoModel, base_models), (AutoModelForImageClassification, classifiers)):
        for config_class, model_classes in models.items():
            auto_class.register(config_class, model_classes, exist_ok=True)
            for model_class in model_classes if isinstance(model_classes, tuple) else (model_classes,):
                model_class.register_for_auto_class(auto_class.__name__)
    # Like stock CLIP, the zero-shot pipeline's Auto class; the saved `auto_map` names AutoModel.
    AutoModelForZeroShotImageClassification.register(EViTCLIPConfig, EViTCLIPModel, exist_ok=True)

    # Converted reference checkpoints save EViTImageProcessor (the reference's crop); their preprocessor_config.json
    # names it, and gets an `auto_map` and the code for processes without evit_hf.
    for config_class in (EViTConfig, EViTDeiTConfig):
        AutoImageProcessor.register(config_class, image_processor_classes={"pil": EViTImageProcessor}, exist_ok=True)
    EViTImageProcessor.register_for_auto_class("AutoImageProcessor")
