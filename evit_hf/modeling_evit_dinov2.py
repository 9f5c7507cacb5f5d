"""EViT for DINOv2, with and without registers (the registers are prefix tokens: kept, never scored).

`save_pretrained` copies this file next to the weights, so it only uses relative imports.
"""

import torch
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.dinov2.modeling_dinov2 import (
    Dinov2Attention,
    Dinov2Encoder,
    Dinov2ForImageClassification,
    Dinov2Layer,
    Dinov2Model,
    eager_attention_forward,
)
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import (
    Dinov2WithRegistersAttention,
    Dinov2WithRegistersEncoder,
    Dinov2WithRegistersForImageClassification,
    Dinov2WithRegistersLayer,
    Dinov2WithRegistersModel,
)
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import (
    eager_attention_forward as registers_eager_attention_forward,
)
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_evit_dinov2 import EViTDinov2Config, EViTDinov2WithRegistersConfig
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


class EViTDinov2Attention(_ClassAttentionMixin, Dinov2Attention):
    """[`Dinov2Attention`] that can also return the class-token attention row."""

    eager_attention = staticmethod(eager_attention_forward)


class EViTDinov2Layer(_ReductionLayerMixin, Dinov2Layer):
    """[`Dinov2Layer`] that can reorganize tokens after its attention block (after `layer_scale1` and the residual)."""

    attention_block = ("norm1", "attention", "layer_scale1", "drop_path")
    mlp_block = ("norm2", "mlp", "layer_scale2", "drop_path")
    attention_class = EViTDinov2Attention


class EViTDinov2WithRegistersAttention(_ClassAttentionMixin, Dinov2WithRegistersAttention):
    """[`Dinov2WithRegistersAttention`] that can also return the class-token attention row."""

    eager_attention = staticmethod(registers_eager_attention_forward)


class EViTDinov2WithRegistersLayer(_ReductionLayerMixin, Dinov2WithRegistersLayer):
    """[`Dinov2WithRegistersLayer`] that can reorganize tokens after its attention block."""

    attention_block = EViTDinov2Layer.attention_block
    mlp_block = EViTDinov2Layer.mlp_block
    attention_class = EViTDinov2WithRegistersAttention


class _Dinov2EncoderMixin(_TokenReductionEncoderMixin):
    """The forward of the EViT DINOv2 encoders. DINOv2 records hidden states and attentions in its encoder (a sub-model
    of its own), so the layer loop runs there, as in the stock model."""

    layers_name = "layer"

    # Adapted from transformers' Dinov2Encoder.forward
    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        masks_tokens: bool = False,
        keep_rate: float | list[float] | None = None,
        **kwargs,
    ) -> EViTModelOutput:
        hidden_states, kept_token_indices = self._encode(
            hidden_states, attention_mask, masks_tokens, keep_rate, **kwargs
        )
        return EViTModelOutput(last_hidden_state=hidden_states, kept_token_indices=kept_token_indices)


class EViTDinov2Encoder(_Dinov2EncoderMixin, Dinov2Encoder):
    """[`Dinov2Encoder`] with EViT token reorganization; the class token is the only prefix token."""

    layer_class = EViTDinov2Layer
    num_prefix_tokens = 1


class EViTDinov2WithRegistersEncoder(_Dinov2EncoderMixin, Dinov2WithRegistersEncoder):
    """[`Dinov2WithRegistersEncoder`] with EViT token reorganization; the class token and the register tokens are
    prefix tokens."""

    layer_class = EViTDinov2WithRegistersLayer

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.config.num_register_tokens


# Any input size: DINOv2 interpolates its position embeddings.
DINOV2_PIXEL_VALUES_NOTE = " (any size: DINOv2\n                interpolates its position embeddings)"
DINOV2_FORWARD_DOC = forward_doc("bool_masked_pos", "attention_mask", pixel_values_note=DINOV2_PIXEL_VALUES_NOTE)


class _Dinov2ModelMixin(_EViTModuleMixin):
    """The EViT DINOv2 base models: the stock embeddings and final norm around an EViT encoder."""

    # Adapted from transformers' Dinov2Model.forward
    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        keep_rate: float | list[float] | None = None,
        **kwargs,
    ) -> EViTModelOutput:
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values.")
        embedding_output = self.embeddings(pixel_values, bool_masked_pos=bool_masked_pos)
        masks_tokens = attention_mask is not None
        attention_mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=embedding_output, attention_mask=attention_mask
        )
        encoder_outputs = self.encoder(
            embedding_output, attention_mask=attention_mask, masks_tokens=masks_tokens, keep_rate=keep_rate, **kwargs
        )
        sequence_output = self.layernorm(encoder_outputs.last_hidden_state)
        return EViTModelOutput(
            last_hidden_state=sequence_output,
            pooler_output=sequence_output[:, 0, :],  # the class token after the final norm
            hidden_states=encoder_outputs.hidden_states,
            attentions=encoder_outputs.attentions,
            kept_token_indices=encoder_outputs.kept_token_indices,
        )

    forward.__doc__ = DINOV2_FORWARD_DOC


class EViTDinov2Model(_Dinov2ModelMixin, Dinov2Model):
    """DINOv2 encoder with EViT token reorganization. Its weights and keys are [`Dinov2Model`]'s.

    Example:

    ```python
    >>> from evit_hf import EViTDinov2Model

    >>> model = EViTDinov2Model.from_pretrained("facebook/dinov2-small", keep_rate=0.7)
    >>> outputs = model(pixel_values)  # outputs.pooler_output, outputs.kept_token_indices
    ```
    """

    config_class = EViTDinov2Config
    evit_submodels = (EViTDinov2Encoder,)


class EViTDinov2WithRegistersModel(_Dinov2ModelMixin, Dinov2WithRegistersModel):
    """DINOv2 encoder with registers and EViT token reorganization; the registers are kept, never scored. Its weights
    and keys are [`Dinov2WithRegistersModel`]'s."""

    config_class = EViTDinov2WithRegistersConfig
    evit_submodels = (EViTDinov2WithRegistersEncoder,)


class _Dinov2ClassifierMixin(_EViTModuleMixin):
    """The EViT DINOv2 image classifiers: a linear head on the class token and the mean of the other non-prefix
    tokens (the kept patches and the fused token), both after the final norm."""

    # Adapted from transformers' Dinov2ForImageClassification.forward
    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        keep_rate: float | list[float] | None = None,
        **kwargs,
    ) -> EViTImageClassifierOutput:
        outputs = self.base_model(pixel_values, attention_mask=attention_mask, keep_rate=keep_rate, **kwargs)
        sequence_output = outputs.last_hidden_state  # [batch, prefix + candidates, dim]
        prefix = self.base_model.encoder.num_prefix_tokens
        linear_input = torch.cat([sequence_output[:, 0], sequence_output[:, prefix:].mean(dim=1)], dim=1)
        logits = self.classifier(linear_input)
        return classifier_output(self, logits, labels, outputs, **kwargs)

    forward.__doc__ = forward_doc(
        "bool_masked_pos", "attention_mask", "labels", pixel_values_note=DINOV2_PIXEL_VALUES_NOTE
    )


class EViTDinov2ForImageClassification(_Dinov2ClassifierMixin, Dinov2ForImageClassification):
    """DINOv2 image classifier with EViT token reorganization; keys are [`Dinov2ForImageClassification`]'s."""

    config_class = EViTDinov2Config
    evit_submodels = (EViTDinov2Model, EViTDinov2Encoder)


class EViTDinov2WithRegistersForImageClassification(_Dinov2ClassifierMixin, Dinov2WithRegistersForImageClassification):
    """DINOv2-with-registers image classifier with EViT token reorganization; keys are
    [`Dinov2WithRegistersForImageClassification`]'s."""

    config_class = EViTDinov2WithRegistersConfig
    evit_submodels = (EViTDinov2WithRegistersModel, EViTDinov2WithRegistersEncoder)


register_stock_key_renaming(EViTDinov2Model, EViTDinov2WithRegistersModel)

__all__ = [
    "EViTDinov2Attention",
    "EViTDinov2Encoder",
    "EViTDinov2ForImageClassification",
    "EViTDinov2Layer",
    "EViTDinov2Model",
    "EViTDinov2WithRegistersAttention",
    "EViTDinov2WithRegistersEncoder",
    "EViTDinov2WithRegistersForImageClassification",
    "EViTDinov2WithRegistersLayer",
    "EViTDinov2WithRegistersModel",
]
