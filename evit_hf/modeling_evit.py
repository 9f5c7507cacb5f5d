"""EViT models: ViT, DeiT, CLIP vision towers and DINOv2 (with and without registers) whose reduction layers keep the
attentive tokens and fuse the others.

The classes extend the transformers classes without adding parameters: their state dicts have exactly the
keys of the classes they extend, so plain checkpoints load into them and theirs load back into plain models. Only the
layers and attention modules change class; layers that reorganize nothing run the stock code.

This file is copied next to the weights by `save_pretrained`, so it only uses relative imports.
"""

import copy
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
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.clip.modeling_clip import (
    CLIPAttention,
    CLIPEncoderLayer,
    CLIPModel,
    CLIPOutput,
    CLIPPreTrainedModel,
    CLIPTextModel,
    CLIPVisionModel,
    CLIPVisionModelOutput,
    CLIPVisionModelWithProjection,
    _get_vector_norm,
    image_text_contrastive_loss,
)
from transformers.models.clip.modeling_clip import eager_attention_forward as clip_eager_attention_forward
from transformers.models.deit.modeling_deit import (
    DeiTAttention,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTForImageClassificationWithTeacherOutput,
    DeiTLayer,
    DeiTModel,
    DeiTPreTrainedModel,
)
from transformers.models.dinov2.modeling_dinov2 import (
    Dinov2Attention,
    Dinov2Embeddings,
    Dinov2Encoder,
    Dinov2ForImageClassification,
    Dinov2Layer,
    Dinov2Model,
)
from transformers.models.dinov2.modeling_dinov2 import eager_attention_forward as dinov2_eager_attention_forward
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import (
    Dinov2WithRegistersAttention,
    Dinov2WithRegistersEmbeddings,
    Dinov2WithRegistersEncoder,
    Dinov2WithRegistersForImageClassification,
    Dinov2WithRegistersLayer,
    Dinov2WithRegistersModel,
)
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import (
    eager_attention_forward as dinov2_with_registers_eager_attention_forward,
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

from .configuration_evit import (
    EViTCLIPConfig,
    EViTCLIPVisionConfig,
    EViTConfig,
    EViTDeiTConfig,
    EViTDinov2Config,
    EViTDinov2WithRegistersConfig,
    check_keep_rate,
)
from .token_reorganization import class_token_attention, num_kept_tokens, reorganize_tokens, track_token_positions


# Old Hub checkpoints name the weights `encoder.layer.N.attention.attention.query`, ... (and CLIP vision towers saved
# alone `vision_model.embeddings...`); transformers renames them on load (and back on save) by looking up each
# sub-model's class name. Ours are new names, so they get the renaming of the class they extend.
for _class_name, _stock_class_name in (
    ("EViTModel", "ViTModel"),
    ("EViTDeiTModel", "ViTModel"),
    ("EViTCLIPVisionModel", "CLIPVisionModel"),
    ("EViTDinov2Model", "Dinov2Model"),
    ("EViTDinov2WithRegistersModel", "Dinov2WithRegistersModel"),
):
    register_checkpoint_conversion_mapping(
        _class_name, get_checkpoint_conversion_mapping(_stock_class_name), overwrite=True
    )


class _CheckpointKeyNamesMixin:
    """`load_state_dict` that also reads state dicts in the old key names, the ones `save_pretrained` writes.

    `from_pretrained` renames old keys on load, but `Trainer` resumes from a checkpoint (and loads the best one at the
    end) with a plain `load_state_dict`: without this, every encoder weight of the checkpoint would be "unexpected",
    every model weight "missing", and training would go on from the weights the run started with.
    """

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        own_keys = self.state_dict().keys()
        if not own_keys >= state_dict.keys():
            state_dict = self._in_current_key_names(state_dict, own_keys)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _in_current_key_names(self, state_dict, own_keys) -> dict:
        """The state dict through transformers' conversion mapping for this model, as `from_pretrained` applies it:
        renamings change a key, converters also change tensors (DINOv2's SwiGLU `weights_in` is split in two)."""
        transforms = get_model_conversion_mapping(self)
        renamings = [transform for transform in transforms if isinstance(transform, WeightRenaming)]
        converters = [transform for transform in transforms if isinstance(transform, WeightConverter)]
        by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
        converted, pending = {}, {}
        for key, tensor in state_dict.items():
            if key in own_keys:
                converted[key] = tensor
                continue
            new_key, pattern = rename_source_key(key, renamings, converters)
            if pattern is None:
                converted[new_key] = tensor
            else:  # every source of one target goes to one converter instance
                pending.setdefault(new_key, copy.deepcopy(by_pattern[pattern])).add_tensor(
                    new_key, key, pattern, tensor
                )
        for target, converter in pending.items():
            for name, tensor in converter.convert(target, model=self, config=self.config).items():
                converted[name] = tensor[0] if isinstance(tensor, list) else tensor
        return converted


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
    """Attention that can also return the class-token attention row that EViT scores tokens with.

    Every family projects with `q_proj`, `k_proj` and `v_proj`; the rest differs by name, so each family's class says
    which attributes hold the output projection, the logit scaling and the attention dropout, and which eager attention
    function it runs (the family's own, so that eager attention computes what the stock module computes).
    """

    output_projection_name: str = "o_proj"
    scaling_name: str = "scaling"
    dropout_name: str = "attention_dropout"
    eager_attention = staticmethod(eager_attention_forward)

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
            self.config._attn_implementation, self.eager_attention
        )
        scaling = getattr(self, self.scaling_name)
        dropout = 0.0 if not self.training else getattr(self, self.dropout_name)
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = getattr(self, self.output_projection_name)(attn_output)

        if self.config._attn_implementation == "eager" and dropout == 0.0:
            # Eager attention built the full matrix anyway: its first row is the softmax the layer used.
            class_attention = attn_weights[:, :, 0]  # [batch, heads, tokens]
        else:
            # SDPA / flash / flex return no weights: one query against all keys, O(tokens) per head.
            class_attention = class_token_attention(query_states, key_states, scaling)
        return attn_output, attn_weights, class_attention


class _ReductionLayerMixin:
    """A transformer layer that reorganizes its tokens between the attention and the MLP block when asked to.

    Each family's class names the modules of its two residual branches, in the order they run: `attention_block` is the
    norm, the attention module, then what follows the attention before the residual add (dropout, layer scale, drop
    path); `mlp_block` is everything of the MLP branch before its residual add. `attention_class` is the EViT class of
    its attention module.
    """

    attention_block: tuple[str, ...] = ("layernorm_before", "attention", "dropout")
    mlp_block: tuple[str, ...] = ("layernorm_after", "mlp", "dropout")
    attention_class: type

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
            Tokens in front that are always kept (class, and distillation for DeiT or registers for DINOv2).
        fuse_inattentive_tokens (`bool`, *optional*, defaults to `True`):
            Fuse the tokens that are not kept into one, or drop them.

        Returns:
            With `num_keep`, a tuple of the hidden states `[batch, prefix + num_keep (+1), dim]` and the kept
            candidates' indices `[batch, num_keep]`.
        """
        if num_keep is None:
            return super().forward(hidden_states, attention_mask, **kwargs)

        norm, attention, *after_attention = self.attention_block
        residual = hidden_states
        hidden_states = getattr(self, norm)(hidden_states)
        hidden_states, _, class_attention = getattr(self, attention)(
            hidden_states, attention_mask, return_class_attention=True, **kwargs
        )
        for name in after_attention:
            hidden_states = getattr(self, name)(hidden_states)
        hidden_states = hidden_states + residual

        hidden_states, kept_indices = reorganize_tokens(
            hidden_states, class_attention, num_prefix_tokens, num_keep, fuse=fuse_inattentive_tokens
        )

        residual = hidden_states
        for name in self.mlp_block:
            hidden_states = getattr(self, name)(hidden_states)
        hidden_states = hidden_states + residual
        return hidden_states, kept_indices


class EViTAttention(_ClassAttentionMixin, ViTAttention):
    """[`ViTAttention`] that can also return the class-token attention row."""


class EViTDeiTAttention(_ClassAttentionMixin, DeiTAttention):
    """[`DeiTAttention`] that can also return the class-token attention row."""


class EViTLayer(_ReductionLayerMixin, ViTLayer):
    """[`ViTLayer`] that can reorganize tokens after its attention block."""

    attention_class = EViTAttention


class EViTDeiTLayer(_ReductionLayerMixin, DeiTLayer):
    """[`DeiTLayer`] that can reorganize tokens after its attention block."""

    attention_class = EViTDeiTAttention


class EViTCLIPAttention(_ClassAttentionMixin, CLIPAttention):
    """[`CLIPAttention`] that can also return the class-token attention row."""

    output_projection_name = "out_proj"
    scaling_name = "scale"
    dropout_name = "dropout"
    eager_attention = staticmethod(clip_eager_attention_forward)


class EViTCLIPEncoderLayer(_ReductionLayerMixin, CLIPEncoderLayer):
    """[`CLIPEncoderLayer`] that can reorganize tokens after its attention block."""

    attention_block = ("layer_norm1", "self_attn")
    mlp_block = ("layer_norm2", "mlp")
    attention_class = EViTCLIPAttention


class EViTDinov2Attention(_ClassAttentionMixin, Dinov2Attention):
    """[`Dinov2Attention`] that can also return the class-token attention row."""

    eager_attention = staticmethod(dinov2_eager_attention_forward)


class EViTDinov2Layer(_ReductionLayerMixin, Dinov2Layer):
    """[`Dinov2Layer`] that can reorganize tokens after its attention block (after `layer_scale1` and the residual)."""

    attention_block = ("norm1", "attention", "layer_scale1", "drop_path")
    mlp_block = ("norm2", "mlp", "layer_scale2", "drop_path")
    attention_class = EViTDinov2Attention


class EViTDinov2WithRegistersAttention(_ClassAttentionMixin, Dinov2WithRegistersAttention):
    """[`Dinov2WithRegistersAttention`] that can also return the class-token attention row."""

    eager_attention = staticmethod(dinov2_with_registers_eager_attention_forward)


class EViTDinov2WithRegistersLayer(_ReductionLayerMixin, Dinov2WithRegistersLayer):
    """[`Dinov2WithRegistersLayer`] that can reorganize tokens after its attention block."""

    attention_block = EViTDinov2Layer.attention_block
    mlp_block = EViTDinov2Layer.mlp_block
    attention_class = EViTDinov2WithRegistersAttention


def convert_layers_to_evit(encoder: nn.Module) -> None:
    """Turns the layers that an EViT encoder runs (`encoder.layers_name`) into its family's EViT layers, in place: no
    weight or key changes."""
    layer_class = encoder.layer_class
    for layer in encoder.get_submodule(encoder.layers_name):
        layer.__class__ = layer_class
        getattr(layer, layer_class.attention_block[1]).__class__ = layer_class.attention_class


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
    """The layer loop of EViT: stock layers, and token reorganization in the reduction layers. One loop for every
    family; each family's class says where its layers are (`layers_name`, a submodule path), their EViT class
    (`layer_class`) and how many prefix tokens lead the sequence (`num_prefix_tokens`: always kept, never scored)."""

    layers_name: str = "layers"
    layer_class: type
    num_prefix_tokens: int = 1

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
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
        for index, layer in enumerate(self.get_submodule(self.layers_name)):
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


class _ViTEncoderMixin(_TokenReductionEncoderMixin):
    """The forward of the EViT ViT and DeiT base models."""

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


class EViTModel(_ViTEncoderMixin, ViTModel):
    """ViT encoder with EViT token reorganization. Its weights and keys are [`ViTModel`]'s."""

    config_class = EViTConfig
    layer_class = EViTLayer
    num_prefix_tokens = 1


class EViTDeiTModel(_ViTEncoderMixin, DeiTModel):
    """DeiT encoder (class + distillation token) with EViT token reorganization; both prefix tokens are always kept."""

    config_class = EViTDeiTConfig
    layer_class = EViTDeiTLayer
    num_prefix_tokens = 2


def _classification_heads(config) -> nn.Module:
    return nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()


class _ClassTokenClassifierMixin:
    """The forward of the ViT and DeiT classifiers: a linear head on the class token."""

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
        outputs = self.base_model(
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


class EViTForImageClassification(_ClassTokenClassifierMixin, _CheckpointKeyNamesMixin, ViTForImageClassification):
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


class EViTDeiTForImageClassification(_ClassTokenClassifierMixin, _CheckpointKeyNamesMixin, DeiTForImageClassification):
    """DeiT image classifier (class head only) with EViT token reorganization; keys are
    [`DeiTForImageClassification`]'s."""

    config_class = EViTDeiTConfig

    def __init__(self, config: EViTDeiTConfig):
        DeiTPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.deit = EViTDeiTModel(config, add_pooling_layer=False)
        self.classifier = _classification_heads(config)
        self.post_init()


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


CLIP_FORWARD_DOC = r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Pixel values, as the checkpoint's image processor returns them.
            interpolate_pos_encoding (`bool`, *optional*, defaults to `False`):
                Interpolate the position embeddings to the input size.
            keep_rate (`float`, *optional*):
                Overrides `config.keep_rate` for this call, in (0, 1].
            output_hidden_states / output_attentions (`bool`, *optional*):
                See the output's documentation for their varying token counts.
"""


class EViTCLIPVisionModel(_TokenReductionEncoderMixin, CLIPVisionModel):
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
    layers_name = "encoder.layers"
    layer_class = EViTCLIPEncoderLayer
    num_prefix_tokens = 1

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = False,
        keep_rate: float | None = None,
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


class EViTCLIPVisionModelWithProjection(_CheckpointKeyNamesMixin, CLIPVisionModelWithProjection):
    """CLIP vision tower and its projection with EViT token reorganization; keys are
    [`CLIPVisionModelWithProjection`]'s."""

    config_class = EViTCLIPVisionConfig

    def __init__(self, config: EViTCLIPVisionConfig):
        CLIPPreTrainedModel.__init__(self, config)
        self.vision_model = EViTCLIPVisionModel._from_config(config)
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        keep_rate: float | None = None,
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


class EViTCLIPModel(_CheckpointKeyNamesMixin, CLIPModel):
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

    def __init__(self, config: EViTCLIPConfig):
        CLIPPreTrainedModel.__init__(self, config)
        text_config, vision_config = config.text_config, config.vision_config
        self.projection_dim = config.projection_dim
        self.text_embed_dim = text_config.hidden_size
        self.vision_embed_dim = vision_config.hidden_size
        self.text_model = CLIPTextModel._from_config(text_config)
        self.vision_model = EViTCLIPVisionModel._from_config(vision_config)
        self.visual_projection = nn.Linear(self.vision_embed_dim, self.projection_dim, bias=False)
        self.text_projection = nn.Linear(self.text_embed_dim, self.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(self.config.logit_scale_init_value))
        self.post_init()

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        keep_rate: float | None = None,
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

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        interpolate_pos_encoding: bool = False,
        keep_rate: float | None = None,
        **kwargs,
    ) -> EViTCLIPOutput:
        # As CLIPModel.forward; `keep_rate` goes to the vision tower only.
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


class _Dinov2EncoderMixin(_TokenReductionEncoderMixin):
    """The forward of the EViT DINOv2 encoders. DINOv2 records hidden states and attentions in its encoder (a sub-model
    of its own), so the layer loop runs there, as in the stock model."""

    layers_name = "layer"

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        masks_tokens: bool = False,
        keep_rate: float | None = None,
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


DINOV2_FORWARD_DOC = r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Pixel values, as the checkpoint's image processor returns them (any size: DINOv2 interpolates its
                position embeddings).
            bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_patches)`, *optional*):
                Patches replaced by the mask token.
            attention_mask (`torch.Tensor`, *optional*):
                Only with `keep_rate=1.0`: masks have no meaning once tokens are reorganized.
            keep_rate (`float`, *optional*):
                Overrides `config.keep_rate` for this call, in (0, 1].
            output_hidden_states / output_attentions (`bool`, *optional*):
                See the output's documentation for their varying token counts.
"""


class _Dinov2ModelMixin(_CheckpointKeyNamesMixin):
    """The EViT DINOv2 base models: the stock embeddings and final norm around an EViT encoder."""

    embeddings_class: type
    encoder_class: type

    def __init__(self, config):
        PreTrainedModel.__init__(self, config)
        self.config = config
        self.embeddings = self.embeddings_class(config)
        self.encoder = self.encoder_class(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        keep_rate: float | None = None,
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
    embeddings_class = Dinov2Embeddings
    encoder_class = EViTDinov2Encoder


class EViTDinov2WithRegistersModel(_Dinov2ModelMixin, Dinov2WithRegistersModel):
    """DINOv2 encoder with registers and EViT token reorganization; the registers are kept, never scored. Its weights
    and keys are [`Dinov2WithRegistersModel`]'s."""

    config_class = EViTDinov2WithRegistersConfig
    embeddings_class = Dinov2WithRegistersEmbeddings
    encoder_class = EViTDinov2WithRegistersEncoder


class _Dinov2ClassifierMixin(_CheckpointKeyNamesMixin):
    """The EViT DINOv2 image classifiers: a linear head on the class token and the mean of the other non-prefix
    tokens (the kept patches and the fused token), both after the final norm."""

    base_model_class: type

    def __init__(self, config):
        PreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        setattr(self, self.base_model_prefix, self.base_model_class(config))
        self.classifier = (
            nn.Linear(config.hidden_size * 2, config.num_labels) if config.num_labels > 0 else nn.Identity()
        )
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        keep_rate: float | None = None,
        **kwargs,
    ) -> EViTImageClassifierOutput:
        outputs = self.base_model(pixel_values, attention_mask=attention_mask, keep_rate=keep_rate, **kwargs)
        sequence_output = outputs.last_hidden_state  # [batch, prefix + candidates, dim]
        prefix = self.base_model.encoder.num_prefix_tokens
        linear_input = torch.cat([sequence_output[:, 0], sequence_output[:, prefix:].mean(dim=1)], dim=1)
        logits = self.classifier(linear_input)
        loss = None if labels is None else self.loss_function(labels, logits, self.config, **kwargs)
        return EViTImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            kept_token_indices=outputs.kept_token_indices,
        )

    forward.__doc__ = (
        DINOV2_FORWARD_DOC
        + """
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Labels for the classification loss.
"""
    )


class EViTDinov2ForImageClassification(_Dinov2ClassifierMixin, Dinov2ForImageClassification):
    """DINOv2 image classifier with EViT token reorganization; keys are [`Dinov2ForImageClassification`]'s."""

    config_class = EViTDinov2Config
    base_model_class = EViTDinov2Model


class EViTDinov2WithRegistersForImageClassification(_Dinov2ClassifierMixin, Dinov2WithRegistersForImageClassification):
    """DINOv2-with-registers image classifier with EViT token reorganization; keys are
    [`Dinov2WithRegistersForImageClassification`]'s."""

    config_class = EViTDinov2WithRegistersConfig
    base_model_class = EViTDinov2WithRegistersModel


__all__ = [
    "EViTAttention",
    "EViTCLIPAttention",
    "EViTCLIPEncoderLayer",
    "EViTCLIPModel",
    "EViTCLIPOutput",
    "EViTCLIPVisionModel",
    "EViTCLIPVisionModelOutput",
    "EViTCLIPVisionModelWithProjection",
    "EViTDeiTAttention",
    "EViTDeiTForImageClassification",
    "EViTDeiTForImageClassificationWithTeacher",
    "EViTDeiTForImageClassificationWithTeacherOutput",
    "EViTDeiTLayer",
    "EViTDeiTModel",
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
    "EViTForImageClassification",
    "EViTImageClassifierOutput",
    "EViTLayer",
    "EViTModel",
    "EViTModelOutput",
    "convert_layers_to_evit",
]
