"""EViT for LLaVA: the CLIP vision tower reorganizes tokens, and the language model reads one image feature per kept
(or fused) token instead of one per patch. The projector and the language model are LLaVA's.

The image features of one image, in this order: the class token (strategy "full" only), the kept patch tokens in
ascending patch index, then the fused tokens in the order the tower holds them. Their number is fixed by the image size
and the schedule (`EViTLlavaConfig.image_feature_count`), so the processor emits that many placeholders per image.

`save_pretrained` copies this file next to the weights, so it only uses relative imports.
"""

import torch
from transformers import CLIPVisionConfig
from transformers.models.llava.modeling_llava import LlavaForConditionalGeneration, LlavaModel
from transformers.utils.generic import can_return_tuple

from .configuration_evit_base import format_keep_rate
from .configuration_evit_llava import EViTLlavaConfig, check_feature_layers_schedule, feature_hidden_state_indices
from .modeling_evit_base import EViTModelOutput, _EViTModuleMixin, convert_to_evit
from .modeling_evit_clip import EViTCLIPVisionModel
from .token_reorganization import candidate_positions, gather_tokens, raster_order


def _stock_vision_config(evit_vision_config) -> CLIPVisionConfig:
    """A plain CLIP vision configuration with the same fields (and attention backend) as the EViT one."""
    evit_settings = ("keep_rate", "reduction_layers", "fuse_inattentive_tokens", "model_type")
    fields = {key: value for key, value in evit_vision_config.to_dict().items() if key not in evit_settings}
    stock = CLIPVisionConfig(**fields)
    stock._attn_implementation_internal = evit_vision_config._attn_implementation_internal
    return stock


class _LlavaStyleMixin(_EViTModuleMixin):
    """What the EViT LLaVA-style models share: construction through the stock constructor, and the reorganized image
    tokens of the vision tower in the spec's order."""

    def __init__(self, config, *args, **kwargs):
        # The stock constructor builds the tower with `AutoModel.from_config(config.vision_config)`, which knows the
        # plain CLIP configuration only (and a process that loads this file as remote code has registered nothing):
        # it builds a plain CLIP tower, which then becomes EViT's, reading the EViT configuration.
        evit_vision_config = config.vision_config
        stock_vision_config = _stock_vision_config(evit_vision_config)
        config.vision_config = stock_vision_config
        try:
            super(_EViTModuleMixin, self).__init__(config, *args, **kwargs)
        finally:
            config.vision_config = evit_vision_config
        evit_vision_config._attn_implementation_internal = stock_vision_config._attn_implementation_internal
        for module in self.modules():
            if getattr(module, "config", None) is stock_vision_config:
                module.config = evit_vision_config
        convert_to_evit(self, type(self))

    @property
    def kept_token_picture_tower(self):
        """The EViT vision tower, whose kept tokens `evit-hf visualize` draws."""
        return self.model.vision_tower if hasattr(self, "model") else self.vision_tower

    def _reorganized_image_tokens(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer,
        keep_class_token: bool,
        keep_rate=None,
        **kwargs,
    ) -> tuple[torch.Tensor, EViTModelOutput]:
        """The tokens of the selected hidden states of the vision tower (concatenated along features), in the spec's
        order: `[batch, image features, dim x feature layers]`, and the tower's output."""
        tower = self.vision_tower
        vision_config = tower.config
        indices = feature_hidden_state_indices(vision_feature_layer, vision_config.num_hidden_layers)
        reduction_layers = vision_config.reduction_layers
        if len(set(indices)) > 1:
            check_feature_layers_schedule(indices, reduction_layers)
        for name in ("output_hidden_states", "output_attentions", "return_dict"):
            kwargs.pop(name, None)
        # Layers after the last feature layer change nothing the model reads: they do not run.
        image_outputs = tower(
            pixel_values,
            keep_rate=keep_rate,
            num_layers=max(max(indices), 1),
            output_hidden_states=sorted(set(indices)),
            return_dict=True,
            **kwargs,
        )
        kept_by_layer = image_outputs.kept_token_indices  # one per reduction layer that ran, in layer order
        ran_reduction_layers = [layer for layer in reduction_layers if layer < max(max(indices), 1)]
        selected = []
        for index in indices:
            hidden_states = image_outputs.hidden_states[index]  # [batch, 1 + candidates, dim]
            # The reduction layers at or before layer index - 1 shaped this hidden state; the last one says which
            # patch each candidate is.
            shaped_by = sum(layer < index for layer in ran_reduction_layers)
            positions = candidate_positions(
                kept_by_layer[shaped_by - 1] if shaped_by else None,
                hidden_states.shape[1] - 1,
                hidden_states.shape[0],
                hidden_states.device,
            )
            tokens = gather_tokens(hidden_states, raster_order(positions), offset=1)  # kept patches, then fused
            if keep_class_token:
                tokens = torch.cat([hidden_states[:, :1], tokens], dim=1)
            selected.append(tokens)
        return torch.cat(selected, dim=-1) if len(selected) > 1 else selected[0], image_outputs

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features):
        """The image placeholders of the prompt, checked against the image features, with an error that names both
        counts and the schedule."""
        if input_ids is None:
            image_embedding = self.get_input_embeddings()(
                torch.full((), self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
            )
            special_image_mask = (inputs_embeds == image_embedding).all(-1)
        else:
            special_image_mask = input_ids == self.config.image_token_id
        num_image_tokens = int(special_image_mask.sum())
        num_image_features = image_features.numel() // inputs_embeds.shape[-1]
        if num_image_tokens != num_image_features:
            per_image = self.config.image_feature_count()
            raise ValueError(
                f"Image features and image tokens do not match: the prompt holds {num_image_tokens} image placeholder "
                f"tokens, the images give {num_image_features} image features ({per_image} per image at keep rate "
                f"{format_keep_rate(self.config.keep_rate)}, reduction layers {self.config.reduction_layers}). Build "
                "the prompt with EViTLlavaProcessor.from_pretrained(folder, model_config=model.config), which emits "
                f"{per_image} placeholders per image."
            )
        return special_image_mask.unsqueeze(-1).to(inputs_embeds.device)


class _LlavaImageFeaturesMixin(_LlavaStyleMixin):
    """`get_image_features` of an EViT LLaVA model."""

    # Adapted from transformers' LlavaModel.get_image_features
    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        keep_rate: float | list[float] | None = None,
        **kwargs,
    ) -> EViTModelOutput:
        r"""
        The image features of the reorganized image tokens, projected: `pooler_output` holds one
        `[image features, text hidden size]` tensor per image (class token with strategy "full", kept patches in
        ascending patch index, fused tokens).

        keep_rate (`float` or `list[float]`, *optional*):
            Overrides `config.keep_rate` for this call (the prompt must then hold as many placeholders).
        """
        if image_sizes is not None:
            raise ValueError(
                "EViT LLaVA reads images of the tower's fixed size and does not take image_sizes (towers that pack "
                "images of several sizes need the whole patch grid)."
            )
        config = self.config
        layer = vision_feature_layer if vision_feature_layer is not None else config.vision_feature_layer
        strategy = vision_feature_select_strategy or config.vision_feature_select_strategy
        selected, image_outputs = self._reorganized_image_tokens(
            pixel_values, layer, keep_class_token=strategy == "full", keep_rate=keep_rate, **kwargs
        )
        image_outputs.pooler_output = list(self.multi_modal_projector(selected))
        return image_outputs


class EViTLlavaModel(_LlavaImageFeaturesMixin, LlavaModel):
    """[`LlavaModel`] whose CLIP vision tower reorganizes tokens (an [`EViTCLIPVisionModel`]): the language model reads
    the kept and fused tokens' features. Keys are [`LlavaModel`]'s."""

    config_class = EViTLlavaConfig
    evit_submodels = (EViTCLIPVisionModel,)


class EViTLlavaForConditionalGeneration(_LlavaImageFeaturesMixin, LlavaForConditionalGeneration):
    """[`LlavaForConditionalGeneration`] whose CLIP vision tower reorganizes tokens: fewer image tokens for the
    language model to read (prefill time, KV cache). Keys are [`LlavaForConditionalGeneration`]'s.

    Example:

    ```python
    >>> from evit_hf import EViTLlavaForConditionalGeneration, EViTLlavaProcessor

    >>> model = EViTLlavaForConditionalGeneration.from_pretrained("llava-hf/llava-1.5-7b-hf", keep_rate=0.5)
    >>> processor = EViTLlavaProcessor.from_pretrained("llava-hf/llava-1.5-7b-hf", model_config=model.config)
    >>> inputs = processor(images=image, text="USER: <image>\\nWhat is shown? ASSISTANT:", return_tensors="pt")
    >>> output_ids = model.generate(**inputs, max_new_tokens=20)
    ```
    """

    config_class = EViTLlavaConfig
    evit_submodels = (EViTLlavaModel, EViTCLIPVisionModel)

    def get_image_features(
        self, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None, **kwargs
    ):
        return self.model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            **kwargs,
        )

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features):
        return self.model.get_placeholder_mask(input_ids, inputs_embeds, image_features)


__all__ = ["EViTLlavaForConditionalGeneration", "EViTLlavaModel"]
