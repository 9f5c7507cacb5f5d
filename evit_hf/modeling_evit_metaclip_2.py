"""EViT for MetaCLIP 2, whose vision tower is CLIP's: the forwards are those of `modeling_evit_clip.py`.

`save_pretrained` copies this file next to the weights, so it only uses relative imports.
"""

from transformers.models.metaclip_2.modeling_metaclip_2 import (
    MetaClip2Attention,
    MetaClip2EncoderLayer,
    MetaClip2ForImageClassification,
    MetaClip2Model,
    MetaClip2VisionModel,
    MetaClip2VisionModelWithProjection,
    eager_attention_forward,
)

from .configuration_evit_metaclip_2 import EViTMetaClip2Config, EViTMetaClip2VisionConfig
from .modeling_evit_base import register_stock_key_renaming
from .modeling_evit_clip import (
    _CLIPAttentionMixin,
    _CLIPClassifierMixin,
    _CLIPEncoderLayerMixin,
    _CLIPModelMixin,
    _CLIPVisionTowerMixin,
    _CLIPVisionWithProjectionMixin,
)


class EViTMetaClip2Attention(_CLIPAttentionMixin, MetaClip2Attention):
    """[`MetaClip2Attention`] that can also return the class-token attention row."""

    eager_attention = staticmethod(eager_attention_forward)


class EViTMetaClip2EncoderLayer(_CLIPEncoderLayerMixin, MetaClip2EncoderLayer):
    """[`MetaClip2EncoderLayer`] that can reorganize tokens after its attention block."""

    attention_class = EViTMetaClip2Attention


class EViTMetaClip2VisionModel(_CLIPVisionTowerMixin, MetaClip2VisionModel):
    """MetaCLIP 2 vision tower with EViT token reorganization; keys are [`MetaClip2VisionModel`]'s."""

    config_class = EViTMetaClip2VisionConfig
    layer_class = EViTMetaClip2EncoderLayer


class EViTMetaClip2VisionModelWithProjection(_CLIPVisionWithProjectionMixin, MetaClip2VisionModelWithProjection):
    """MetaCLIP 2 vision tower and its projection with EViT token reorganization."""

    config_class = EViTMetaClip2VisionConfig
    evit_submodels = (EViTMetaClip2VisionModel,)


class EViTMetaClip2Model(_CLIPModelMixin, MetaClip2Model):
    """MetaCLIP 2 (text and vision towers, projections) whose vision tower reorganizes tokens."""

    config_class = EViTMetaClip2Config
    evit_submodels = (EViTMetaClip2VisionModel,)


class EViTMetaClip2ForImageClassification(_CLIPClassifierMixin, MetaClip2ForImageClassification):
    """MetaCLIP 2 image classifier (a linear head on the mean of the vision tower's patch tokens) with EViT token
    reorganization: the head averages the kept and fused tokens."""

    config_class = EViTMetaClip2Config
    evit_submodels = (EViTMetaClip2VisionModel,)


register_stock_key_renaming(EViTMetaClip2VisionModel)

__all__ = [
    "EViTMetaClip2Attention",
    "EViTMetaClip2EncoderLayer",
    "EViTMetaClip2ForImageClassification",
    "EViTMetaClip2Model",
    "EViTMetaClip2VisionModel",
    "EViTMetaClip2VisionModelWithProjection",
]
