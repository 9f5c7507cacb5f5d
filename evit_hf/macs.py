"""Multiply-accumulates of one image's forward pass, from the configuration alone."""

from collections.abc import Iterable

from .configuration_evit_base import check_keep_rate, default_reduction_layers, keep_rates_by_layer, vision_config_of
from .families import FAMILIES, family_for_model_type
from .token_reorganization import num_kept_tokens


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, Iterable) else (value, value)


def count_macs(
    config,
    image_size: int | tuple[int, int] | None = None,
    keep_rate: float | list[float] | None = None,
    **options,
) -> int:
    """Multiply-accumulates of one image through the patch embedding, the layers and the head.

    Counted: the patch-embedding convolution; per layer the query/key/value and output projections, the two attention
    products (`tokens x tokens x dim` each) and the MLP; the reorganization's fusion (`candidates x dim`); the head:
    the classifier of ViT/DeiT (two heads for a distilled DeiT with teacher) and of the DINOv2 classifiers (on the
    class token and the mean of the others), the image projection of CLIP models. Layer norms, softmax, GELU, layer
    scales, means and biases are not counted, as usual. For CLIP models only the vision tower is counted (the text
    tower runs once per text, not per image).

    Args:
        config ([`PreTrainedConfig`]):
            The model's configuration: ViT, DeiT, CLIP (whole or vision tower), DINOv2 (with or without registers), or
            the EViT configuration of one. A plain configuration counts as EViT with the paper's reduction layers when
            `keep_rate` is given, as the stock model otherwise. `config.architectures` says which head a family's
            model has (DeiT with teacher; CLIP vision tower with projection; DINOv2 classifier).
        image_size (`int` or `tuple[int, int]`, *optional*):
            Input size; defaults to `config.image_size`.
        keep_rate (`float` or `list[float]`, *optional*):
            One rate for every reduction layer, or one per reduction layer in ascending layer order. Defaults to
            `config.keep_rate` for EViT configurations, 1.0 otherwise.
        options:
            What a family's own count takes: `prompt_length` (text tokens besides the image tokens, default 32) for
            vision-language models (LLaVA, VipLLaVA), whose count is the vision tower up to the feature layer, the
            projector and the language model's prefill of the prompt.

    Returns:
        `int`: the count (DeiT-S at 224 px: 4.60e9 at keep 1, 3.03e9 at keep 0.7).
    """
    family = family_for_model_type(config.model_type)
    if family is None:
        raise ValueError(
            f"count_macs counts the models of the families in evit_hf.FAMILIES; model_type {config.model_type!r} "
            f"is none of them: pass the configuration of a {', '.join(f.display_name for f in FAMILIES)} model."
        )
    if family.count_macs is not None:
        return family.count_macs(config, image_size, keep_rate, **options)
    if options:
        raise TypeError(f"count_macs takes no {', '.join(options)} for a {family.display_name} model.")
    # CLIP: the vision tower, where the EViT settings live too.
    vision_config = vision_config_of(config)
    height, width = _pair(image_size if image_size is not None else vision_config.image_size)
    patch_height, patch_width = _pair(vision_config.patch_size)
    num_patches = (height // patch_height) * (width // patch_width)
    dim, layers = vision_config.hidden_size, vision_config.num_hidden_layers
    num_prefix_tokens = family.num_prefix_tokens(vision_config)
    if keep_rate is None:
        keep_rate = getattr(vision_config, "keep_rate", 1.0)
    if hasattr(vision_config, "reduction_layers"):  # an EViT configuration (its list may be empty)
        reduction_layers = vision_config.reduction_layers
    else:  # a plain one: the paper's layers when a keep rate is given, the stock model otherwise
        reduction_layers = default_reduction_layers(layers) if keep_rate != 1.0 else []
    layer_keep_rates = keep_rates_by_layer(check_keep_rate(keep_rate, reduction_layers), reduction_layers)
    fuse = getattr(vision_config, "fuse_inattentive_tokens", True)
    mlp_macs_per_token = family.mlp_macs_per_token(vision_config)

    macs = num_patches * vision_config.num_channels * patch_height * patch_width * dim  # patch embedding
    tokens = num_prefix_tokens + num_patches
    for index in range(layers):
        macs += 4 * tokens * dim * dim + 2 * tokens * tokens * dim  # projections, attention products
        if index in reduction_layers:
            candidates = tokens - num_prefix_tokens
            kept = num_kept_tokens(candidates, layer_keep_rates[index])
            if kept < candidates:
                macs += candidates * dim if fuse else 0  # the fused token
                tokens = num_prefix_tokens + kept + int(fuse)
        macs += tokens * mlp_macs_per_token  # MLP
    return macs + family.head_macs(config, dim)


__all__ = ["count_macs"]
