"""EViT for DINOv3 ViT, the family with rotary position embeddings: a kept token keeps its own patch's rotation
through the later layers; the prefix tokens (class, registers) and a fused token are not rotated.

`save_pretrained` copies this file next to the weights, so it only uses relative imports.
"""

import torch
from transformers.models.dinov3_vit.modeling_dinov3_vit import (
    DINOv3ViTAttention,
    DINOv3ViTEncoder,
    DINOv3ViTLayer,
    DINOv3ViTModel,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_evit_dinov3_vit import EViTDINOv3ViTConfig
from .modeling_evit_base import (
    EViTModelOutput,
    _ClassAttentionMixin,
    _EViTModuleMixin,
    _ReductionLayerMixin,
    _TokenReductionEncoderMixin,
    forward_doc,
    register_stock_key_renaming,
)
from .token_reorganization import rotations_for_tokens


class EViTDINOv3ViTAttention(_ClassAttentionMixin, DINOv3ViTAttention):
    """[`DINOv3ViTAttention`] that can also return the class-token attention row, over the rotated keys."""

    dropout_name = "dropout"
    eager_attention = staticmethod(eager_attention_forward)

    def position_queries_and_keys(self, query_states, key_states, kwargs):
        # The stock rotation: per patch ([patches, dim], the prefix left out) or per token ([batch, 1, tokens, dim]).
        kwargs = dict(kwargs)
        cos, sin = kwargs.pop("position_embeddings")
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        return query_states, key_states, kwargs


class EViTDINOv3ViTLayer(_ReductionLayerMixin, DINOv3ViTLayer):
    """[`DINOv3ViTLayer`] that can reorganize tokens after its attention block (after `layer_scale1` and the
    residual)."""

    attention_block = ("norm1", "attention", "layer_scale1", "drop_path")
    mlp_block = ("norm2", "mlp", "layer_scale2", "drop_path")
    attention_class = EViTDINOv3ViTAttention


class EViTDINOv3ViTEncoder(_TokenReductionEncoderMixin, DINOv3ViTEncoder):
    """[`DINOv3ViTEncoder`] with EViT token reorganization: after the first reduction each token gets its own rotation
    (its patch's, or none), gathered per image."""

    layers_name = "layer"
    layer_class = EViTDINOv3ViTLayer

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.config.num_register_tokens

    # Adapted from transformers' DINOv3ViTEncoder.forward
    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        keep_rate: float | list[float] | None = None,
        **kwargs,
    ) -> EViTModelOutput:
        patch_cos, patch_sin = position_embeddings

        def rotations(token_positions):
            return {
                "position_embeddings": rotations_for_tokens(
                    patch_cos, patch_sin, token_positions, self.num_prefix_tokens
                )
            }

        # Until the first reduction the layers get the stock per-patch rotation: keep rate 1 is the stock model.
        hidden_states, kept_token_indices = self._encode(
            hidden_states,
            None,  # DINOv3 takes no attention mask
            False,
            keep_rate,
            per_token_inputs=rotations,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        return EViTModelOutput(last_hidden_state=hidden_states, kept_token_indices=kept_token_indices)


class EViTDINOv3ViTModel(_EViTModuleMixin, DINOv3ViTModel):
    """DINOv3 ViT with EViT token reorganization; keys are [`DINOv3ViTModel`]'s. The pooled output is the class token
    after the final norm.

    Example:

    ```python
    >>> from evit_hf import EViTDINOv3ViTModel

    >>> model = EViTDINOv3ViTModel.from_pretrained("facebook/dinov3-vits16-pretrain-lvd1689m", keep_rate=0.7)
    >>> outputs = model(pixel_values)  # outputs.pooler_output, outputs.kept_token_indices
    ```
    """

    config_class = EViTDINOv3ViTConfig
    evit_submodels = (EViTDINOv3ViTEncoder,)

    # Adapted from transformers' DINOv3ViTModel.forward
    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        keep_rate: float | list[float] | None = None,
        **kwargs,
    ) -> EViTModelOutput:
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.weight.dtype)
        hidden_states = self.embeddings(pixel_values, bool_masked_pos=bool_masked_pos)
        position_embeddings = self.rope_embeddings(pixel_values)
        encoder_outputs = self.model(
            hidden_states, position_embeddings=position_embeddings, keep_rate=keep_rate, **kwargs
        )
        sequence_output = self.norm(encoder_outputs.last_hidden_state)
        return EViTModelOutput(
            last_hidden_state=sequence_output,
            pooler_output=sequence_output[:, 0, :],
            hidden_states=encoder_outputs.hidden_states,
            attentions=encoder_outputs.attentions,
            kept_token_indices=encoder_outputs.kept_token_indices,
        )

    forward.__doc__ = forward_doc("bool_masked_pos")


register_stock_key_renaming(EViTDINOv3ViTModel)

__all__ = ["EViTDINOv3ViTAttention", "EViTDINOv3ViTEncoder", "EViTDINOv3ViTLayer", "EViTDINOv3ViTModel"]
