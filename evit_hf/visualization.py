"""Pictures of what EViT keeps: the input, then per reduction layer the kept patches, the others greyed."""

import numpy as np
import torch
from PIL import Image, ImageDraw


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
        return image_processor(images=image_or_pixel_values.convert("RGB"), return_tensors="pt").pixel_values
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


def visualize_kept_tokens(
    model,
    image_or_pixel_values,
    image_processor=None,
    keep_rate: float | None = None,
    scale: int | None = None,
    output_path: str | None = None,
) -> Image.Image:
    """Draws the input and, for each reduction layer, the patches whose token that layer kept; the patches that were
    fused or dropped are dimmed to blue-grey, as the paper's figure greys them.

    Args:
        model (an EViT model):
            Any EViT model (or one turned into EViT with `apply_evit`).
        image_or_pixel_values (`PIL.Image.Image` or `torch.Tensor`):
            An image (with `image_processor`), or pixel values `[channels, height, width]` / `[1, channels, ...]`.
        image_processor (*optional*):
            The model's image processor, needed for a PIL image.
        keep_rate (`float`, *optional*):
            Overrides `model.config.keep_rate`.
        scale (`int`, *optional*):
            Upscaling of each panel; defaults to making panels at least 160 px high.
        output_path (`str`, *optional*):
            Where to save the PNG.

    Returns:
        `PIL.Image.Image`: the panels side by side.
    """
    pixel_values = _pixel_values(model, image_or_pixel_values, image_processor)
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
    scale = scale or max(1, -(-160 // height))

    panels = [picture]
    for mask in kept_patch_masks(output.kept_token_indices, grid):
        full = np.kron(mask, np.ones((patch_height, patch_width), dtype=bool))
        full = np.pad(full, ((0, height - full.shape[0]), (0, width - full.shape[1])))
        panels.append(np.where(full[:, :, None], picture, (0.3 * picture + 0.7 * removed).astype(np.uint8)))

    titles = ["input"] + [f"after layer {layer}" for layer in model.config.reduction_layers][: len(panels) - 1]
    margin, title_height = 6, 16
    panel_width, panel_height = width * scale, height * scale
    canvas = Image.new(
        "RGB", (len(panels) * (panel_width + margin) + margin, panel_height + title_height + 2 * margin), "white"
    )
    draw = ImageDraw.Draw(canvas)
    for index, (panel, title) in enumerate(zip(panels, titles, strict=True)):
        left = margin + index * (panel_width + margin)
        canvas.paste(
            Image.fromarray(panel).resize((panel_width, panel_height), Image.NEAREST), (left, title_height + margin)
        )
        draw.text((left, 2), title, fill="black")
    if output_path is not None:
        canvas.save(output_path)
    return canvas


__all__ = ["kept_patch_masks", "visualize_kept_tokens"]
