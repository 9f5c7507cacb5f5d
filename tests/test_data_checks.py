"""Data is checked before any model is loaded: image folders (layout, classes, every file decoded) and the labels a
model is evaluated against."""

import io
import json
import os

import pytest
from PIL import Image

import evit_hf
from evit_hf.data import scan_image_folder

from .test_examples import evaluate_keep_rates, run_image_classification, save_small_vit, training_args


def write_image(path, color=(200, 30, 30), size=(40, 36), file_format="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=file_format)


def write_truncated_jpeg(path):
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buffer, format="JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def good_folder(root, classes=("cat", "dog"), count=4):
    for label in classes:
        for i in range(count):
            write_image(root / label / f"{i}.png", (200, 30, 30) if label == "cat" else (30, 30, 200))
    return root


def test_a_good_folder_is_read_as_it_is(tmp_path):
    contents = scan_image_folder(str(good_folder(tmp_path / "train")))
    assert contents.classes == ["cat", "dog"]
    assert len(contents.images) == 8 and contents.unreadable == []
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")  # other files are not data
    assert len(scan_image_folder(str(tmp_path / "train")).images) == 8


def test_every_problem_of_a_folder_comes_in_one_error(tmp_path):
    root = good_folder(tmp_path / "train")
    write_truncated_jpeg(root / "cat" / "truncated.jpg")
    (root / "dog" / "empty.png").write_bytes(b"")
    (root / "dog" / "text.jpg").write_text("a text file named like an image")
    write_image(root / "loose.png")  # not in a class folder
    write_image(root / "dog" / "puppies" / "deep.png")  # one level too deep
    with pytest.raises(ValueError) as raised:
        scan_image_folder(str(root))
    message = str(raised.value)
    for name in ("truncated.jpg", "empty.png", "text.jpg", "loose.png", "deep.png"):
        assert os.path.join(str(root), "") in message and name in message, name
    assert "3 file(s) that do not decode" in message and "--skip_unreadable_images" in message
    assert "2 image(s) outside the" in message


def test_unreadable_files_can_be_skipped_and_are_listed(tmp_path):
    root = good_folder(tmp_path / "train")
    write_truncated_jpeg(root / "cat" / "truncated.jpg")
    contents = scan_image_folder(str(root), skip_unreadable=True)
    assert [os.path.basename(path) for path, _ in contents.unreadable] == ["truncated.jpg"]
    assert len(contents.images) == 8 and not any("truncated" in path for path in contents.images)


@pytest.mark.parametrize(
    "layout, message",
    [
        ("one-class", r"holds one class \('cat'\); image classification needs at least two"),
        ("no-class-folders", r"outside the .*CLASS/IMAGE layout"),
        ("missing", r"does not exist"),
        ("a-file", r"is not a folder"),
    ],
    ids=["one-class", "no-class-folders", "missing", "a-file"],
)
def test_folders_that_are_not_classification_data(tmp_path, layout, message):
    root = tmp_path / "train"
    if layout == "one-class":
        good_folder(root, classes=("cat",))
    elif layout == "no-class-folders":
        for i in range(3):
            write_image(root / f"{i}.png")
    elif layout == "a-file":
        write_image(tmp_path / "train")
    with pytest.raises(ValueError, match=message):
        scan_image_folder(str(root))


@pytest.fixture
def forbid_model_loading(monkeypatch):
    """Loading a model fails the test: data problems must be reported before."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(evit_hf.EViTForImageClassification, "from_pretrained", refuse)


def test_the_example_reports_every_bad_file_before_loading_a_model(tmp_path, forbid_model_loading):
    model = save_small_vit(tmp_path / "model", labels=["cat", "dog"])
    train = good_folder(tmp_path / "train")
    write_truncated_jpeg(train / "dog" / "broken.jpg")
    validation = good_folder(tmp_path / "val", classes=("cat",), count=2)
    with pytest.raises(ValueError) as raised:
        run_image_classification.main(
            training_args(model, tmp_path / "out", "--train_dir", str(train), "--validation_dir", str(validation))
        )
    message = str(raised.value)
    assert "--train_dir" in message and str(train / "dog" / "broken.jpg") in message
    assert "--validation_dir" in message and "one class ('cat')" in message
    assert not (tmp_path / "out").exists()


def test_a_missing_folder_is_named(tmp_path, forbid_model_loading):
    model = save_small_vit(tmp_path / "model", labels=["cat", "dog"])
    missing = tmp_path / "no-such-folder"
    with pytest.raises(ValueError, match=f"--train_dir: The image folder {missing} does not exist"):
        run_image_classification.main(training_args(model, tmp_path / "out", "--train_dir", str(missing)))


def test_validation_classes_must_be_training_classes(tmp_path, forbid_model_loading):
    model = save_small_vit(tmp_path / "model", labels=["cat", "dog"])
    train, validation = good_folder(tmp_path / "train"), good_folder(tmp_path / "val", classes=("cat", "fox"))
    with pytest.raises(ValueError, match=r"has classes that the training folder .* has not: \['fox'\]"):
        run_image_classification.main(
            training_args(model, tmp_path / "out", "--train_dir", str(train), "--validation_dir", str(validation))
        )


def test_skipping_unreadable_images_trains_on_the_others(tmp_path, caplog):
    model = save_small_vit(tmp_path / "model", labels=["cat", "dog"])
    train = good_folder(tmp_path / "train")
    write_truncated_jpeg(train / "dog" / "broken.jpg")
    with caplog.at_level("WARNING"):
        results = run_image_classification.main(
            training_args(model, tmp_path / "out", "--train_dir", str(train), "--skip_unreadable_images",
                          "--max_steps", "1", "--card_keep_rates", "1.0")
        )  # fmt: skip
    assert "Skipped 1 unreadable file(s)" in caplog.text and str(train / "dog" / "broken.jpg") in caplog.text
    assert "train_loss" in results


@pytest.mark.parametrize(
    "model_labels, message",
    [
        ([str(d) for d in range(9, -1, -1)], r"they differ at 0: '9' vs '0'"),  # same names, another order
        ([f"class {d}" for d in range(10)], r"they differ at 0: 'class 0' vs '0'"),
        ([str(d) for d in range(5)], r"predicts 5 labels"),
    ],
    ids=["reordered", "renamed", "fewer"],
)
def test_evaluation_refuses_a_model_whose_labels_are_not_the_datasets(
    tmp_path, model_labels, message, forbid_model_loading
):
    model = save_small_vit(tmp_path / "model", labels=model_labels)
    with pytest.raises(ValueError, match=message):
        evaluate_keep_rates.main(["--model_name_or_path", model, "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_evaluation_accepts_unnamed_labels_of_the_right_count(tmp_path):
    model = save_small_vit(tmp_path / "model", labels=[f"LABEL_{d}" for d in range(10)])
    rows = evaluate_keep_rates.main(
        ["--model_name_or_path", model, "--output_dir", str(tmp_path / "out"), "--keep_rates", "1.0",
         "--max_eval_samples", "16"]
    )  # fmt: skip
    assert json.loads((tmp_path / "out" / "keep_rates.json").read_text())["rows"] == rows


def test_training_crops_are_taken_at_the_size_the_model_sees():
    # A processor that resizes the shorter side to 40 and center-crops 32 (the reference's evaluation transform): the
    # random crop must come out at 32 from the whole image, not at 40 and then lose its border to a center crop.
    from transformers import DeiTImageProcessor

    from evit_hf.data import image_transforms

    processor = DeiTImageProcessor(
        size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}, do_center_crop=True, do_normalize=False,
        do_rescale=False,
    )  # fmt: skip
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 4, 64))  # a red band along the left edge
    train_transform, eval_transform = image_transforms(processor, "image", crop_scale=(1.0, 1.0), random_flip=False)
    pixels = train_transform({"image": [image]})["pixel_values"][0]  # [3, 32, 32]
    assert tuple(pixels.shape) == (3, 32, 32)
    assert pixels[0, :, 0].min() > 200  # the band is still there
    assert tuple(eval_transform({"image": [image]})["pixel_values"][0].shape) == (3, 32, 32)
