import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig

from evit_hf import visualize_kept_tokens
from evit_hf.cli import main
from evit_hf.families import FAMILIES, family_for_model, family_for_model_type
from evit_hf.images import load_rgb_image
from evit_hf.visualization import kept_patch_masks

from .family_folders import tiny_image_processor, write_family_folder
from .model_builders import (
    FAMILY_TESTERS,
    IMAGE_MODEL_FAMILIES,
    TINY,
    builder_classes,
    has_text_tower,
    stock_and_evit,
    text_inputs,
)


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


# `evit-hf visualize` on a saved folder of every family: the family's picture model reads it.

# The vision-language families' pictures are tested in tests/test_llava_hub.py.
PICTURED = [family for family in IMAGE_MODEL_FAMILIES if family.kept_token_picture_model is not None]


def test_every_family_has_a_picture_model():
    assert [family for family in FAMILIES if family.kept_token_picture_model is not None] == list(FAMILIES)


def picture_builder(family) -> str:
    """The family's builder of its picture model itself (the folder the command surely reads)."""
    return next(b for b in FAMILY_TESTERS[family.name] if builder_classes(b)[1] is family.kept_token_picture_model)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("image") / "image.png"
    Image.fromarray(np.random.RandomState(2).randint(0, 256, (36, 44, 3), dtype=np.uint8)).save(path)
    return path


def expected_picture(folder, image_file, keep_rate):
    """The picture drawn by the library: the family's picture model loaded from `folder`, on the folder's processor's
    pixels."""
    family = family_for_model_type(AutoConfig.from_pretrained(folder).model_type)
    model = family.kept_token_picture_model.from_pretrained(folder).eval()
    pixel_values = tiny_image_processor()(images=load_rgb_image(str(image_file)), return_tensors="pt").pixel_values
    return np.asarray(visualize_kept_tokens(model, pixel_values, keep_rate=keep_rate))


@pytest.mark.parametrize("family", PICTURED, ids=[family.name for family in PICTURED])
def test_visualize_command_draws_a_folder_of_every_family(family, image_file, tmp_path):
    folder, output = tmp_path / "model", tmp_path / "kept.png"
    write_family_folder(picture_builder(family), folder, keep_rate=0.5)
    argv = ["visualize", "--model", str(folder), "--image", str(image_file), "--output", str(output)]
    main([*argv, "--keep-rate", "0.4"])
    drawn = np.asarray(Image.open(output).convert("RGB"))
    np.testing.assert_array_equal(drawn, expected_picture(folder, image_file, keep_rate=0.4))


@pytest.mark.parametrize(
    "builder",
    [builder for family in PICTURED for builder in FAMILY_TESTERS[family.name] if builder != picture_builder(family)],
)
def test_the_picture_model_reads_every_saved_model_of_its_family(builder, image_file, tmp_path):
    # A vision tower reads a whole CLIP model or its classifier, a base model its classifier: the same kept tokens.
    model = write_family_folder(builder, tmp_path, keep_rate=0.5)
    family = family_for_model(model)
    picture_model = family.kept_token_picture_model.from_pretrained(tmp_path).eval()
    pixel_values = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        inputs = {"input_ids": text_inputs(1)} if has_text_tower(builder) else {}
        kept = model(pixel_values=pixel_values, **inputs).kept_token_indices
        pictured = picture_model(pixel_values).kept_token_indices
    assert len(kept) == len(pictured) > 0
    assert all(torch.equal(a, b) for a, b in zip(kept, pictured, strict=True))


def test_visualize_command_draws_a_whole_clip_folder(image_file, tmp_path):
    write_family_folder("clip", tmp_path / "model", keep_rate=0.5)
    output = tmp_path / "kept.png"
    main(["visualize", "--model", str(tmp_path / "model"), "--image", str(image_file), "--output", str(output)])
    drawn = np.asarray(Image.open(output).convert("RGB"))
    np.testing.assert_array_equal(drawn, expected_picture(tmp_path / "model", image_file, keep_rate=None))
