"""Pictures of what EViT keeps: the input, then per reduction layer the kept patches, the others greyed."""

import logging

import numpy as np
import torch
from PIL import Image, ImageDraw

from .configuration_evit_base import vision_config_of
from .images import to_rgb


logger = logging.getLogger(__name__)


def default_image_processor(config):
    """The image processor for a checkpoint saved without one: ViT's PIL image processor (mean and std 0.5) that
    resizes to the model's `config.image_size` (the vision tower's, for a model of image and text towers)."""
    # The PIL processor itself: importing `ViTImageProcessor` without torchvision warns that it falls back to this one.
    from transformers import ViTImageProcessorPil

    size = vision_config_of(config).image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return ViTImageProcessorPil(size={"height": height, "width": width})


def load_image_processor_or_default(name_or_path: str, config, **kwargs):
    """`AutoImageProcessor.from_pretrained(name_or_path, **kwargs)`, or, where `name_or_path` has no image processor
    (no `preprocessor_config.json`), `default_image_processor(config)` with a warning."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(name_or_path, **kwargs)
    except OSError:
        processor = default_image_processor(config)
        height, width = processor.size["height"], processor.size["width"]
        size = height if height == width else f"{height} x {width}"
        logger.warning(f"{name_or_path} has no image processor: using a ViTImageProcessor at {size} px, mean/std 0.5.")
        return processor


def reduction_layer_order(config) -> list[int]:
    """The reduction layers in the order the model runs them (layer index order), which is the order of the model's
    `kept_token_indices`, whatever order `config.reduction_layers` lists them in."""
    reduction_layers = set(config.reduction_layers)
    return [index for index in range(config.num_hidden_layers) if index in reduction_layers]


def _pixel_values(model, image_or_pixel_values, image_processor) -> torch.Tensor:
    if isinstance(image_or_pixel_values, torch.Tensor):
        pixel_values = image_or_pixel_values
        return pixel_values.unsqueeze(0) if pixel_values.dim() == 3 else pixel_values[:1]
    if isinstance(image_or_pixel_values, Image.Image):
        if image_processor is None:
            raise ValueError(
                "visualize_kept_tokens needs the model's image processor for a PIL image: pass "
                "image_processor=AutoImageProcessor.from_pretrained(...), or pass pixel_values instead."
            )
        # Upright and 8-bit RGB as in training and evaluation (`evit_hf.images.to_rgb`).
        return image_processor(images=to_rgb(image_or_pixel_values), return_tensors="pt").pixel_values
    raise TypeError(f"Expected a PIL image or a pixel_values tensor, got {type(image_or_pixel_values).__name__}.")


def _displayable(pixel_values: torch.Tensor) -> np.ndarray:
    """[channels, height, width] normalized pixels -> [height, width, 3] uint8, stretched to the full range."""
    array = pixel_values.detach().float().cpu().numpy().transpose(1, 2, 0)
    array = (array - array.min()) / max(float(array.max() - array.min()), 1e-8)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return (array[:, :, :3] * 255).round().astype(np.uint8)


def kept_patch_masks(kept_token_indices, grid: tuple[int, int]) -> list[np.ndarray]:
    """Per reduction layer, a boolean [rows, cols] mask of the patches whose own token was kept (image 0)."""
    masks = []
    for indices in kept_token_indices:
        mask = np.zeros(grid[0] * grid[1], dtype=bool)
        patches = indices[0][indices[0] >= 0].cpu().numpy()
        mask[patches] = True
        masks.append(mask.reshape(grid))
    return masks


def kept_token_panels(
    model, image_or_pixel_values, image_processor=None, keep_rate: float | None = None
) -> list[tuple[str, np.ndarray]]:
    """The panels `visualize_kept_tokens` draws, as (title, [height, width, 3] uint8 array) pairs: the input, then one
    per reduction layer, titled "after layer N" with N the layer's 0-based index. Arguments as there."""
    pixel_values = _pixel_values(model, image_or_pixel_values, image_processor)
    # Vision-language models draw their vision tower's kept tokens.
    model = getattr(model, "kept_token_picture_tower", model)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        output = model(pixel_values.to(model.dtype), keep_rate=keep_rate, interpolate_pos_encoding=True)
    model.train(was_training)

    height, width = pixel_values.shape[-2:]
    patch = model.config.patch_size
    patch_height, patch_width = (patch, patch) if isinstance(patch, int) else tuple(patch)
    grid = (height // patch_height, width // patch_width)
    picture = _displayable(pixel_values[0])
    # Fused or dropped patches: dimmed towards a blue-grey that reads as "removed" on dark and light images alike.
    removed = np.broadcast_to(np.array([96, 104, 150], dtype=np.float32), picture.shape)
    dimmed = (0.3 * picture + 0.7 * removed).astype(np.uint8)

    # The model returns one entry of kept tokens per reduction layer, in the order it runs the layers.
    layers = reduction_layer_order(model.config)
    masks = kept_patch_masks(output.kept_token_indices, grid)
    if len(masks) != len(layers):
        raise ValueError(
            f"The model returned kept tokens for {len(masks)} layers, but its configuration names {len(layers)} "
            f"reduction layers ({layers}); is it an EViT model?"
        )
    panels = [("input", picture)]
    for layer, mask in zip(layers, masks, strict=True):
        full = np.kron(mask, np.ones((patch_height, patch_width), dtype=bool))
        full = np.pad(full, ((0, height - full.shape[0]), (0, width - full.shape[1])))
        panels.append((f"after layer {layer}", np.where(full[:, :, None], picture, dimmed)))
    return panels


def visualize_kept_tokens(
    model,
    image_or_pixel_values,
    image_processor=None,
    keep_rate: float | None = None,
    scale: int | None = None,
    output_path: str | None = None,
) -> Image.Image:
    """Draws the input and, for each reduction layer, the patches whose token that layer kept; the patches that were
    fused or dropped are dimmed to blue-grey, as the paper's figure greys them. Each panel is titled with its layer's
    0-based index ("after layer 3").

    Args:
        model (an EViT model):
            Any EViT model (or one turned into EViT with `apply_evit`).
        image_or_pixel_values (`PIL.Image.Image` or `torch.Tensor`):
            An image (with `image_processor`), or pixel values `[channels, height, width]` / `[1, channels, ...]`.
        image_processor (*optional*):
            The model's image processor, needed for a PIL image (`load_image_processor_or_default` gives a default
            for checkpoints saved without one).
        keep_rate (`float`, *optional*):
            Overrides `model.config.keep_rate`.
        scale (`int`, *optional*):
            Upscaling of each panel; defaults to making panels at least 160 px high.
        output_path (`str`, *optional*):
            Where to save the PNG.

    Returns:
        `PIL.Image.Image`: the panels side by side.
    """
    panels = kept_token_panels(model, image_or_pixel_values, image_processor=image_processor, keep_rate=keep_rate)
    height, width = panels[0][1].shape[:2]
    scale = scale or max(1, -(-160 // height))
    margin, title_height = 6, 16
    panel_width, panel_height = width * scale, height * scale
    canvas = Image.new(
        "RGB", (len(panels) * (panel_width + margin) + margin, panel_height + title_height + 2 * margin), "white"
    )
    draw = ImageDraw.Draw(canvas)
    for index, (title, panel) in enumerate(panels):
        left = margin + index * (panel_width + margin)
        canvas.paste(
            Image.fromarray(panel).resize((panel_width, panel_height), Image.NEAREST), (left, title_height + margin)
        )
        draw.text((left, 2), title, fill="black")
    if output_path is not None:
        canvas.save(output_path)
    return canvas


__all__ = [
    "default_image_processor",
    "kept_patch_masks",
    "kept_token_panels",
    "load_image_processor_or_default",
    "reduction_layer_order",
    "visualize_kept_tokens",
]
