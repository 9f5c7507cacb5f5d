"""EViT for VipLLaVA: as LLaVA (`modeling_evit_llava.py`), with image features concatenated from several layers of
the vision tower, which hold the same tokens (no reduction layer between them), in the spec's order.

`save_pretrained` copies this file next to the weights, so it only uses relative imports.
"""

import torch
from transformers.models.vipllava.modeling_vipllava import VipLlavaForConditionalGeneration, VipLlavaModel
from transformers.utils.generic import can_return_tuple

from .configuration_evit_vipllava import EViTVipLlavaConfig
from .modeling_evit_base import EViTModelOutput
from .modeling_evit_clip import EViTCLIPVisionModel
from .modeling_evit_llava import _LlavaStyleMixin


class _VipLlavaImageFeaturesMixin(_LlavaStyleMixin):
    """`get_image_features` of an EViT VipLLaVA model."""

    # Adapted from transformers' VipLlavaModel.get_image_features
    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        keep_rate: float | list[float] | None = None,
        **kwargs,
    ) -> EViTModelOutput:
        r"""
        The image features of the reorganized image tokens (kept patches in ascending patch index, then fused tokens;
        the class token dropped), each feature layer's concatenated, then projected: `pooler_output` is
        `[batch, image features, text hidden size]`.

        keep_rate (`float` or `list[float]`, *optional*):
            Overrides `config.keep_rate` for this call (the prompt must then hold as many placeholders).
        """
        layer = vision_feature_layer if vision_feature_layer is not None else self.config.vision_feature_layer
        selected, image_outputs = self._reorganized_image_tokens(
            pixel_values, layer, keep_class_token=False, keep_rate=keep_rate, **kwargs
        )
        image_outputs.pooler_output = self.multi_modal_projector(selected)
        return image_outputs


class EViTVipLlavaModel(_VipLlavaImageFeaturesMixin, VipLlavaModel):
    """[`VipLlavaModel`] whose CLIP vision tower reorganizes tokens. Keys are [`VipLlavaModel`]'s."""

    config_class = EViTVipLlavaConfig
    evit_submodels = (EViTCLIPVisionModel,)


class EViTVipLlavaForConditionalGeneration(_VipLlavaImageFeaturesMixin, VipLlavaForConditionalGeneration):
    """[`VipLlavaForConditionalGeneration`] whose CLIP vision tower reorganizes tokens. Keys are
    [`VipLlavaForConditionalGeneration`]'s."""

    config_class = EViTVipLlavaConfig
    evit_submodels = (EViTVipLlavaModel, EViTCLIPVisionModel)

    def get_image_features(self, pixel_values, vision_feature_layer=None, **kwargs):
        return self.model.get_image_features(
            pixel_values=pixel_values, vision_feature_layer=vision_feature_layer, **kwargs
        )

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features):
        return self.model.get_placeholder_mask(input_ids, inputs_embeds, image_features)


__all__ = ["EViTVipLlavaForConditionalGeneration", "EViTVipLlavaModel"]
