"""Multiply-accumulates of one image's forward pass, from the configuration alone."""

from collections.abc import Iterable

from .configuration_evit import default_reduction_layers
from .token_reorganization import num_kept_tokens


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, Iterable) else (value, value)


def count_macs(config, image_size: int | tuple[int, int] | None = None, keep_rate: float | None = None) -> int:
    """Multiply-accumulates of one image through the patch embedding, the layers and the classification head.

    Counted: the patch-embedding convolution; per layer the query/key/value and output projections, the two attention
    products (`tokens x tokens x dim` each) and the MLP; the reorganization's fusion (`candidates x dim`); the head
    (two heads for a distilled DeiT with teacher). Layer norms, softmax, GELU and biases are not counted, as usual.

    Args:
        config ([`ViTConfig`], [`DeiTConfig`], [`EViTConfig`] or [`EViTDeiTConfig`]):
            The model's configuration. A plain ViT/DeiT configuration counts as EViT with the paper's reduction layers
            when `keep_rate` is given, as the stock model otherwise.
        image_size (`int` or `tuple[int, int]`, *optional*):
            Input size; defaults to `config.image_size`.
        keep_rate (`float`, *optional*):
            Defaults to `config.keep_rate` for EViT configurations, 1.0 otherwise.

    Returns:
        `int`: the count (DeiT-S at 224 px: 4.60e9 at keep 1, 3.03e9 at keep 0.7).
    """
    height, width = _pair(image_size if image_size is not None else config.image_size)
    patch_height, patch_width = _pair(config.patch_size)
    num_patches = (height // patch_height) * (width // patch_width)
    dim, mlp_dim, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    num_prefix_tokens = 2 if config.model_type in ("deit", "evit_deit") else 1
    if keep_rate is None:
        keep_rate = getattr(config, "keep_rate", 1.0)
    reduction_layers = getattr(config, "reduction_layers", None) or default_reduction_layers(layers)
    if not hasattr(config, "reduction_layers") and keep_rate == 1.0:
        reduction_layers = []
    fuse = getattr(config, "fuse_inattentive_tokens", True)

    macs = num_patches * config.num_channels * patch_height * patch_width * dim  # patch embedding
    tokens = num_prefix_tokens + num_patches
    for index in range(layers):
        macs += 4 * tokens * dim * dim + 2 * tokens * tokens * dim  # projections, attention products
        if index in reduction_layers:
            candidates = tokens - num_prefix_tokens
            kept = num_kept_tokens(candidates, keep_rate)
            if kept < candidates:
                macs += candidates * dim if fuse else 0  # the fused token
                tokens = num_prefix_tokens + kept + int(fuse)
        macs += 2 * tokens * dim * mlp_dim  # MLP
    heads = 2 if "WithTeacher" in "".join(getattr(config, "architectures", None) or []) else 1
    return macs + heads * dim * max(config.num_labels, 0)


__all__ = ["count_macs"]
