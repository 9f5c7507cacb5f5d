"""EViT models: ViT and DeiT whose reduction layers keep the attentive tokens and fuse the others.

The classes extend the transformers ViT/DeiT classes without adding parameters: their state dicts have exactly the
keys of the classes they extend, so plain checkpoints load into them and theirs load back into plain models. Only the
layers and attention modules change class; layers that reorganize nothing run the stock code.

This file is copied next to the weights by `save_pretrained`, so it only uses relative imports.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    get_model_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.deit.modeling_deit import (
    DeiTAttention,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTForImageClassificationWithTeacherOutput,
    DeiTLayer,
    DeiTModel,
    DeiTPreTrainedModel,
)
from transformers.models.vit.modeling_vit import (
    ViTAttention,
    ViTForImageClassification,
    ViTLayer,
    ViTModel,
    ViTPreTrainedModel,
    eager_attention_forward,
)
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_evit import EViTConfig, EViTDeiTConfig, check_keep_rate
from .token_reorganization import class_token_attention, num_kept_tokens, reorganize_tokens, track_token_positions


# Old Hub checkpoints name the weights `encoder.layer.N.attention.attention.query`, ...; transformers renames them on
# load (and back on save) by looking up each sub-model's class name. Ours are new names, so they get ViT's renaming.
for _class_name in ("EViTModel", "EViTDeiTModel"):
    register_checkpoint_conversion_mapping(_class_name, get_checkpoint_conversion_mapping("ViTModel"), overwrite=True)


class _CheckpointKeyNamesMixin:
    """`load_state_dict` that also reads state dicts in the old key names, the ones `save_pretrained` writes.

    `from_pretrained` renames old keys on load, but `Trainer` resumes from a checkpoint (and loads the best one at the
    end) with a plain `load_state_dict`: without this, every encoder weight of the checkpoint would be "unexpected",
    every model weight "missing", and training would go on from the weights the run started with.
    """

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        own_keys = self.state_dict().keys()
        if not own_keys >= state_dict.keys():
            transforms = get_model_conversion_mapping(self)
            renamings = [transform for transform in transforms if isinstance(transform, WeightRenaming)]
            converters = [transform for transform in transforms if isinstance(transform, WeightConverter)]
            state_dict = {
                key if key in own_keys else rename_source_key(key, renamings, converters)[0]: tensor
                for key, tensor in state_dict.items()
            }
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


KEPT_TOKEN_INDICES_DOC = """
    kept_token_indices (`tuple[torch.LongTensor]`):
        One tensor of shape `(batch_size, k)` per reduction layer, in layer order: the original patch index
        (row-major in the patch grid) of each candidate token that layer kept, in the order the tokens take in the
        hidden states after it (highest class attention first); -1 marks a fused token made by an earlier layer.
"""

VARYING_LENGTHS_DOC = """
    hidden_states (`tuple[torch.FloatTensor]`, *optional*, returned when `output_hidden_states=True`):
        The embedding output and the output of each layer. Their token counts vary: the output of a reduction layer,
        and of every layer after it, has `prefix + k (+ 1 fused)` tokens.
    attentions (`tuple[torch.FloatTensor]`, *optional*, returned when `output_attentions=True`):
        Attention weights per layer (eager attention only; SDPA and flash attention compute none). Each is
        `(batch_size, heads, tokens, tokens)` for the tokens that layer received, so they shrink after each
        reduction layer.
"""


@dataclass
class EViTModelOutput(BaseModelOutputWithPooling):
    __doc__ = (
        "Output of [`EViTModel`] and [`EViTDeiTModel`]: `BaseModelOutputWithPooling` plus the kept tokens.\n"
        + KEPT_TOKEN_INDICES_DOC
        + VARYING_LENGTHS_DOC
    )

    kept_token_indices: tuple[torch.LongTensor, ...] | None = None


@dataclass
class EViTImageClassifierOutput(ImageClassifierOutput):
    __doc__ = (
        "Output of the EViT image classifiers: `ImageClassifierOutput` plus the kept tokens.\n"
        + KEPT_TOKEN_INDICES_DOC
        + VARYING_LENGTHS_DOC
    )

    kept_token_indices: tuple[torch.LongTensor, ...] | None = None


@dataclass
class EViTDeiTForImageClassificationWithTeacherOutput(DeiTForImageClassificationWithTeacherOutput):
    __doc__ = (
        "Output of [`EViTDeiTForImageClassificationWithTeacher`]: DeiT's teacher output plus the kept tokens.\n"
        + KEPT_TOKEN_INDICES_DOC
        + VARYING_LENGTHS_DOC
    )

    kept_token_indices: tuple[torch.LongTensor, ...] | None = None


class _ClassAttentionMixin:
    """Attention that can also return the class-token attention row that EViT scores tokens with."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_class_attention: bool = False,
        **kwargs,
    ):
        if not return_class_attention:
            return super().forward(hidden_states, attention_mask, **kwargs)

        # The stock attention, keeping the queries and keys for the class-token row.
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [batch, heads, tokens, head]
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        dropout = 0.0 if not self.training else self.attention_dropout
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.o_proj(attn_output)

        if self.config._attn_implementation == "eager" and dropout == 0.0:
            # Eager attention built the full matrix anyway: its first row is the softmax the layer used.
            class_attention = attn_weights[:, :, 0]  # [batch, heads, tokens]
        else:
            # SDPA / flash / flex return no weights: one query against all keys, O(tokens) per head.
            class_attention = class_token_attention(query_states, key_states, self.scaling)
        return attn_output, attn_weights, class_attention


class EViTAttention(_ClassAttentionMixin, ViTAttention):
    """[`ViTAttention`] that can also return the class-token attention row."""


class EViTDeiTAttention(_ClassAttentionMixin, DeiTAttention):
    """[`DeiTAttention`] that can also return the class-token attention row."""


class _ReductionLayerMixin:
    """A transformer layer that reorganizes its tokens between the attention and the MLP block when asked to."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        num_keep: int | None = None,
        num_prefix_tokens: int = 1,
        fuse_inattentive_tokens: bool = True,
        **kwargs,
    ):
        r"""
        num_keep (`int`, *optional*):
            Candidate tokens to keep. `None` runs the stock layer and returns only the hidden states.
        num_prefix_tokens (`int`, *optional*, defaults to 1):
            Tokens in front that are always kept (class, and distillation for DeiT).
        fuse_inattentive_tokens (`bool`, *optional*, defaults to `True`):
            Fuse the tokens that are not kept into one, or drop them.

        Returns:
            With `num_keep`, a tuple of the hidden states `[batch, prefix + num_keep (+1), dim]` and the kept
            candidates' indices `[batch, num_keep]`.
        """
        if num_keep is None:
            return super().forward(hidden_states, attention_mask, **kwargs)

        residual = hidden_states
        hidden_states = self.layernorm_before(hidden_states)
        hidden_states, _, class_attention = self.attention(
            hidden_states, attention_mask, return_class_attention=True, **kwargs
        )
        hidden_states = self.dropout(hidden_states)
        hidden_states = hidden_states + residual

        hidden_states, kept_indices = reorganize_tokens(
            hidden_states, class_attention, num_prefix_tokens, num_keep, fuse=fuse_inattentive_tokens
        )

        residual = hidden_states
        hidden_states = self.layernorm_after(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = self.dropout(hidden_states)
        hidden_states = hidden_states + residual
        return hidden_states, kept_indices


class EViTLayer(_ReductionLayerMixin, ViTLayer):
    """[`ViTLayer`] that can reorganize tokens after its attention block."""


class EViTDeiTLayer(_ReductionLayerMixin, DeiTLayer):
    """[`DeiTLayer`] that can reorganize tokens after its attention block."""


def convert_layers_to_evit(base_model: ViTModel | DeiTModel) -> None:
    """Turns the layers of a ViT/DeiT base model into EViT layers, in place: no weight or key changes."""
    is_deit = isinstance(base_model, DeiTModel)
    layer_class, attention_class = (EViTDeiTLayer, EViTDeiTAttention) if is_deit else (EViTLayer, EViTAttention)
    for layer in base_model.layers:
        layer.__class__ = layer_class
        layer.attention.__class__ = attention_class


BASE_FORWARD_DOC = r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Pixel values, as the checkpoint's image processor returns them.
            bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_patches)`, *optional*):
                Patches replaced by the mask token (models built with `use_mask_token=True`).
            interpolate_pos_encoding (`bool`, *optional*):
                Interpolate the position embeddings to the input size (inputs larger than the checkpoint's).
            attention_mask (`torch.Tensor`, *optional*):
                Only with `keep_rate=1.0`: masks have no meaning once tokens are reorganized.
            keep_rate (`float`, *optional*):
                Overrides `config.keep_rate` for this call, in (0, 1].
            output_hidden_states / output_attentions (`bool`, *optional*):
                See the output's documentation for their varying token counts.
"""


class _TokenReductionEncoderMixin(_CheckpointKeyNamesMixin):
    """The layer loop of an EViT base model: stock layers, and token reorganization in the reduction layers."""

    num_prefix_tokens: int = 1

    def __init__(self, config, add_pooling_layer: bool = True, use_mask_token: bool = False):
        super().__init__(config, add_pooling_layer=add_pooling_layer, use_mask_token=use_mask_token)
        convert_layers_to_evit(self)

    def _encode(
        self,
        embedding_output: torch.Tensor,
        attention_mask,
        masks_tokens: bool,
        keep_rate: float | None,
        **kwargs,
    ) -> tuple[torch.Tensor, tuple[torch.LongTensor, ...]]:
        """Runs the layers. `attention_mask` is the backend's mask for the embedding tokens; `masks_tokens` says
        whether the caller passed a mask (a backend may build one, flex's block mask, without any masking)."""
        keep_rate = check_keep_rate(self.config.keep_rate if keep_rate is None else keep_rate)
        fuse = self.config.fuse_inattentive_tokens
        reduction_layers = self.config.reduction_layers
        prefix = self.num_prefix_tokens

        hidden_states = embedding_output  # [batch, tokens, dim]
        token_positions = None  # [batch, candidates]: patch index of each candidate, -1 for a fused token
        kept_token_indices = []
        for index, layer in enumerate(self.layers):
            if index not in reduction_layers:
                hidden_states = layer(hidden_states, attention_mask, **kwargs)
                continue
            num_candidates = hidden_states.shape[1] - prefix
            if token_positions is None:
                token_positions = torch.arange(num_candidates, device=hidden_states.device)
                token_positions = token_positions.expand(hidden_states.shape[0], -1)
            num_keep = num_kept_tokens(num_candidates, keep_rate)
            if num_keep == num_candidates:
                # Keeping every token changes nothing: the stock layer, bit for bit.
                hidden_states = layer(hidden_states, attention_mask, **kwargs)
                kept_token_indices.append(token_positions)
                continue
            if masks_tokens:
                raise ValueError(
                    "attention_mask cannot be combined with token reduction (the tokens it masks are reorganized). "
                    "Pass keep_rate=1.0 to use a mask, or drop the mask."
                )
            # The backend's mask was built for the embedding tokens; with no masking asked for, none is needed.
            attention_mask = None
            hidden_states, kept_indices = layer(
                hidden_states,
                attention_mask,
                num_keep=num_keep,
                num_prefix_tokens=prefix,
                fuse_inattentive_tokens=fuse,
                **kwargs,
            )
            kept_positions, token_positions = track_token_positions(token_positions, kept_indices, fused=fuse)
            kept_token_indices.append(kept_positions)
        return hidden_states, tuple(kept_token_indices)

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        keep_rate: float | None = None,
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


class EViTModel(_TokenReductionEncoderMixin, ViTModel):
    """ViT encoder with EViT token reorganization. Its weights and keys are [`ViTModel`]'s."""

    config_class = EViTConfig
    num_prefix_tokens = 1


class EViTDeiTModel(_TokenReductionEncoderMixin, DeiTModel):
    """DeiT encoder (class + distillation token) with EViT token reorganization; both prefix tokens are always kept."""

    config_class = EViTDeiTConfig
    num_prefix_tokens = 2


def _classification_heads(config) -> nn.Module:
    return nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()


class EViTForImageClassification(_CheckpointKeyNamesMixin, ViTForImageClassification):
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

    def __init__(self, config: EViTConfig):
        ViTPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.vit = EViTModel(config, add_pooling_layer=False)
        self.classifier = _classification_heads(config)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        keep_rate: float | None = None,
        **kwargs,
    ) -> EViTImageClassifierOutput:
        outputs = self.vit(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            attention_mask=attention_mask,
            keep_rate=keep_rate,
            **kwargs,
        )
        logits = self.classifier(outputs.last_hidden_state[:, 0, :])
        loss = None if labels is None else self.loss_function(labels, logits, self.config, **kwargs)
        return EViTImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            kept_token_indices=outputs.kept_token_indices,
        )

    forward.__doc__ = (
        BASE_FORWARD_DOC
        + """
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Labels for the classification loss.
"""
    )


class EViTDeiTForImageClassification(_CheckpointKeyNamesMixin, DeiTForImageClassification):
    """DeiT image classifier (class head only) with EViT token reorganization; keys are
    [`DeiTForImageClassification`]'s."""

    config_class = EViTDeiTConfig

    def __init__(self, config: EViTDeiTConfig):
        DeiTPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.deit = EViTDeiTModel(config, add_pooling_layer=False)
        self.classifier = _classification_heads(config)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        keep_rate: float | None = None,
        **kwargs,
    ) -> EViTImageClassifierOutput:
        outputs = self.deit(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            attention_mask=attention_mask,
            keep_rate=keep_rate,
            **kwargs,
        )
        logits = self.classifier(outputs.last_hidden_state[:, 0, :])
        loss = None if labels is None else self.loss_function(labels, logits, self.config, **kwargs)
        return EViTImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            kept_token_indices=outputs.kept_token_indices,
        )

    forward.__doc__ = EViTForImageClassification.forward.__doc__


class EViTDeiTForImageClassificationWithTeacher(_CheckpointKeyNamesMixin, DeiTForImageClassificationWithTeacher):
    """Distilled DeiT (class and distillation heads, logits averaged) with EViT token reorganization; keys are
    [`DeiTForImageClassificationWithTeacher`]'s. Both prefix tokens are always kept."""

    config_class = EViTDeiTConfig

    def __init__(self, config: EViTDeiTConfig):
        DeiTPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.deit = EViTDeiTModel(config, add_pooling_layer=False)
        self.cls_classifier = _classification_heads(config)
        self.distillation_classifier = _classification_heads(config)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        attention_mask: torch.Tensor | None = None,
        keep_rate: float | None = None,
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


__all__ = [
    "EViTAttention",
    "EViTDeiTAttention",
    "EViTDeiTForImageClassification",
    "EViTDeiTForImageClassificationWithTeacher",
    "EViTDeiTForImageClassificationWithTeacherOutput",
    "EViTDeiTLayer",
    "EViTDeiTModel",
    "EViTForImageClassification",
    "EViTImageClassifierOutput",
    "EViTLayer",
    "EViTModel",
    "EViTModelOutput",
    "convert_layers_to_evit",
]
