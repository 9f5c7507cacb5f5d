"""EViT for CLIP: the vision tower (alone, with its projection, in the whole model, under an image classifier); the
text tower is CLIP's. The MetaCLIP 2 models build on the forwards here.

`save_pretrained` copies this file next to the weights, so it only uses relative imports.
"""

from dataclasses import dataclass

import torch
from transformers.models.clip.modeling_clip import (
    CLIPAttention,
    CLIPEncoderLayer,
    CLIPForImageClassification,
    CLIPModel,
    CLIPOutput,
    CLIPVisionModel,
    CLIPVisionModelOutput,
    CLIPVisionModelWithProjection,
    _get_vector_norm,
    eager_attention_forward,
    image_text_contrastive_loss,
)
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_evit_clip import EViTCLIPConfig, EViTCLIPVisionConfig
from .modeling_evit_base import (
    KEPT_TOKEN_INDICES_DOC,
    VARYING_LENGTHS_DOC,
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


@dataclass
class EViTCLIPVisionModelOutput(CLIPVisionModelOutput):
    __doc__ = (
        "Output of [`EViTCLIPVisionModelWithProjection`]: `CLIPVisionModelOutput` plus the kept tokens.\n"
        + KEPT_TOKEN_INDICES_DOC
        + VARYING_LENGTHS_DOC
    )

    kept_token_indices: tuple[torch.LongTensor, ...] | None = None


@dataclass
class EViTCLIPOutput(CLIPOutput):
    __doc__ = (
        "Output of [`EViTCLIPModel`]: `CLIPOutput` plus the kept tokens of the vision tower (also in "
        "`vision_model_output`).\n" + KEPT_TOKEN_INDICES_DOC
    )

    kept_token_indices: tuple[torch.LongTensor, ...] | None = None


CLIP_FORWARD_DOC = forward_doc("interpolate_pos_encoding")


class _CLIPAttentionMixin(_ClassAttentionMixin):
    """The names CLIP-style attention modules give their output projection, logit scaling and dropout."""

    output_projection_name = "out_proj"
    scaling_name = "scale"
    dropout_name = "dropout"


class _CLIPEncoderLayerMixin(_ReductionLayerMixin):
    """A CLIP-style encoder layer: `layer_norm1`, `self_attn`, residual; `layer_norm2`, `mlp`, residual."""

    attention_block = ("layer_norm1", "self_attn")
    mlp_block = ("layer_norm2", "mlp")


class _CLIPVisionTowerMixin(_TokenReductionEncoderMixin):
    """The forward of a CLIP-style vision tower. `pre_layrnorm` runs on the embeddings as in CLIP; the pooled output
    is `post_layernorm` of the class token after the last layer."""

    layers_name = "encoder.layers"
    num_prefix_tokens = 1

    # Adapted from transformers' CLIPVisionModel.forward
    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = False,
        keep_rate: float | list[float] | None = None,
        **kwargs,
    ) -> EViTModelOutput:
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values.")
        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        hidden_states = self.pre_layrnorm(hidden_states)
        # CLIP's vision tower takes no attention mask.
        hidden_states, kept_token_indices = self._encode(hidden_states, None, False, keep_rate, **kwargs)
        pooled_output = self.post_layernorm(hidden_states[:, 0, :])
        return EViTModelOutput(
            last_hidden_state=hidden_states, pooler_output=pooled_output, kept_token_indices=kept_token_indices
        )

    forward.__doc__ = CLIP_FORWARD_DOC


class _CLIPVisionWithProjectionMixin(_EViTModuleMixin):
    """The forward of a CLIP-style vision tower with its projection."""

    # Adapted from transformers' CLIPVisionModelWithProjection.forward
    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        keep_rate: float | list[float] | None = None,
        **kwargs,
    ) -> EViTCLIPVisionModelOutput:
        vision_outputs = self.vision_model(
            pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, keep_rate=keep_rate, **kwargs
        )
        return EViTCLIPVisionModelOutput(
            image_embeds=self.visual_projection(vision_outputs.pooler_output),
            last_hidden_state=vision_outputs.last_hidden_state,
            hidden_states=vision_outputs.hidden_states,
            attentions=vision_outputs.attentions,
            kept_token_indices=vision_outputs.kept_token_indices,
        )

    forward.__doc__ = CLIP_FORWARD_DOC


class _CLIPModelMixin(_EViTModuleMixin):
    """The forward of a CLIP-style model: `keep_rate` goes to the vision tower only."""

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        keep_rate: float | list[float] | None = None,
        **kwargs,
    ) -> EViTModelOutput:
        vision_outputs = self.vision_model(
            pixel_values=pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            keep_rate=keep_rate,
            return_dict=True,
            **kwargs,
        )
        vision_outputs.pooler_output = self.visual_projection(vision_outputs.pooler_output)  # [batch, projection]
        return vision_outputs

    get_image_features.__doc__ = (
        CLIP_FORWARD_DOC
        + """
        Returns:
            The vision tower's [`EViTModelOutput`] with `pooler_output` projected: the image embeddings.
"""
    )

    # Adapted from transformers' CLIPModel.forward
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        interpolate_pos_encoding: bool = False,
        keep_rate: float | list[float] | None = None,
        **kwargs,
    ) -> EViTCLIPOutput:
        vision_outputs = self.get_image_features(
            pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, keep_rate=keep_rate, **kwargs
        )
        text_outputs = self.get_text_features(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )
        image_embeds = vision_outputs.pooler_output
        text_embeds = text_outputs.pooler_output
        image_embeds = image_embeds / _get_vector_norm(image_embeds)
        text_embeds = text_embeds / _get_vector_norm(text_embeds)

        logits_per_text = torch.matmul(text_embeds, image_embeds.t().to(text_embeds.device))
        logits_per_text = logits_per_text * self.logit_scale.exp().to(text_embeds.device)
        logits_per_image = logits_per_text.t()
        loss = image_text_contrastive_loss(logits_per_text) if return_loss else None
        return EViTCLIPOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
            kept_token_indices=vision_outputs.kept_token_indices,
        )

    forward.__doc__ = (
        CLIP_FORWARD_DOC
        + """
            input_ids, attention_mask, position_ids:
                The text tower's inputs, as for [`CLIPModel`].
            return_loss (`bool`, *optional*):
                Whether to return the contrastive loss.
"""
    )


class _CLIPClassifierMixin(_EViTModuleMixin):
    """The forward of a CLIP-style image classifier: a linear head on the mean of the vision tower's non-prefix tokens
    (the kept tokens and the fused one after reduction), with no `post_layernorm`, as in the stock classifier."""

    # Adapted from transformers' CLIPForImageClassification.forward
    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        keep_rate: float | list[float] | None = None,
        **kwargs,
    ) -> EViTImageClassifierOutput:
        outputs = self.vision_model(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, keep_rate=keep_rate, **kwargs
        )
        prefix = self.vision_model.num_prefix_tokens
        logits = self.classifier(outputs.last_hidden_state[:, prefix:].mean(dim=1))
        return classifier_output(self, logits, labels, outputs)

    forward.__doc__ = forward_doc("interpolate_pos_encoding", "labels")


class EViTCLIPAttention(_CLIPAttentionMixin, CLIPAttention):
    """[`CLIPAttention`] that can also return the class-token attention row."""

    eager_attention = staticmethod(eager_attention_forward)


class EViTCLIPEncoderLayer(_CLIPEncoderLayerMixin, CLIPEncoderLayer):
    """[`CLIPEncoderLayer`] that can reorganize tokens after its attention block."""

    attention_class = EViTCLIPAttention


class EViTCLIPVisionModel(_CLIPVisionTowerMixin, CLIPVisionModel):
    """CLIP vision tower with EViT token reorganization; keys are [`CLIPVisionModel`]'s. `pre_layrnorm` runs on the
    embeddings as in CLIP; the pooled output is `post_layernorm` of the class token after the last layer.

    Example:

    ```python
    >>> from evit_hf import EViTCLIPVisionModel

    >>> model = EViTCLIPVisionModel.from_pretrained("openai/clip-vit-base-patch16", keep_rate=0.7)
    >>> outputs = model(pixel_values)  # outputs.pooler_output, outputs.kept_token_indices
    ```
    """

    config_class = EViTCLIPVisionConfig
    layer_class = EViTCLIPEncoderLayer


class EViTCLIPVisionModelWithProjection(_CLIPVisionWithProjectionMixin, CLIPVisionModelWithProjection):
    """CLIP vision tower and its projection with EViT token reorganization; keys are
    [`CLIPVisionModelWithProjection`]'s."""

    config_class = EViTCLIPVisionConfig
    evit_submodels = (EViTCLIPVisionModel,)


class EViTCLIPModel(_CLIPModelMixin, CLIPModel):
    """CLIP (text and vision towers, projections) whose vision tower reorganizes tokens; the text tower is CLIP's.
    Keys are [`CLIPModel`]'s.

    Example:

    ```python
    >>> from evit_hf import EViTCLIPModel

    >>> model = EViTCLIPModel.from_pretrained("openai/clip-vit-base-patch16", keep_rate=0.7)
    >>> outputs = model(input_ids=input_ids, pixel_values=pixel_values)  # outputs.logits_per_image
    >>> image_embeds = model.get_image_features(pixel_values, keep_rate=0.5).pooler_output
    ```
    """

    config_class = EViTCLIPConfig
    evit_submodels = (EViTCLIPVisionModel,)


class EViTCLIPForImageClassification(_CLIPClassifierMixin, CLIPForImageClassification):
    """CLIP image classifier (a linear head on the mean of the vision tower's patch tokens) with EViT token
    reorganization: the head averages the kept and fused tokens. Keys are [`CLIPForImageClassification`]'s."""

    config_class = EViTCLIPConfig
    evit_submodels = (EViTCLIPVisionModel,)


register_stock_key_renaming(EViTCLIPVisionModel)

__all__ = [
    "EViTCLIPAttention",
    "EViTCLIPEncoderLayer",
    "EViTCLIPForImageClassification",
    "EViTCLIPModel",
    "EViTCLIPOutput",
    "EViTCLIPVisionModel",
    "EViTCLIPVisionModelOutput",
    "EViTCLIPVisionModelWithProjection",
]
