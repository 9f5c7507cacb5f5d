"""EViT LLaVA processor: a `LlavaProcessor` that writes as many image placeholders per image as the EViT model gives
image features (kept patches, fused tokens and the class token with strategy "full").

`save_pretrained` copies this file next to the processor's files, so it only uses relative imports.
"""

from transformers import LlavaProcessor, PreTrainedConfig
from transformers.image_utils import get_image_size, to_numpy_array

from .configuration_evit_llava import EViTLlavaConfig, image_feature_count
from .configuration_evit_vipllava import EViTVipLlavaConfig


_EVIT_CONFIGS = {config.model_type: config for config in (EViTLlavaConfig, EViTVipLlavaConfig)}
_EVIT_CONFIGS.update({source: config for config in _EVIT_CONFIGS.values() for source in config.source_model_types})


def schedule_of(model_config) -> dict:
    """What the placeholder count needs of a LLaVA-style model's configuration: the tower's depth, the feature
    layer(s), the selection strategy and the EViT settings."""
    vision = model_config.vision_config
    return {
        "num_hidden_layers": vision.num_hidden_layers,
        "vision_feature_layer": model_config.vision_feature_layer,
        "vision_feature_select_strategy": getattr(model_config, "vision_feature_select_strategy", "default"),
        "reduction_layers": list(vision.reduction_layers),
        "keep_rate": vision.keep_rate,
        "fuse_inattentive_tokens": vision.fuse_inattentive_tokens,
    }


class EViTLlavaProcessor(LlavaProcessor):
    r"""
    [`LlavaProcessor`] for EViT LLaVA and VipLLaVA models: each `<image>` of the prompt becomes as many placeholders as
    the model gives image features for an image of that size (`evit_hf.num_image_tokens`), instead of one per patch.

    `evit_schedule` (saved with the processor) holds what that count needs; `from_pretrained(folder,
    model_config=model.config)` takes it from the model's configuration (without it: from the folder's config.json,
    as `EViTLlavaConfig` reads it).

    Example:

    ```python
    >>> from evit_hf import EViTLlavaForConditionalGeneration, EViTLlavaProcessor

    >>> model = EViTLlavaForConditionalGeneration.from_pretrained("llava-hf/llava-1.5-7b-hf", keep_rate=0.5)
    >>> processor = EViTLlavaProcessor.from_pretrained("llava-hf/llava-1.5-7b-hf", model_config=model.config)
    ```
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        patch_size=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        num_additional_image_tokens=0,
        evit_schedule=None,
        **kwargs,
    ):
        r"""
        evit_schedule (`dict`, *optional*):
            The model's tower depth, feature layer(s), strategy and EViT settings (`schedule_of(model.config)`).
        """
        self.evit_schedule = evit_schedule
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            num_additional_image_tokens=num_additional_image_tokens,
            **kwargs,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, model_config=None, **kwargs):
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if model_config is None and processor.evit_schedule is None:
            model_config = _read_model_config(pretrained_model_name_or_path, kwargs)
        if model_config is not None:
            processor.use_model_config(model_config)
        return processor

    def use_model_config(self, model_config) -> None:
        """Takes the placeholder count's settings (and the patch size and strategy) from a model's configuration."""
        self.evit_schedule = schedule_of(model_config)
        self.patch_size = model_config.vision_config.patch_size
        self.vision_feature_select_strategy = self.evit_schedule["vision_feature_select_strategy"]

    def _image_tokens(self, height: int, width: int) -> int:
        if self.evit_schedule is None:
            raise ValueError(
                "EViTLlavaProcessor needs the model's schedule to count image placeholders: load it with "
                "EViTLlavaProcessor.from_pretrained(folder, model_config=model.config), or call "
                "processor.use_model_config(model.config)."
            )
        schedule = self.evit_schedule
        num_patches = (height // self.patch_size) * (width // self.patch_size)
        return image_feature_count(num_patches, **schedule)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        pixel_values = image_inputs["pixel_values"][image_idx]
        height, width = get_image_size(to_numpy_array(pixel_values))
        return self.image_token * self._image_tokens(height, width)

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        data = super()._get_num_multimodal_tokens(image_sizes=image_sizes, **kwargs)
        if image_sizes is not None:
            crop_size = self.image_processor.crop_size
            count = self._image_tokens(crop_size["height"], crop_size["width"])
            data["num_image_tokens"] = [count] * len(image_sizes)
        return data


def _read_model_config(folder, kwargs):
    """The EViT configuration of the LLaVA-style model in `folder` (a plain one gets the EViT defaults)."""
    hub_kwargs = {key: kwargs[key] for key in ("cache_dir", "revision", "token", "local_files_only") if key in kwargs}
    config_dict, _ = PreTrainedConfig.get_config_dict(folder, **hub_kwargs)
    model_type = (config_dict or {}).get("model_type")
    config_class = _EVIT_CONFIGS.get(model_type)
    if config_class is None:
        raise ValueError(
            f"EViTLlavaProcessor counts placeholders for LLaVA and VipLLaVA models; {folder} holds model_type "
            f"{model_type!r}. Pass model_config=model.config."
        )
    return config_class.from_pretrained(folder, **hub_kwargs)


__all__ = ["EViTLlavaProcessor"]
