"""Higher resolution at equal cost: learned absolute position embeddings resized once to a new image size."""

import numbers

import torch
from torch import nn

from .configuration_evit_base import vision_config_of


def _position_embedding_modules(model: nn.Module) -> list[nn.Module]:
    """The embedding modules that add learned absolute positions and can interpolate them (`interpolate_pos_encoding`):
    ViT's, DeiT's, CLIP's vision embeddings, DINOv2's (with or without registers). Text embeddings have no such
    method, nor has DINOv3 (rotary positions)."""
    return [module for module in model.modules() if callable(getattr(module, "interpolate_pos_encoding", None))]


def _check_image_size(image_size, patch_size) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < patch_size:
        raise ValueError(
            f"image_size is the new side of the square input in pixels, a whole number >= the patch size "
            f"({patch_size}); got {image_size!r}."
        )
    return int(image_size)


@torch.no_grad()
def resize_position_embeddings(model: nn.Module, image_size: int) -> nn.Module:
    """Resizes a model's learned absolute position embeddings to `image_size` x `image_size` inputs, in place, once.

    The new embeddings are exactly what the stock model computes on the fly with `interpolate_pos_encoding=True` at
    that size (bicubic over the patch grid, prefix positions unchanged), so the model gives the same outputs without
    the flag. DINOv2 (with or without registers), which interpolates by itself at every size, gets the table its own
    interpolation computes at `image_size`: the same outputs at that size, and a table of the size its configuration
    builds. `config.image_size` (the vision configuration's, for CLIP) is updated, and CLIP's position ids, so the
    folder `save_pretrained` writes loads with `from_pretrained` and runs at the new size. Models with rotary
    positions (DINOv3) need no resizing: only their configuration changes. Works on stock and EViT models, any number
    of times; a frozen table stays frozen. The table is a new parameter: build the optimizer after resizing.

    Args:
        model (`nn.Module`): a ViT, DeiT, CLIP (whole, vision tower or classifier), DINOv2 or DINOv3 model.
        image_size (`int`): the new input side in pixels.

    Returns:
        The same `model`.

    Example:

    ```python
    >>> model = EViTForImageClassification.from_pretrained("facebook/deit-small-patch16-224")
    >>> resize_position_embeddings(model, 288)  # now takes 288 x 288 inputs; config.image_size == 288
    ```
    """
    config = vision_config_of(model.config)
    patch_size = config.patch_size if isinstance(config.patch_size, int) else max(config.patch_size)
    image_size = _check_image_size(image_size, patch_size)
    for embeddings in _position_embedding_modules(model):
        if isinstance(getattr(embeddings, "position_embedding", None), nn.Embedding):
            _resize_embedding_table(embeddings, image_size)
        else:
            _resize_position_parameter(embeddings, image_size)
    config.image_size = image_size
    return model


def _new_positions(embeddings: nn.Module, num_prefix_positions: int, image_size: int, dim: int) -> torch.Tensor:
    """The stock interpolation's result at `image_size`: `[1, prefix + patches, dim]`. Only the token count of the
    first argument matters to it."""
    grid = image_size // embeddings.patch_size
    tokens = torch.zeros(1, num_prefix_positions + grid * grid, dim)
    return embeddings.interpolate_pos_encoding(tokens, image_size, image_size)


def _resize_position_parameter(embeddings: nn.Module, image_size: int) -> None:
    # ViT, DeiT, DINOv2: `position_embeddings` [1, prefix + patches, dim]; DeiT has two prefix positions (DINOv2's
    # registers have none). DINOv2 builds the table from `config.image_size`: a folder whose size changed without its
    # table would not load.
    old = embeddings.position_embeddings
    patch_embeddings = embeddings.patch_embeddings
    num_prefix_positions = old.shape[1] - patch_embeddings.num_patches
    new = _new_positions(embeddings, num_prefix_positions, image_size, old.shape[-1])
    embeddings.position_embeddings = nn.Parameter(new.to(old.dtype), requires_grad=old.requires_grad)
    grid = image_size // embeddings.patch_size
    embeddings.image_size = patch_embeddings.image_size = (image_size, image_size)
    patch_embeddings.num_patches = grid * grid


def _resize_embedding_table(embeddings: nn.Module, image_size: int) -> None:
    # CLIP: an `nn.Embedding` of prefix + patches rows, looked up through `position_ids`.
    old = embeddings.position_embedding
    new = _new_positions(embeddings, 1, image_size, old.embedding_dim)[0]
    table = nn.Embedding(new.shape[0], old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
    table.weight.copy_(new)
    table.weight.requires_grad_(old.weight.requires_grad)
    embeddings.position_embedding = table
    embeddings.image_size = image_size
    embeddings.num_patches = new.shape[0] - 1
    embeddings.num_positions = new.shape[0]
    position_ids = torch.arange(new.shape[0], device=embeddings.position_ids.device).expand((1, -1))
    embeddings.register_buffer("position_ids", position_ids, persistent=False)


__all__ = ["resize_position_embeddings"]
