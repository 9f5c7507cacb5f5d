import numpy as np
import pytest
import torch

from evit_hf import visualize_kept_tokens
from evit_hf.visualization import kept_patch_masks

from .model_builders import TINY, stock_and_evit


def grid_mask(rows, cols, kept_cells):
    mask = np.zeros((rows, cols), dtype=bool)
    for row, col in kept_cells:
        mask[row, col] = True
    return mask


@pytest.mark.parametrize(
    "grid, indices, expected_cells",
    [
        # 2 x 3 patches, row-major: patch 1 is row 0 col 1, patch 5 row 1 col 2; -1 (a fused token) marks nothing
        ((2, 3), [[1, 5, -1], [0, 2, 4]], [[(0, 1), (1, 2)]]),
        ((3, 2), [[1, 5, -1], [0, 2, 4]], [[(0, 1), (2, 1)]]),
        ((3, 3), [[1, 5], [0, 2]], [[(0, 1), (1, 2)]]),
    ],
    ids=["2x3", "3x2", "3x3"],
)
def test_kept_patch_masks_by_hand(grid, indices, expected_cells):
    masks = kept_patch_masks([torch.tensor(indices)], grid)  # one reduction layer, two images: image 0 is drawn
    assert len(masks) == 1
    np.testing.assert_array_equal(masks[0], grid_mask(*grid, expected_cells[0]))


def test_kept_patch_masks_one_per_layer():
    layers = [torch.tensor([[0, 3, 4, 7]]), torch.tensor([[7, -1]])]  # a 2 x 4 grid
    masks = kept_patch_masks(layers, (2, 4))
    np.testing.assert_array_equal(masks[0], grid_mask(2, 4, [(0, 0), (0, 3), (1, 0), (1, 3)]))
    np.testing.assert_array_equal(masks[1], grid_mask(2, 4, [(1, 3)]))


def test_picture_shows_the_kept_patches_of_a_non_square_input():
    _, evit = stock_and_evit("vit-classifier")
    patch = TINY["patch_size"]
    height, width = 32, 48  # 8 x 12 patches
    pixel_values = torch.randn(3, height, width, generator=torch.Generator().manual_seed(4))
    picture = np.asarray(visualize_kept_tokens(evit, pixel_values, keep_rate=0.5, scale=1))
    with torch.no_grad():
        kept = evit(pixel_values[None], keep_rate=0.5, interpolate_pos_encoding=True).kept_token_indices
    margin, top = 6, 22  # panels below a 16 px title row, 6 px apart

    def panel(index):
        left = margin + index * (width + margin)
        return picture[top : top + height, left : left + width]

    assert len(kept) == 3  # the input and one panel per reduction layer, side by side
    assert picture.shape == (top + height + margin, margin + 4 * (width + margin), 3)
    source = panel(0)
    for layer, indices in enumerate(kept):
        kept_patches = {int(p) for p in indices[0] if p >= 0}
        drawn = panel(layer + 1)
        for row in range(height // patch):
            for col in range(width // patch):
                cell = (slice(row * patch, (row + 1) * patch), slice(col * patch, (col + 1) * patch))
                shown = np.array_equal(drawn[cell], source[cell])
                assert shown == (row * (width // patch) + col in kept_patches), (layer, row, col)
