"""Vision-language models (LLaVA, VipLLaVA): image tokens per image, the keep rate for a token budget, and the
multiply-accumulates of one prompt (vision tower up to the feature layer, projector, the language model's prefill)."""

from .configuration_evit_base import check_keep_rate, vision_config_of
from .configuration_evit_llava import feature_hidden_state_indices, image_feature_count


# Text tokens of the prompt besides the image tokens, when no prompt length is given (the benchmark's prompt).
DEFAULT_PROMPT_LENGTH = 32


def _is_vision_language(config) -> bool:
    return hasattr(config, "vision_feature_layer") and hasattr(config, "text_config")


def _check_vision_language(config, what: str) -> None:
    if not _is_vision_language(config):
        raise ValueError(
            f"{what} takes the configuration of a vision-language model (LLaVA, VipLLaVA: one with vision_config, "
            f"text_config and vision_feature_layer); got model_type {getattr(config, 'model_type', None)!r}."
        )


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


def _schedule(config, keep_rate=None):
    """(reduction layers, keep rate, fuse) of `config`: its EViT settings, or for a plain LLaVA configuration the
    paper's layers for its tower when a keep rate is given (no reduction otherwise)."""
    from .configuration_evit_base import default_reduction_layers

    vision = vision_config_of(config)
    if hasattr(vision, "reduction_layers"):
        layers = vision.reduction_layers
        rate = vision.keep_rate if keep_rate is None else keep_rate
    else:
        rate = 1.0 if keep_rate is None else keep_rate
        layers = default_reduction_layers(vision.num_hidden_layers) if rate != 1.0 else []
    return layers, check_keep_rate(rate, layers), getattr(vision, "fuse_inattentive_tokens", True)


def num_image_tokens(config, image_size: int | tuple[int, int] | None = None, keep_rate=None) -> int:
    """The image features (and prompt placeholders) of one image for a LLaVA-style model.

    Prefix (the class token with `vision_feature_select_strategy="full"`, none with "default") + the candidate tokens
    left after the reduction layers at or before the feature layer (kept patches, and a fused token when fusing).

    Args:
        config: an [`EViTLlavaConfig`], [`EViTVipLlavaConfig`] or a plain `LlavaConfig` / `VipLlavaConfig` (no
            reduction unless `keep_rate` is given, then the paper's reduction layers for its tower).
        image_size (`int` or `tuple[int, int]`, *optional*): defaults to the vision tower's `image_size`.
        keep_rate (`float` or `list[float]`, *optional*): defaults to the configuration's.

    Returns:
        `int`: 576 for LLaVA-1.5 at keep 1 (336 px, patch 14, strategy "default").
    """
    _check_vision_language(config, "num_image_tokens")
    vision = vision_config_of(config)
    height, width = _pair(image_size if image_size is not None else vision.image_size)
    patch_height, patch_width = _pair(vision.patch_size)
    layers, rate, fuse = _schedule(config, keep_rate)
    return image_feature_count(
        (height // patch_height) * (width // patch_width),
        vision.num_hidden_layers,
        config.vision_feature_layer,
        getattr(config, "vision_feature_select_strategy", "default"),
        layers,
        rate,
        fuse,
    )


def keep_rate_for_image_tokens(config, max_tokens: int, image_size: int | tuple[int, int] | None = None) -> float:
    """The largest uniform keep rate whose image-token count (`num_image_tokens`) stays within `max_tokens` at
    `image_size`: more pixels for the same tokens.

    The count only changes where `ceil(rate * n)` does, so the candidates are the rates `k / n` for the first
    reduction layer's n patches; the search returns the largest one that fits. Raises a `ValueError` if even the
    smallest count (one token kept per reduction layer) exceeds `max_tokens`.
    """
    _check_vision_language(config, "keep_rate_for_image_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive number of image tokens, got {max_tokens!r}.")
    if num_image_tokens(config, image_size, keep_rate=1.0) <= max_tokens:
        return 1.0
    vision = vision_config_of(config)
    height, width = _pair(image_size if image_size is not None else vision.image_size)
    patch_height, patch_width = _pair(vision.patch_size)
    num_patches = (height // patch_height) * (width // patch_width)
    # The count is non-decreasing in the rate: search the rates k / n (where counts can change) from the top.
    for kept in range(num_patches - 1, 0, -1):
        rate = kept / num_patches
        if num_image_tokens(config, image_size, keep_rate=rate) <= max_tokens:
            return rate
    smallest = num_image_tokens(config, image_size, keep_rate=1 / num_patches)
    raise ValueError(
        f"No keep rate gives at most {max_tokens} image tokens at image size {image_size or vision.image_size}: the "
        f"fewest this schedule gives is {smallest}. Allow more tokens or reduce at more layers."
    )


def _language_model_prefill_macs(text_config, tokens: int) -> int:
    """A decoder-only language model's prefill of `tokens` tokens: per layer the query/key/value/output projections
    (grouped key/value heads), the attention products over the prompt (`tokens x tokens` per head dimension, as for
    the vision tower) and the gated MLP (gate, up, down); the LM head on the last token (generation reads only it)."""
    dim = text_config.hidden_size
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or dim // heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    projections = dim * heads * head_dim * 2 + dim * kv_heads * head_dim * 2  # q, o; k, v
    mlp = 3 * dim * text_config.intermediate_size
    per_layer = tokens * (projections + mlp) + 2 * tokens * tokens * heads * head_dim
    return text_config.num_hidden_layers * per_layer + dim * text_config.vocab_size


def _projector_macs(config, num_feature_layers: int) -> int:
    vision_dim, text_dim = vision_config_of(config).hidden_size, config.text_config.hidden_size
    return num_feature_layers * vision_dim * text_dim + text_dim * text_dim


def count_vision_language_macs(config, image_size=None, keep_rate=None, prompt_length: int | None = None) -> int:
    """Multiply-accumulates of one prompt of a LLaVA-style model with one image: the vision tower up to its (last)
    feature layer (as `count_macs` counts a CLIP tower, no head), the projector on the image features, and the
    language model's prefill on `prompt_length` text tokens (default 32) plus the image tokens."""
    from .configuration_evit_clip import EViTCLIPVisionConfig
    from .macs import count_macs

    _check_vision_language(config, "count_vision_language_macs")
    vision = vision_config_of(config)
    layers, rate, fuse = _schedule(config, keep_rate)
    indices = feature_hidden_state_indices(config.vision_feature_layer, vision.num_hidden_layers)
    ran_layers = max(max(indices), 1)
    # The tower as deep as the layers that run, with the reduction layers among them.
    kept_layers = [layer for layer in layers if layer < ran_layers]
    if isinstance(rate, list):
        rates = [r for layer, r in zip(layers, rate, strict=True) if layer < ran_layers]
    else:
        rates = rate
    settings = vision.to_dict()
    for key in ("model_type", "architectures", "keep_rate", "reduction_layers", "fuse_inattentive_tokens"):
        settings.pop(key, None)
    settings.update(
        num_hidden_layers=ran_layers,
        reduction_layers=kept_layers,
        keep_rate=rates if kept_layers or not isinstance(rates, list) else 1.0,
        fuse_inattentive_tokens=fuse,
    )
    tower = EViTCLIPVisionConfig(**settings)
    tower_macs = count_macs(tower, image_size=image_size)
    image_tokens = num_image_tokens(config, image_size, keep_rate=rate)
    text_tokens = DEFAULT_PROMPT_LENGTH if prompt_length is None else prompt_length
    return (
        tower_macs
        + image_tokens * _projector_macs(config, len(indices))
        + _language_model_prefill_macs(config.text_config, image_tokens + text_tokens)
    )


def kv_cache_bytes(config, num_tokens: int, bytes_per_value: int = 4) -> int:
    """Bytes of the language model's key/value cache for `num_tokens` tokens."""
    text = config.text_config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * num_tokens * bytes_per_value


__all__ = [
    "DEFAULT_PROMPT_LENGTH",
    "count_vision_language_macs",
    "keep_rate_for_image_tokens",
    "kv_cache_bytes",
    "num_image_tokens",
]
