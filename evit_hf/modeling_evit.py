"""EViT for ViT models (and the non-distilled DeiT checkpoints, which the Hub stores as ViT). The DeiT models with a
distillation token build on the forwards here.

`save_pretrained` copies this file next to the weights, so it only uses relative imports.
"""

import torch
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.vit.modeling_vit import (
    ViTAttention,
    ViTForImageClassification,
    ViTLayer,
    ViTModel,
    eager_attention_forward,
)
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_evit import EViTConfig
from .modeling_evit_base import (
    EViTImageClassifierOutput,
    EViTModelOutput,
    _ClassAttentionMixin,
    _EViTModuleMixin,
    _ReductionLayerMixin,
    _TokenReductionEncoderMixin,
    classifier_output,
    forward_doc,
    register_stock_key_renaming,
)


class EViTAttention(_ClassAttentionMixin, ViTAttention):
    """[`ViTAttention`] that can also return the class-token attention row."""

    eager_attention = staticmethod(eager_attention_forward)


class EViTLayer(_ReductionLayerMixin, ViTLayer):
    """[`ViTLayer`] that can reorganize tokens after its attention block."""

    attention_class = EViTAttention


BASE_FORWARD_DOC = forward_doc("bool_masked_pos", "interpolate_pos_encoding", "attention_mask")


class _ViTEncoderMixin(_TokenReductionEncoderMixin):
    """The forward of the EViT ViT and DeiT base models."""

    # Adapted from transformers' ViTModel.forward
    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        keep_rate: float | list[float] | None = None,
        **kwargs,
    ) -> EViTModelOutput:
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values.")
        expected_dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        if pixel_values.dtype != expected_dtype:
            pixel_values = pixel_values.to(expected_dtype)

        embedding_output = self.embeddings(
            pixel_values, bool_masked_pos=bool_masked_pos, interpolate_pos_encoding=interpolate_pos_encoding
        )
        masks_tokens = attention_mask is not None
        attention_mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=embedding_output, attention_mask=attention_mask
        )
        hidden_states, kept_token_indices = self._encode(
            embedding_output, attention_mask, masks_tokens, keep_rate, **kwargs
        )

        sequence_output = self.layernorm(hidden_states)
        pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
        return EViTModelOutput(
            last_hidden_state=sequence_output, pooler_output=pooled_output, kept_token_indices=kept_token_indices
        )

    forward.__doc__ = BASE_FORWARD_DOC


class EViTModel(_ViTEncoderMixin, ViTModel):
    """ViT encoder with EViT token reorganization. Its weights and keys are [`ViTModel`]'s."""

    config_class = EViTConfig
    layer_class = EViTLayer
    num_prefix_tokens = 1


class _ClassTokenClassifierMixin:
    """The forward of the ViT and DeiT classifiers: a linear head on the class token."""

    # Adapted from transformers' ViTForImageClassification.forward
    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        keep_rate: float | list[float] | None = None,
        **kwargs,
    ) -> EViTImageClassifierOutput:
        outputs = self.base_model(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            attention_mask=attention_mask,
            keep_rate=keep_rate,
            **kwargs,
        )
        logits = self.classifier(outputs.last_hidden_state[:, 0, :])
        return classifier_output(self, logits, labels, outputs, **kwargs)

    forward.__doc__ = forward_doc("bool_masked_pos", "interpolate_pos_encoding", "attention_mask", "labels")


class EViTForImageClassification(_ClassTokenClassifierMixin, _EViTModuleMixin, ViTForImageClassification):
    """ViT (or non-distilled DeiT) image classifier with EViT token reorganization; keys are
    [`ViTForImageClassification`]'s.

    Example:

    ```python
    >>> from evit_hf import EViTForImageClassification

    >>> model = EViTForImageClassification.from_pretrained("facebook/deit-small-patch16-224", keep_rate=0.7)
    >>> outputs = model(pixel_values)  # outputs.logits, outputs.kept_token_indices
    >>> outputs = model(pixel_values, keep_rate=0.5)  # same weights, fewer tokens
    ```
    """

    config_class = EViTConfig
    evit_submodels = (EViTModel,)


register_stock_key_renaming(EViTModel)

__all__ = ["EViTAttention", "EViTForImageClassification", "EViTLayer", "EViTModel"]
