"""EViT for DeiT models with a distillation token: the class and distillation tokens are both prefix tokens, always
kept. The forwards are ViT's (`modeling_evit.py`).

`save_pretrained` copies this file next to the weights, so it only uses relative imports.
"""

from dataclasses import dataclass

import torch
from transformers.models.deit.modeling_deit import (
    DeiTAttention,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTForImageClassificationWithTeacherOutput,
    DeiTLayer,
    DeiTModel,
)
from transformers.models.vit.modeling_vit import eager_attention_forward
from transformers.utils.generic import can_return_tuple

from .configuration_evit_deit import EViTDeiTConfig
from .modeling_evit import BASE_FORWARD_DOC, _ClassTokenClassifierMixin, _ViTEncoderMixin
from .modeling_evit_base import (
    KEPT_TOKEN_INDICES_DOC,
    VARYING_LENGTHS_DOC,
    _ClassAttentionMixin,
    _EViTModuleMixin,
    _ReductionLayerMixin,
    register_stock_key_renaming,
)


@dataclass
class EViTDeiTForImageClassificationWithTeacherOutput(DeiTForImageClassificationWithTeacherOutput):
    __doc__ = (
        "Output of [`EViTDeiTForImageClassificationWithTeacher`]: DeiT's teacher output plus the kept tokens.\n"
        + KEPT_TOKEN_INDICES_DOC
        + VARYING_LENGTHS_DOC
    )

    kept_token_indices: tuple[torch.LongTensor, ...] | None = None


class EViTDeiTAttention(_ClassAttentionMixin, DeiTAttention):
    """[`DeiTAttention`] that can also return the class-token attention row."""

    eager_attention = staticmethod(eager_attention_forward)


class EViTDeiTLayer(_ReductionLayerMixin, DeiTLayer):
    """[`DeiTLayer`] that can reorganize tokens after its attention block."""

    attention_class = EViTDeiTAttention


class EViTDeiTModel(_ViTEncoderMixin, DeiTModel):
    """DeiT encoder (class + distillation token) with EViT token reorganization; both prefix tokens are always kept."""

    config_class = EViTDeiTConfig
    layer_class = EViTDeiTLayer
    num_prefix_tokens = 2


class EViTDeiTForImageClassification(_ClassTokenClassifierMixin, _EViTModuleMixin, DeiTForImageClassification):
    """DeiT image classifier (class head only) with EViT token reorganization; keys are
    [`DeiTForImageClassification`]'s."""

    config_class = EViTDeiTConfig
    evit_submodels = (EViTDeiTModel,)


class EViTDeiTForImageClassificationWithTeacher(_EViTModuleMixin, DeiTForImageClassificationWithTeacher):
    """Distilled DeiT (class and distillation heads, logits averaged) with EViT token reorganization; keys are
    [`DeiTForImageClassificationWithTeacher`]'s. Both prefix tokens are always kept."""

    config_class = EViTDeiTConfig
    evit_submodels = (EViTDeiTModel,)

    # Adapted from transformers' DeiTForImageClassificationWithTeacher.forward
    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        attention_mask: torch.Tensor | None = None,
        keep_rate: float | list[float] | None = None,
        **kwargs,
    ) -> EViTDeiTForImageClassificationWithTeacherOutput:
        outputs = self.deit(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            attention_mask=attention_mask,
            keep_rate=keep_rate,
            **kwargs,
        )
        sequence_output = outputs.last_hidden_state
        cls_logits = self.cls_classifier(sequence_output[:, 0, :])
        distillation_logits = self.distillation_classifier(sequence_output[:, 1, :])
        return EViTDeiTForImageClassificationWithTeacherOutput(
            logits=(cls_logits + distillation_logits) / 2,
            cls_logits=cls_logits,
            distillation_logits=distillation_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            kept_token_indices=outputs.kept_token_indices,
        )

    forward.__doc__ = BASE_FORWARD_DOC


register_stock_key_renaming(EViTDeiTModel)

__all__ = [
    "EViTDeiTAttention",
    "EViTDeiTForImageClassification",
    "EViTDeiTForImageClassificationWithTeacher",
    "EViTDeiTForImageClassificationWithTeacherOutput",
    "EViTDeiTLayer",
    "EViTDeiTModel",
]
