"""EViT configuration of LLaVA (a CLIP vision tower, a projector and a language model), and the count of image
features per image that the processor and the model agree on.

`save_pretrained` copies this file next to the weights, so it only uses relative imports.
"""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, LlavaConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_evit_base import (
    _VisionSettingsMixin,
    check_keep_rate,
    default_reduction_layers,
    keep_rates_by_layer,
)
from .configuration_evit_clip import EViTCLIPVisionConfig
from .token_reorganization import num_kept_tokens


# The vision towers whose image features EViT reorganizes: CLIP's (a class token scores the patches).
CLIP_TOWER_MODEL_TYPES = ("clip_vision_model", EViTCLIPVisionConfig.model_type)
# LLaVA-1.5's tower (CLIP ViT-L/14 at 336 px), as transformers' LlavaConfig builds it by default.
LLAVA_VISION_DEFAULTS = {
    "intermediate_size": 4096,
    "hidden_size": 1024,
    "patch_size": 14,
    "image_size": 336,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "vocab_size": 32000,
    "projection_dim": 768,
}

_SETTINGS = ("num_hidden_layers", "reduction_layers", "keep_rate", "fuse_inattentive_tokens")


def feature_hidden_state_indices(vision_feature_layer, num_hidden_layers: int) -> list[int]:
    """The vision tower's hidden states that `vision_feature_layer` (an index or a list, negative from the end)
    selects, as indices in [0, num_hidden_layers]: 0 is the embeddings after `pre_layrnorm`, i the output of layer
    i - 1 (0-based)."""
    layers = [vision_feature_layer] if isinstance(vision_feature_layer, int) else list(vision_feature_layer)
    num_hidden_states = num_hidden_layers + 1
    for layer in layers:
        if not -num_hidden_states <= layer < num_hidden_states:
            raise ValueError(
                f"vision_feature_layer {layer} selects none of the {num_hidden_states} hidden states of a vision "
                f"tower with {num_hidden_layers} layers; use an index in [{-num_hidden_states}, {num_hidden_layers}]."
            )
    return [layer % num_hidden_states for layer in layers]


def check_feature_layers_schedule(hidden_state_indices, reduction_layers) -> None:
    """Several feature layers must hold the same tokens: no reduction layer after the first selected layer output
    and at or before the last one (layers j1 < ... < jm, reduction layer r with j1 < r <= jm)."""
    first, last = min(hidden_state_indices) - 1, max(hidden_state_indices) - 1  # 0-based layer outputs
    between = [layer for layer in reduction_layers if first < layer <= last]
    if between:
        raise ValueError(
            f"The image features concatenate the vision tower's outputs of layers {sorted(set(hidden_state_indices))} "
            f"(hidden-state indices; 0-based layers {first} to {last}), which must hold the same tokens, but "
            f"reduction layers {between} reorganize tokens between them. Use reduction layers at or before layer "
            f"{first}, or after layer {last} (where they change nothing the model reads)."
        )


def candidates_after_reductions(num_patches: int, reduction_layers, keep_rate, fuse: bool, last_layer: int) -> int:
    """The candidate tokens (patches, kept and fused) left after the reduction layers at or before `last_layer`
    (0-based; -1 for the embeddings), as the vision tower leaves them."""
    layer_keep_rates = keep_rates_by_layer(check_keep_rate(keep_rate, reduction_layers), reduction_layers)
    candidates = num_patches
    for layer in sorted(reduction_layers):
        if layer > last_layer:
            break
        kept = num_kept_tokens(candidates, layer_keep_rates[layer])
        if kept < candidates:
            candidates = kept + int(fuse)
    return candidates


def image_feature_count(
    num_patches: int,
    num_hidden_layers: int,
    vision_feature_layer,
    vision_feature_select_strategy: str,
    reduction_layers,
    keep_rate,
    fuse_inattentive_tokens: bool,
) -> int:
    """The image features of one image: the class token with strategy "full", then the candidates left after the
    reduction layers at or before the (first) feature layer."""
    indices = feature_hidden_state_indices(vision_feature_layer, num_hidden_layers)
    candidates = candidates_after_reductions(
        num_patches, reduction_layers, keep_rate, fuse_inattentive_tokens, min(indices) - 1
    )
    return candidates + int(vision_feature_select_strategy == "full")


def check_clip_tower(vision_config, model_name: str) -> None:
    """Refuses a vision tower other than CLIP's, saying why."""
    model_type = vision_config.get("model_type") if isinstance(vision_config, dict) else vision_config.model_type
    if model_type is None or model_type in CLIP_TOWER_MODEL_TYPES:
        return
    reason = (
        "it has no class token (it pools with an attention head), so there is no class-token attention to score the "
        "patch tokens with"
        if model_type.startswith("siglip")
        else "EViT reorganizes the tokens of CLIP vision towers only"
    )
    raise ValueError(
        f"{model_name} needs a CLIP vision tower (model_type 'clip_vision_model'), but vision_config is "
        f"{model_type!r}: {reason}. Use a LLaVA checkpoint with a CLIP tower."
    )


class _LlavaSettingsMixin(_VisionSettingsMixin):
    """A LLaVA-style configuration whose vision tower is an EViT CLIP tower, which holds the settings."""

    def __post_init__(self, **kwargs):
        if self.vision_config is None:
            self.vision_config = dict(self.sub_configs_defaults["vision_config"].init_kwargs)
        check_clip_tower(self.vision_config, type(self).__name__)
        # The settings go to the vision configuration's constructor together, which takes a depth, reduction layers
        # and per-layer keep rates that only fit each other (set one by one, the first would be refused).
        settings = {key: kwargs.pop(key) for key in _SETTINGS if key in kwargs}
        if not isinstance(self.vision_config, dict):
            self.vision_config = self.vision_config.to_dict()
        vision_config = {**self.vision_config, **settings}
        if vision_config.get("reduction_layers") is None:
            depth = vision_config.get("num_hidden_layers", LLAVA_VISION_DEFAULTS["num_hidden_layers"])
            vision_config["reduction_layers"] = self.default_reduction_layers(depth)
        self.vision_config = vision_config
        super().__post_init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        # `from_pretrained` keyword arguments would be set one by one on the built configuration; reduction layers and
        # per-layer keep rates that only fit each other go to the constructor instead (see `__post_init__`).
        settings = {key: kwargs.pop(key) for key in _SETTINGS if key in kwargs}
        if settings:
            vision_config = config_dict.get("vision_config")
            vision_config = vision_config.to_dict() if hasattr(vision_config, "to_dict") else dict(vision_config or {})
            if "num_hidden_layers" in settings and "reduction_layers" not in settings:
                vision_config.pop("reduction_layers", None)  # the new depth's defaults
            config_dict = {**config_dict, "vision_config": {**vision_config, **settings}}
        return super().from_dict(config_dict, **kwargs)

    def default_reduction_layers(self, num_hidden_layers: int) -> list[int]:
        """The reduction layers when none are given: the paper's for a tower of that depth."""
        return default_reduction_layers(num_hidden_layers)

    @property
    def feature_hidden_states(self) -> list[int]:
        """The vision tower's hidden states the image features read (indices in [0, layers])."""
        return feature_hidden_state_indices(self.vision_feature_layer, self.vision_config.num_hidden_layers)

    def image_feature_count(self, image_size=None, keep_rate=None) -> int:
        """The image features (and placeholders) of one image of `image_size` (default: the tower's) at `keep_rate`
        (default: the configuration's)."""
        vision = self.vision_config
        height, width = _pair(image_size if image_size is not None else vision.image_size)
        patch_height, patch_width = _pair(vision.patch_size)
        return image_feature_count(
            (height // patch_height) * (width // patch_width),
            vision.num_hidden_layers,
            self.vision_feature_layer,
            getattr(self, "vision_feature_select_strategy", "default"),
            vision.reduction_layers,
            vision.keep_rate if keep_rate is None else keep_rate,
            vision.fuse_inattentive_tokens,
        )


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


@strict
class EViTLlavaConfig(_LlavaSettingsMixin, LlavaConfig):
    r"""
    Configuration of an EViT LLaVA model ([`EViTLlavaForConditionalGeneration`]): a [`LlavaConfig`] whose
    `vision_config` is an [`EViTCLIPVisionConfig`], which holds `keep_rate`, `reduction_layers` (0-based layers of the
    vision tower; the paper's for its depth by default) and `fuse_inattentive_tokens`, read and assigned here as in
    [`EViTCLIPConfig`]. Only reduction layers at or before the feature layer (`vision_feature_layer`) change the image
    features; the tower's layers after it do not run. Towers other than CLIP's (SigLIP has no class token) are
    refused.

    Example:

    ```python
    >>> from evit_hf import EViTLlavaConfig

    >>> config = EViTLlavaConfig(keep_rate=0.5)  # LLaVA-1.5 shape: 576 patches -> 3 reductions -> 73 + 1 fused
    >>> config.image_feature_count()
    ```"""

    model_type = "evit_llava"
    source_model_types = ("llava",)
    model_class_names = "EViTLlavaForConditionalGeneration"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=EViTCLIPVisionConfig, init_kwargs=LLAVA_VISION_DEFAULTS),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }


__all__ = ["EViTLlavaConfig"]
