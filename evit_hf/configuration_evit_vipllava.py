"""EViT configuration of VipLLaVA: LLaVA with image features concatenated from several layers of the CLIP vision
tower, which must all hold the same tokens.

`save_pretrained` copies this file next to the weights, so it only uses relative imports.
"""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, VipLlavaConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_evit_base import default_reduction_layers
from .configuration_evit_clip import EViTCLIPVisionConfig
from .configuration_evit_llava import (
    LLAVA_VISION_DEFAULTS,
    _LlavaSettingsMixin,
    check_feature_layers_schedule,
    feature_hidden_state_indices,
)


def vipllava_default_reduction_layers(num_hidden_layers: int, vision_feature_layer) -> list[int]:
    """The paper's reduction layers for the part of the tower that feeds every feature layer: a tower as deep as the
    first selected layer output (no reduction may fall between the feature layers)."""
    first_output = min(feature_hidden_state_indices(vision_feature_layer, num_hidden_layers))  # layers it runs
    return default_reduction_layers(first_output)


@strict
class EViTVipLlavaConfig(_LlavaSettingsMixin, VipLlavaConfig):
    r"""
    Configuration of an EViT VipLLaVA model ([`EViTVipLlavaForConditionalGeneration`]): a [`VipLlavaConfig`] whose
    `vision_config` is an [`EViTCLIPVisionConfig`] holding the settings. The image features concatenate the tower's
    outputs at `vision_feature_layer` (layers -2, -5, -8, -11 and 6 by default), which must hold the same tokens: a
    schedule with a reduction layer between the first and the last of them is refused. By default the reduction layers
    are the paper's for a tower as deep as the first feature layer (layers 2, 3 and 4 for VipLLaVA-7B).
    """

    model_type = "evit_vipllava"
    source_model_types = ("vipllava",)
    model_class_names = "EViTVipLlavaForConditionalGeneration"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "vision_config": SubConfigSpec(config_class=EViTCLIPVisionConfig, init_kwargs=LLAVA_VISION_DEFAULTS),
    }

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        check_feature_layers_schedule(self.feature_hidden_states, self.vision_config.reduction_layers)

    def default_reduction_layers(self, num_hidden_layers: int) -> list[int]:
        return vipllava_default_reduction_layers(num_hidden_layers, self.vision_feature_layer)


__all__ = ["EViTVipLlavaConfig"]
