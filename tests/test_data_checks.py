"""Data is checked before any model is loaded: image folders (layout, classes, every file decoded) and the labels a
model is evaluated against."""

import dataclasses
import io
import json
import os
import sys

import pytest
from PIL import Image

import evit_hf
from evit_hf.data import scan_image_folder

from .example_modules import evaluate_keep_rates, run_image_classification
from .image_files import (
    good_folder,
    image_check_cache,  # noqa: F401 (autouse)
    write_image,
    write_truncated_jpeg,
)
from .run_helpers import save_small_vit, training_args


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


# -- the check: fast, and once per file ------------------------------------------------------------------------------


def jpeg_bytes(progressive=False) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((400, 300), 40).convert("RGB").save(buffer, format="JPEG", progressive=progressive)
    return buffer.getvalue()


def fully_decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception:
        return False
    return True


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
def test_the_reduced_size_jpeg_check_fails_where_a_full_decode_fails(tmp_path, progressive):
    data = jpeg_bytes(progressive)
    damaged = {f"cut-{cut}": data[:cut] for cut in range(0, len(data), len(data) // 40)}
    damaged |= {f"cut-end-{n}": data[:-n] for n in (1, 2, 3, 10)}
    for offset in (3, 20, 200, len(data) // 3, len(data) // 2):
        garbled = bytearray(data)
        garbled[offset : offset + 24] = bytes(range(100, 124))
        damaged[f"garbled-{offset}"] = bytes(garbled)
    disagreements, failures = [], 0
    for name, content in damaged.items():
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(content)
        failed = evit_hf.data._decode_error(str(path)) is not None
        failures += failed
        if failed == fully_decodes(content):
            disagreements.append(name)
    assert disagreements == []
    assert failures >= 40  # the damage is found, not only agreed on


def test_truncated_and_corrupt_jpeg_and_png_files_are_found(tmp_path):
    root = good_folder(tmp_path / "train")
    data = jpeg_bytes()
    (root / "cat" / "truncated.jpg").write_bytes(data[: len(data) * 2 // 3])
    (root / "cat" / "bad-header.jpg").write_bytes(data[:2] + bytes(40) + data[42:])
    png = io.BytesIO()
    Image.effect_noise((64, 48), 60).convert("RGB").save(png, format="PNG")
    png = png.getvalue()
    (root / "dog" / "truncated.png").write_bytes(png[: len(png) // 2])
    idat = png.index(b"IDAT")
    (root / "dog" / "garbled.png").write_bytes(png[: idat + 2000] + bytes(range(200, 216)) + png[idat + 2016 :])
    contents = scan_image_folder(str(root), skip_unreadable=True)
    assert sorted(os.path.relpath(path, root) for path, _ in contents.unreadable) == [
        os.path.join("cat", "bad-header.jpg"), os.path.join("cat", "truncated.jpg"),
        os.path.join("dog", "garbled.png"), os.path.join("dog", "truncated.png"),
    ]  # fmt: skip
    assert len(contents.images) == 8


@pytest.fixture
def decodes(monkeypatch):
    """The paths the image check decodes, in order."""
    decoded = []
    decode = evit_hf.data._decode_error

    def counting(path):
        decoded.append(path)
        return decode(path)

    monkeypatch.setattr(evit_hf.data, "_decode_error", counting)
    return decoded


def test_a_cached_check_decodes_nothing_and_finds_the_same(tmp_path, decodes):
    root = good_folder(tmp_path / "train")
    write_truncated_jpeg(root / "dog" / "broken.jpg")
    first = scan_image_folder(str(root), skip_unreadable=True)
    assert len(decodes) == 9 and first.decoded == 9
    assert os.path.isfile(evit_hf.data.image_check_cache_file(str(root)))  # in the datasets cache
    decodes.clear()
    again = scan_image_folder(str(root), skip_unreadable=True)
    assert decodes == [] and again.decoded == 0
    assert again == dataclasses.replace(first, decoded=0)
    with pytest.raises(ValueError, match="1 file\\(s\\) that do not decode"):  # the cached failure still counts
        scan_image_folder(str(root))
    assert decodes == []


def test_a_changed_file_is_checked_again(tmp_path, decodes):
    root = good_folder(tmp_path / "train")
    scan_image_folder(str(root))
    decodes.clear()
    good = root / "cat" / "0.png"
    write_truncated_jpeg(good)  # another size: now unreadable
    touched = root / "dog" / "1.png"
    status = touched.stat()
    os.utime(touched, ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000))  # same bytes, newer
    write_image(root / "dog" / "new.png")
    (root / "cat" / "3.png").unlink()
    contents = scan_image_folder(str(root), skip_unreadable=True)
    assert sorted(decodes) == sorted(str(path) for path in (good, touched, root / "dog" / "new.png"))
    assert contents.unreadable[0][0] == str(good) and len(contents.unreadable) == 1
    assert len(contents.images) == 7 - 1 + 1  # 8 less the deleted and the broken, plus the new one


@pytest.mark.parametrize(
    "content",
    [b"{not json", b'{"version": 1, "files": {"cat/0.png": [1]}}', b'["a list"]', b"\xff\xfe\x00"],
    ids=["not-json", "malformed-entry", "not-a-mapping", "not-text"],
)
def test_a_corrupt_cache_is_ignored_with_a_warning(tmp_path, decodes, caplog, content):
    root = good_folder(tmp_path / "train")
    scan_image_folder(str(root))
    cache_file = evit_hf.data.image_check_cache_file(str(root))
    with open(cache_file, "wb") as handle:
        handle.write(content)
    decodes.clear()
    with caplog.at_level("WARNING", logger="evit_hf.data"):
        contents = scan_image_folder(str(root))
    assert f"Ignoring the cached image check {cache_file}" in caplog.text and "checked again" in caplog.text
    assert len(decodes) == 8 and len(contents.images) == 8
    decodes.clear()
    scan_image_folder(str(root))  # rewritten whole
    assert decodes == []


def test_a_cache_that_cannot_be_written_costs_a_warning(tmp_path, caplog):
    root = good_folder(tmp_path / "train")
    (tmp_path / "a-file").write_text("not a folder")
    with caplog.at_level("WARNING", logger="evit_hf.data"):
        contents = scan_image_folder(str(root), cache_dir=str(tmp_path / "a-file"))
    assert len(contents.images) == 8 and "Cannot cache the image check" in caplog.text


def test_training_then_evaluating_a_folder_checks_its_images_once(tmp_path, decodes):
    model = save_small_vit(tmp_path / "model", labels=["cat", "dog"])
    train, validation = good_folder(tmp_path / "train"), good_folder(tmp_path / "val", count=2)
    cache = tmp_path / "run-cache"
    run_image_classification.main(
        training_args(model, tmp_path / "out", "--train_dir", str(train), "--validation_dir", str(validation),
                      "--cache_dir", str(cache), "--max_steps", "1", "--card_keep_rates", "1.0")
    )  # fmt: skip
    assert len(decodes) == 8 + 4
    assert os.path.isfile(evit_hf.data.image_check_cache_file(str(train), str(cache)))
    decodes.clear()
    rows = evaluate_keep_rates.main(
        ["--model_name_or_path", str(tmp_path / "out"), "--validation_dir", str(validation), "--cache_dir", str(cache),
         "--output_dir", str(tmp_path / "table"), "--keep_rates", "1.0", "--num_workers", "0"]
    )  # fmt: skip
    assert decodes == [] and rows[0]["samples"] == 4


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def progress_bars_on(monkeypatch):
    """transformers' and datasets' progress bars on, whatever the environment says, for the test only."""
    from transformers.utils import logging as transformers_logging

    monkeypatch.setattr(sys.modules["datasets.utils.tqdm"], "_hf_datasets_progress_bars_disabled", False)
    monkeypatch.setattr(transformers_logging, "_tqdm_active", True)
    return transformers_logging


def test_the_check_shows_its_progress_on_a_terminal_only(tmp_path, monkeypatch, progress_bars_on):
    transformers_logging = progress_bars_on
    root = good_folder(tmp_path / "train")
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    scan_image_folder(str(root), use_cache=False)
    assert f"Checking the images of {root}" in terminal.getvalue() and "images/s" in terminal.getvalue()

    terminal.seek(0)
    terminal.truncate()
    monkeypatch.setattr(transformers_logging, "_tqdm_active", False)  # transformers.logging.disable_progress_bar()
    scan_image_folder(str(root), use_cache=False)
    assert terminal.getvalue() == ""
    not_a_terminal = io.StringIO()
    monkeypatch.setattr(sys, "stderr", not_a_terminal)
    scan_image_folder(str(root), use_cache=False)
    assert not_a_terminal.getvalue() == ""
