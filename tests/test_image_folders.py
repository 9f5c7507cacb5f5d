"""Image folders hold what their names say: file and folder names are names (never patterns), symbolic links are
followed (loops reported), class ids are shared by training and validation, and every image reaches the model upright
and in 8-bit RGB, the same way in training, evaluation and `evit-hf visualize`."""

import io
import json
import os

import numpy as np
import pytest
from datasets import Image as ImageFeature
from PIL import Image, ImageOps

import evit_hf
from evit_hf import fine_tuning
from evit_hf.cli import main as cli
from evit_hf.data import image_transforms, scan_image_folder, to_rgb
from evit_hf.images import load_rgb_image

from .example_modules import run_image_classification
from .image_files import (
    image_check_cache,  # noqa: F401 (autouse)
    png_bytes,
    sixteen_bit_gradient,
    write_image,
    write_rotated_jpeg,
)
from .run_helpers import save_small_vit, training_args


# -- file and folder names are names ------------------------------------------------------------------------------

PATTERN_NAMES = ["*.png", "[0-4].png", "img[1].png", "0.png", "3.png", "a?.png"]


def pattern_folder(root):
    """Class folders whose file names, and one class name, read as glob patterns; a `[1]` in the folder's own path."""
    for name in PATTERN_NAMES:
        write_image(root / "cat" / name)
    for name in ("a.png", "b.png"):
        write_image(root / "dog[1]" / name, (30, 30, 200))
    return root


def test_names_that_read_as_patterns_are_taken_as_they_are(tmp_path):
    root = pattern_folder(tmp_path / "data[1]" / "train")
    contents = scan_image_folder(str(root))
    assert contents.classes == ["cat", "dog[1]"]
    assert sorted(os.path.basename(path) for path in contents.images) == sorted([*PATTERN_NAMES, "a.png", "b.png"])

    dataset = fine_tuning.load_image_folders(fine_tuning.DataTrainingArguments(train_dir=str(root)))
    train = dataset["train"]
    files = [os.path.basename(row["path"]) for row in train.cast_column("image", ImageFeature(decode=False))["image"]]
    assert sorted(files) == sorted([*PATTERN_NAMES, "a.png", "b.png"])
    assert train.features["label"].names == ["cat", "dog[1]"]
    assert train["label"].count(0) == len(PATTERN_NAMES) and train["label"].count(1) == 2


def test_folders_at_different_depths_share_one_label_space(tmp_path):
    train = tmp_path / "a" / "train"
    for label in ("ant", "bee", "cat"):
        write_image(train / label / "0.png")
    validation = tmp_path / "b" / "c" / "d" / "val"
    write_image(validation / "cat" / "0.png")  # only the last class: its id must still be 2
    write_image(validation / "bee" / "0.png")
    write_image(validation / "bee" / "1.png")
    dataset = fine_tuning.load_image_folders(
        fine_tuning.DataTrainingArguments(train_dir=str(train), validation_dir=str(validation))
    )
    assert list(dataset) == ["train", "validation"]
    for split in dataset.values():
        assert split.column_names == ["image", "label"]
        assert split.features == dataset["train"].features
    assert dataset["train"].features["label"].names == ["ant", "bee", "cat"]
    assert dataset["validation"]["label"] == [1, 1, 2]
    assert dataset["train"]["label"] == [0, 1, 2]
    assert dataset["validation"][2]["image"].size == (40, 36)  # decoded from its path


def test_upper_case_extensions_are_images(tmp_path):
    root = tmp_path / "train"
    write_image(root / "cat" / "A.JPG", file_format="JPEG")
    write_image(root / "cat" / "b.Png")
    write_image(root / "dog" / "C.PNG")
    write_image(root / "dog" / "d.JPEG", file_format="JPEG")
    contents = scan_image_folder(str(root))
    assert [os.path.basename(path) for path in contents.images] == ["A.JPG", "b.Png", "C.PNG", "d.JPEG"]
    assert contents.image_classes == ["cat", "cat", "dog", "dog"]


def test_a_class_with_only_unreadable_files_is_no_class(tmp_path):
    root = tmp_path / "train"
    for label in ("cat", "dog"):
        write_image(root / label / "0.png")
    (root / "eel").mkdir()
    (root / "eel" / "0.png").write_bytes(b"not an image")
    (root / "eel" / "1.jpg").write_bytes(b"")
    contents = scan_image_folder(str(root), skip_unreadable=True)
    assert contents.classes == ["cat", "dog"]
    assert sorted(os.path.basename(path) for path, _ in contents.unreadable) == ["0.png", "1.jpg"]


# -- symbolic links -------------------------------------------------------------------------------------------------


def test_linked_class_folders_and_images_are_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    for i in range(2):
        write_image(elsewhere / "dogs" / f"{i}.png", (30, 30, 200))
    write_image(elsewhere / "one-cat.png")
    root = tmp_path / "train"
    write_image(root / "cat" / "0.png")
    (root / "cat" / "linked.png").symlink_to(elsewhere / "one-cat.png")
    (root / "dog").symlink_to(elsewhere / "dogs", target_is_directory=True)
    contents = scan_image_folder(str(root))
    assert contents.classes == ["cat", "dog"]  # the class is named by the link
    assert [os.path.relpath(path, root) for path in contents.images] == [
        os.path.join("cat", "0.png"), os.path.join("cat", "linked.png"),
        os.path.join("dog", "0.png"), os.path.join("dog", "1.png"),
    ]  # fmt: skip


def test_link_loops_and_dangling_links_are_reported(tmp_path):
    root = tmp_path / "train"
    for label in ("cat", "dog"):
        write_image(root / label / "0.png")
    (root / "cat" / "again").symlink_to(root / "cat", target_is_directory=True)  # cat/again/again/... forever
    (root / "everything").symlink_to(root, target_is_directory=True)
    (root / "eel").symlink_to(tmp_path / "no-such-folder")
    (root / "dog" / "gone.png").symlink_to(tmp_path / "no-such-image.png")
    with pytest.raises(ValueError) as raised:
        scan_image_folder(str(root))
    message = str(raised.value)
    assert "2 symbolic link loop(s)" in message
    assert f"{root / 'cat' / 'again'} -> {root / 'cat'}" in message and f"{root / 'everything'} -> {root}" in message
    assert f"{root / 'eel'} -> {tmp_path / 'no-such-folder'} (does not exist)" in message
    gone = f"{root / 'dog' / 'gone.png'}: a symbolic link to {tmp_path / 'no-such-image.png'}, which does not exist"
    assert gone in message


def test_the_example_reads_exactly_the_files_it_was_given(tmp_path):
    """Pattern-like names, a linked class folder and image, upper-case extensions, a 16-bit PNG and a class whose only
    file does not decode (skipped), through the command line. The validation folder is the training folder reached
    through a link at another depth: the evaluation counts every image once, and the classes are the readable ones."""
    train = pattern_folder(tmp_path / "data[1]" / "train")  # 6 cats (8 with the two below), 2 in "dog[1]"
    write_image(train / "cat" / "UPPER.JPG", file_format="JPEG")
    (train / "cat" / "sixteen-bit.png").write_bytes(png_bytes(sixteen_bit_gradient()))
    write_image(tmp_path / "elsewhere" / "0.png", (30, 200, 30))
    write_image(tmp_path / "elsewhere" / "1.PNG", (30, 200, 30))
    (train / "frog").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (train / "dog[1]" / "linked.png").symlink_to(tmp_path / "elsewhere" / "0.png")
    (train / "eel").mkdir()
    (train / "eel" / "broken.png").write_bytes(b"not an image")
    validation = tmp_path / "deeper" / "than" / "train" / "val"
    validation.parent.mkdir(parents=True)
    validation.symlink_to(train, target_is_directory=True)
    model = save_small_vit(tmp_path / "model", labels=["cat", "dog[1]", "frog"])
    output = tmp_path / "out"
    run_image_classification.main(
        training_args(model, output, "--train_dir", str(train), "--validation_dir", str(validation),
                      "--skip_unreadable_images", "--max_steps", "1", "--card_keep_rates", "1.0")
    )  # fmt: skip
    config = json.loads((output / "config.json").read_text())
    assert config["id2label"] == {"0": "cat", "1": "dog[1]", "2": "frog"}
    rows = json.loads((output / "keep_rate_results.json").read_text())
    assert [row["samples"] for row in rows] == [8 + 3 + 2] * 2


def test_a_link_loop_stops_the_example_before_a_model_loads(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(evit_hf.EViTForImageClassification, "from_pretrained", refuse)
    train = tmp_path / "train"
    for label in ("cat", "dog"):
        write_image(train / label / "0.png")
    (train / "dog" / "up").symlink_to(train, target_is_directory=True)
    model = save_small_vit(tmp_path / "model", labels=["cat", "dog"])
    with pytest.raises(ValueError, match=r"--train_dir: (.|\n)*1 symbolic link loop\(s\)"):
        run_image_classification.main(training_args(model, tmp_path / "out", "--train_dir", str(train)))


# -- 8-bit RGB from every mode ---------------------------------------------------------------------------------------


def opened(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_sixteen_bit_grey_is_scaled_not_clipped():
    values = sixteen_bit_gradient()
    expected = np.round(values / 257.0).astype(np.uint8)
    from_file = opened(png_bytes(values))
    assert from_file.mode == "I;16"
    as_variants = {
        "I;16 (PNG file)": from_file,
        "I;16B": Image.frombytes("I;16B", from_file.size, values.astype(">u2").tobytes()),
        "I": from_file.convert("I"),
    }
    for name, image in as_variants.items():
        rgb = np.asarray(to_rgb(image))
        assert rgb.shape == (*values.shape, 3) and rgb.dtype == np.uint8, name
        np.testing.assert_array_equal(rgb[..., 0], expected, err_msg=name)
        np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2], err_msg=name)
    assert len(np.unique(np.asarray(from_file.convert("RGB")))) < 20  # what the conversion used to give


def test_float_and_wide_integer_images():
    ramp = np.linspace(0, 1, 40 * 36, dtype=np.float32).reshape(36, 40)
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(ramp, mode="F")))[..., 1], np.rint(ramp * 255))
    eight_bit_floats = ramp * 200
    np.testing.assert_array_equal(
        np.asarray(to_rgb(Image.fromarray(eight_bit_floats, mode="F")))[..., 1], np.rint(eight_bit_floats)
    )
    wide = (ramp.astype(np.float64) * 4e6 - 1e6).astype(np.int32)  # beyond 16 bits: stretched from min to max
    rgb = np.asarray(to_rgb(Image.fromarray(wide, mode="I")))[..., 0]
    assert rgb.min() == 0 and rgb.max() == 255 and np.all(np.diff(rgb.ravel().astype(int)) >= 0)


def test_sixteen_bit_colour_and_transparency():
    colour = np.zeros((4, 6, 3), np.uint16)
    colour[..., 0], colour[..., 1], colour[..., 2] = 65535, 32896, 257  # 255, 128, 1 in 8 bits
    assert np.asarray(to_rgb(opened(png_bytes(colour))))[0, 0].tolist() == [255, 128, 1]

    grey_alpha = np.zeros((4, 6, 2), np.uint16)
    grey_alpha[..., 0] = 257 * 100
    grey_alpha[:, :3, 1] = 65535  # opaque left half, transparent right half
    rgb = np.asarray(to_rgb(opened(png_bytes(grey_alpha))))
    assert rgb[0, 0].tolist() == [100, 100, 100] and rgb[0, 5].tolist() == [255, 255, 255]

    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # transparent red: shown as the white it sits on
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    rgb = np.asarray(to_rgb(rgba))
    assert rgb[0, 0].tolist() == [0, 0, 255] and rgb[3, 3].tolist() == [255, 255, 255]
    assert rgb[0, 1].tolist() == [127, 127, 127]
    assert np.asarray(to_rgb(Image.new("LA", (2, 2), (40, 255))))[0, 0].tolist() == [40, 40, 40]

    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0, 0, 0] * 254)
    assert np.asarray(to_rgb(palette))[0, 0].tolist() == [10, 200, 30]
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", transparency=1)  # palette entry 1 transparent
    assert np.asarray(to_rgb(opened(buffer.getvalue())))[0, 0].tolist() == [255, 255, 255]
    for mode in ("L", "1", "CMYK", "YCbCr"):
        image = Image.new("RGB", (3, 3), (90, 160, 220)).convert(mode)
        assert to_rgb(image).mode == "RGB"
        np.testing.assert_array_equal(np.asarray(to_rgb(image)), np.asarray(image.convert("RGB")), err_msg=mode)


def test_images_are_turned_upright_once(tmp_path):
    path = tmp_path / "sideways.jpg"
    write_rotated_jpeg(path)
    raw = Image.open(path)
    assert raw.size == (48, 32)
    upright = load_rgb_image(str(path))
    assert upright.size == (32, 48)
    np.testing.assert_array_equal(np.asarray(upright), np.asarray(ImageOps.exif_transpose(Image.open(path))))
    np.testing.assert_array_equal(np.asarray(to_rgb(upright)), np.asarray(upright))  # no second turn


# -- the same pixels in training, evaluation and visualization -------------------------------------------------------


@pytest.mark.parametrize("kind", ["rotated-exif-jpeg", "sixteen-bit-png"])
def test_training_evaluation_and_visualize_see_the_same_pixels(kind, tmp_path):
    """One file, read by the example's folder loader (training and evaluation transforms) and by `evit-hf visualize`:
    the pixels agree, and differ from what a plain `convert("RGB")` of the file gives."""
    folder = tmp_path / "val"
    path = folder / "a" / ("sideways.jpg" if kind == "rotated-exif-jpeg" else "deep.png")
    if kind == "rotated-exif-jpeg":
        write_rotated_jpeg(path)
    else:
        path.parent.mkdir(parents=True)
        path.write_bytes(png_bytes(sixteen_bit_gradient()))
    write_image(folder / "b" / "0.png")
    model_folder = save_small_vit(tmp_path / "model", labels=["a", "b"])
    model = evit_hf.EViTForImageClassification.from_pretrained(model_folder)
    processor = evit_hf.visualization.load_image_processor_or_default(model_folder, model.config)

    dataset = fine_tuning.load_image_folders(fine_tuning.DataTrainingArguments(validation_dir=str(folder)))[
        "validation"
    ]
    decoded = dataset[0]["image"]  # as datasets decodes it for training and evaluation
    train_transform, eval_transform = image_transforms(processor, "image", crop_scale=(1.0, 1.0), random_flip=False)
    evaluated = eval_transform({"image": [decoded]})["pixel_values"][0]

    output = tmp_path / "kept.png"
    cli(["visualize", "--model", model_folder, "--image", str(path), "--output", str(output), "--keep-rate", "0.5"])
    visualized = np.asarray(Image.open(output).convert("RGB"))
    expected = np.asarray(evit_hf.visualize_kept_tokens(model, evaluated, keep_rate=0.5))
    np.testing.assert_array_equal(visualized, expected)
    naive = processor(images=Image.open(path).convert("RGB"), return_tensors="pt").pixel_values[0]
    assert not np.array_equal(visualized, np.asarray(evit_hf.visualize_kept_tokens(model, naive, keep_rate=0.5)))

    # Training: the per-sample augmentation crops the same upright, 8-bit image.
    randomness = evit_hf.data.AugmentationRandomness(seed=0)
    train_transform, _ = image_transforms(processor, "image", crop_scale=(0.5, 1.0), randomness=randomness)
    trained = train_transform({"image": [decoded], "sample_index": [0]})["pixel_values"][0]
    reference = to_rgb(ImageOps.exif_transpose(Image.open(path)))
    expected_train = train_transform({"image": [reference], "sample_index": [0]})["pixel_values"][0]
    np.testing.assert_array_equal(trained.numpy(), expected_train.numpy())
    sideways = Image.fromarray(np.asarray(Image.open(path).convert("RGB")))  # the stored pixels, no EXIF
    plain = train_transform({"image": [sideways], "sample_index": [0]})["pixel_values"][0]
    assert not np.array_equal(trained.numpy(), plain.numpy())
