"""What the EViT models of every family share: the class-token attention row, the reduction layer, the layer loop that
reorganizes tokens, the conversion of a stock model into EViT, and the outputs.

The EViT classes extend the transformers classes without adding parameters: their state dicts have exactly the keys of
the classes they extend, so plain checkpoints load into them and theirs load back into plain models. Only the models,
layers and attention modules change class; layers that reorganize nothing run the stock code.

`save_pretrained` copies this file next to the weights with the family's model file, so it only uses relative imports.
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
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

from .configuration_evit_base import check_keep_rate, keep_rates_by_layer
from .token_reorganization import class_token_attention, num_kept_tokens, reorganize_tokens, track_token_positions


def stock_class(evit_class: type) -> type:
    """The transformers class that an EViT class extends (the first one in its method resolution order)."""
    return next(base for base in evit_class.__mro__ if base.__module__.startswith("transformers."))


def register_stock_key_renaming(*evit_classes: type) -> None:
    """Old Hub checkpoints name the weights `encoder.layer.N.attention.attention.query`, ... (and CLIP vision towers
    saved alone `vision_model.embeddings...`); transformers renames them on load (and back on save) by looking up each
    sub-model's class name. Ours are new names, so they get the renaming of the class they extend."""
    for evit_class in evit_classes:
        stock = stock_class(evit_class)
        # transformers looks a renaming up by class name first, then by the configuration's model type.
        renaming = get_checkpoint_conversion_mapping(stock.__name__)
        if renaming is None:
            renaming = get_checkpoint_conversion_mapping(stock.config_class.model_type)
        if renaming is not None:
            register_checkpoint_conversion_mapping(evit_class.__name__, renaming, overwrite=True)


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
        "Output of the EViT base models: `BaseModelOutputWithPooling` plus the kept tokens.\n"
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


# The forward arguments of the EViT models, documented once: each family's forward lists the ones it takes.
_FORWARD_ARGUMENT_DOCS = {
    "pixel_values": """
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Pixel values, as the checkpoint's image processor returns them{note}.""",
    "bool_masked_pos": """
            bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_patches)`, *optional*):
                Patches replaced by the mask token (ViT: models built with `use_mask_token=True`).""",
    "interpolate_pos_encoding": """
            interpolate_pos_encoding (`bool`, *optional*, defaults to `False`):
                Interpolate the position embeddings to the input size (inputs larger than the checkpoint's).""",
    "attention_mask": """
            attention_mask (`torch.Tensor`, *optional*):
                Only with `keep_rate=1.0`: masks have no meaning once tokens are reorganized.""",
    "keep_rate": """
            keep_rate (`float` or `list[float]`, *optional*):
                Overrides `config.keep_rate` for this call: one rate in (0, 1], or one per reduction layer.""",
    "recorded_outputs": """
            output_hidden_states / output_attentions (`bool`, *optional*):
                See the output's documentation for their varying token counts.""",
    "labels": """
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Labels for the classification loss.""",
}


def forward_doc(*arguments: str, pixel_values_note: str = "") -> str:
    """The `Args:` section of an EViT forward: `pixel_values`, then `arguments` (keys of `_FORWARD_ARGUMENT_DOCS`,
    such as `"bool_masked_pos"`) in the order given, then `keep_rate` and the recorded outputs; `"labels"` goes last.
    `pixel_values_note` adds a family's remark on the input, such as the sizes it accepts."""
    names = [name for name in arguments if name != "labels"] + ["keep_rate", "recorded_outputs"]
    names += ["labels"] if "labels" in arguments else []
    documented = _FORWARD_ARGUMENT_DOCS["pixel_values"].format(note=pixel_values_note)
    documented += "".join(_FORWARD_ARGUMENT_DOCS[name] for name in names)
    return "\n        Args:" + documented + "\n"


def classifier_output(model, logits, labels, outputs, **loss_kwargs) -> EViTImageClassifierOutput:
    """An EViT classifier's output: the loss (given labels), the logits, and the recorded outputs and kept tokens of
    its base model's `outputs`."""
    loss = None if labels is None else model.loss_function(labels, logits, model.config, **loss_kwargs)
    return EViTImageClassifierOutput(
        loss=loss,
        logits=logits,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
        kept_token_indices=outputs.kept_token_indices,
    )


class _ClassAttentionMixin:
    """Attention that can also return the class-token attention row that EViT scores tokens with.

    Every family projects with `q_proj`, `k_proj` and `v_proj`; the rest differs by name, so each family's class says
    which attributes hold the output projection, the logit scaling and the attention dropout, and which eager attention
    function it runs (the family's own, so that eager attention computes what the stock module computes).
    """

    output_projection_name: str = "o_proj"
    scaling_name: str = "scaling"
    dropout_name: str = "attention_dropout"
    eager_attention: staticmethod

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
        query_states, key_states, kwargs = self.position_queries_and_keys(query_states, key_states, kwargs)

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

    def position_queries_and_keys(self, query_states, key_states, kwargs):
        """Queries and keys as the attention compares them, and the keyword arguments left for the attention
        function. Families with rotary position embeddings rotate them here; the others leave them as they are."""
        return query_states, key_states, kwargs


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


def convert_layers_to_evit(encoder: nn.Module) -> None:
    """Turns the layers that an EViT encoder runs (`encoder.layers_name`) into its family's EViT layers, in place: no
    weight or key changes."""
    layer_class = encoder.layer_class
    for layer in encoder.get_submodule(encoder.layers_name):
        layer.__class__ = layer_class
        getattr(layer, layer_class.attention_block[1]).__class__ = layer_class.attention_class


def convert_to_evit(model: nn.Module, evit_class: type) -> None:
    """Turns `model`, a stock model (or an EViT one) of `evit_class`'s stock class, into `evit_class` in place: the
    model, the sub-models in `evit_class.evit_submodels` (base models, DINOv2's encoder) and the layers of its encoders
    change class; no weight or key changes. The EViT constructors (after the stock constructor) and `apply_evit` both
    come here."""
    submodel_classes = {stock_class(submodel): submodel for submodel in evit_class.evit_submodels}
    for module in model.modules():
        new_class = evit_class if module is model else submodel_classes.get(type(module))
        if new_class is not None and type(module) is not new_class:
            module.__class__ = new_class
            # transformers looks up what a model records for output_hidden_states/output_attentions by the module.
            _CAN_RECORD_REGISTRY[module] = module._can_record_outputs
        if isinstance(module, _TokenReductionEncoderMixin):
            convert_layers_to_evit(module)


class _EViTModuleMixin(_CheckpointKeyNamesMixin):
    """An EViT model or sub-model: the stock constructor builds the stock modules, which then become EViT ones.

    `evit_submodels` lists the EViT classes of the sub-models that change class with it (its base model, DINOv2's
    encoder); layers of an encoder always do.
    """

    evit_submodels: tuple[type, ...] = ()
    # Every Auto class that loads this model, in the order of its family's record (`evit_hf.FAMILIES` fills it in).
    # `register_for_auto_class` takes one name, so `save_pretrained` adds the others to the folder's `auto_map`: a
    # CLIP model is both `AutoModel` and `AutoModelForZeroShotImageClassification`, and a process without evit_hf
    # (`trust_remote_code=True`, pipelines) loads it through either.
    auto_class_names: tuple[str, ...] = ()

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        convert_to_evit(self, type(self))

    def save_pretrained(self, save_directory, *args, **kwargs):
        if self.is_remote_code() and self.auto_class_names:
            # The name transformers writes for the class registered with `register_for_auto_class`: module.class.
            class_path = f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}"
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.update(dict.fromkeys(self.auto_class_names, class_path))
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)


class _TokenReductionEncoderMixin(_EViTModuleMixin):
    """The layer loop of EViT: stock layers, and token reorganization in the reduction layers. One loop for every
    family; each family's class says where its layers are (`layers_name`, a submodule path), their EViT class
    (`layer_class`) and how many prefix tokens lead the sequence (`num_prefix_tokens`: always kept, never scored)."""

    layers_name: str = "layers"
    layer_class: type
    num_prefix_tokens: int = 1

    def _encode(
        self,
        embedding_output: torch.Tensor,
        attention_mask,
        masks_tokens: bool,
        keep_rate: float | None,
        per_token_inputs=None,
        num_layers: int | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, tuple[torch.LongTensor, ...]]:
        """Runs the layers. `attention_mask` is the backend's mask for the embedding tokens; `masks_tokens` says
        whether the caller passed a mask (a backend may build one, flex's block mask, without any masking).
        `per_token_inputs(token_positions)`, if given, returns the layer keyword arguments that follow the tokens
        (rotary position embeddings) after a reorganization, from each candidate's patch index (-1: fused).
        `num_layers`, if given, runs only the first `num_layers` layers (a vision-language model reads a hidden state
        before the last layer, and the layers after it would change nothing it reads)."""
        reduction_layers = self.config.reduction_layers
        keep_rate = check_keep_rate(self.config.keep_rate if keep_rate is None else keep_rate, reduction_layers)
        layer_keep_rates = keep_rates_by_layer(keep_rate, reduction_layers)  # {layer: its keep rate}
        fuse = self.config.fuse_inattentive_tokens
        prefix = self.num_prefix_tokens

        hidden_states = embedding_output  # [batch, tokens, dim]
        token_positions = None  # [batch, candidates]: patch index of each candidate, -1 for a fused token
        kept_token_indices = []
        layers = self.get_submodule(self.layers_name)
        for index, layer in enumerate(layers if num_layers is None else layers[:num_layers]):
            if index not in reduction_layers:
                hidden_states = layer(hidden_states, attention_mask, **kwargs)
                continue
            num_candidates = hidden_states.shape[1] - prefix
            if token_positions is None:
                token_positions = torch.arange(num_candidates, device=hidden_states.device)
                token_positions = token_positions.expand(hidden_states.shape[0], -1)
            num_keep = num_kept_tokens(num_candidates, layer_keep_rates[index])
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
            if per_token_inputs is not None:
                kwargs.update(per_token_inputs(token_positions))
        return hidden_states, tuple(kept_token_indices)


__all__ = [
    "EViTImageClassifierOutput",
    "EViTModelOutput",
    "classifier_output",
    "convert_layers_to_evit",
    "convert_to_evit",
]
