"""Registers the EViT classes with transformers' Auto classes: the one place that does it, run on `import evit_hf`."""

import transformers
from transformers import AutoConfig, AutoImageProcessor

from .families import FAMILIES
from .image_processing_evit import EViTImageProcessor


def register_evit_auto_classes() -> None:
    """Makes `AutoConfig` and the Auto model classes of each family in `FAMILIES` (`family.auto_classes`: `AutoModel`,
    `AutoModelForImageClassification`, `AutoModelForZeroShotImageClassification`, ...) know the EViT model types, and
    makes `save_pretrained` write an `auto_map` and copy the code, so that a process without evit_hf loads saved
    folders with `trust_remote_code=True`."""
    for family in FAMILIES:
        for config_class in family.config_classes:
            AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
            config_class.register_for_auto_class()

        saved_auto_class = {}  # a saved folder's `auto_map` names one Auto class per model: the first it is under
        for auto_class_name, model_classes in family.auto_classes.items():
            auto_class = getattr(transformers, auto_class_name)
            # Where one configuration has several models, `config.architectures` picks; the first is the default.
            by_config = {}
            for model_class in model_classes:
                by_config.setdefault(model_class.config_class, []).append(model_class)
                saved_auto_class.setdefault(model_class, auto_class_name)
            for config_class, models in by_config.items():
                auto_class.register(config_class, models[0] if len(models) == 1 else tuple(models), exist_ok=True)
        for model_class, auto_class_name in saved_auto_class.items():
            model_class.register_for_auto_class(auto_class_name)

        # Converted reference checkpoints save EViTImageProcessor (the reference's crop); their
        # preprocessor_config.json names it, and gets an `auto_map` and the code for processes without evit_hf.
        if family.reference_image_processor:
            for config_class in family.config_classes:
                AutoImageProcessor.register(
                    config_class, image_processor_classes={"pil": EViTImageProcessor}, exist_ok=True
                )
    EViTImageProcessor.register_for_auto_class("AutoImageProcessor")
