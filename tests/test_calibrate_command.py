"""`evit-hf calibrate` writes the model it was given, heads included, reports what `count_macs` gives for the saved
folder, counts each image once, and refuses bad input in one line as `evit-hf visualize` does (a damaged image
processor, decompression bombs, truncated images and weights, a budget that is no finite number)."""

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoConfig

import evit_hf
import evit_hf.cli
from evit_hf.cli import main

from .command_helpers import refusal
from .family_folders import tiny_image_processor
from .model_builders import tiny_stock_model


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def write_images(folder, count=6, seed=0):
    generator = np.random.default_rng(seed)
    for index in range(count):
        sub_folder = folder / "ab"[index % 2]
        sub_folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(generator.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(sub_folder / f"{index}.png")


@pytest.fixture
def work(tmp_path):
    """A user's stock ViT classifier folder with its image processor, and a folder of images."""
    tiny_stock_model("vit-classifier").save_pretrained(tmp_path / "model")
    tiny_image_processor().save_pretrained(tmp_path / "model")
    write_images(tmp_path / "images")
    return tmp_path


def calibrate(work, model="model", images="images", output="out", macs=None, extra=()):
    if macs is None:
        config = AutoConfig.from_pretrained(work / model)
        macs = str(evit_hf.count_macs(config, keep_rate=0.6))
    return ["calibrate", "--model", str(work / model), "--images", str(work / images), "--macs", macs,
            "--output-dir", str(work / output), "--search-images", "4", *extra]  # fmt: skip


# Stock checkpoints as users have them: each calibrated folder must hold every weight, heads included.
CLASSIFIERS = {
    "vit": ("vit-classifier", evit_hf.EViTForImageClassification),
    "deit-with-distillation-head": ("deit-teacher", evit_hf.EViTDeiTForImageClassificationWithTeacher),
}


@pytest.mark.parametrize("builder, evit_class", CLASSIFIERS.values(), ids=CLASSIFIERS.keys())
def test_a_classifier_is_written_with_its_heads_and_the_macs_of_the_saved_folder(builder, evit_class, work, capsys):
    tiny_stock_model(builder).save_pretrained(work / builder)
    main(calibrate(work, model=builder))
    report = json.loads((work / "out" / "calibration.json").read_text())
    source = load_file(work / builder / "model.safetensors")
    saved = load_file(work / "out" / "model.safetensors")
    assert set(saved) == set(source)  # every weight, the heads' included
    assert all(torch.equal(saved[key], source[key]) for key in source)
    calibrated = evit_class.from_pretrained(work / "out")
    assert calibrated.config.architectures == [evit_class.__name__]
    assert (calibrated.config.reduction_layers, calibrated.config.keep_rate) == (
        report["reduction_layers"], report["keep_rate"]
    )  # fmt: skip
    folder_macs = evit_hf.count_macs(AutoConfig.from_pretrained(work / "out"))
    assert report["macs"] == folder_macs
    assert f"{folder_macs:,} MACs (count_macs of the folder" in capsys.readouterr().out


def test_each_image_counts_once_through_links(work):
    os.symlink(work / "images" / "a", work / "images" / "all-of-a")  # a second way to the same three images
    os.symlink(work / "images" / "b" / "1.png", work / "images" / "b" / "again.png")
    main(calibrate(work))
    assert json.loads((work / "out" / "calibration.json").read_text())["num_images"] == 6


def test_batches_smaller_than_the_images_cover_every_image(work):
    main(calibrate(work, extra=("--batch-size", "4")))  # 6 images: batches of 4 and 2
    assert json.loads((work / "out" / "calibration.json").read_text())["num_images"] == 6


@pytest.mark.usefixtures("no_work")
def test_a_symbolic_link_loop_is_reported_as_the_image_folder_check_reports_it(work, capsys):
    loop = work / "images" / "a" / "back"
    os.symlink(work / "images", loop)
    line = refusal(capsys, calibrate(work))
    assert line.startswith("evit-hf calibrate: error: argument --images: The image folder ")
    loops = "1 symbolic link loop(s) (links to a folder that holds them; remove them):"
    assert f"{loops} {loop} -> {work / 'images'}" in line
    assert not (work / "out").exists()


@pytest.mark.usefixtures("no_work")
@pytest.mark.parametrize("budget", ["inf", "nan", "1e400", "infG", "NaNM"])
def test_a_budget_that_is_no_finite_number_is_refused_before_any_work(budget, work, capsys):
    line = refusal(capsys, calibrate(work, macs=budget))
    assert line.startswith("evit-hf calibrate: error: argument --macs: a MACs budget is a positive number")
    assert line.endswith(f"got {budget!r}")
    assert not (work / "out").exists()


def test_a_damaged_image_processor_is_refused_as_visualize_refuses_it(work, capsys, monkeypatch):
    (work / "model" / "preprocessor_config.json").write_text("{not json")

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the image processor was checked")

    monkeypatch.setattr(evit_hf.EViTForImageClassification, "from_pretrained", refuse)
    lines = {
        command: refusal(capsys, argv)
        for command, argv in {
            "calibrate": calibrate(work),
            "visualize": ["visualize", "--model", str(work / "model"), "--image", str(work / "images/a/0.png"),
                          "--output", str(work / "kept.png")],
        }.items()
    }  # fmt: skip
    for command, line in lines.items():
        assert line.startswith(
            f"evit-hf {command}: error: argument --model: cannot load the image processor in {work / 'model'}: "
        )
        assert line.endswith("repair its preprocessor_config.json or pass --image-processor")
    assert not (work / "out").exists()


def _bomb(work, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # 32 x 32 images are then over twice the limit
    return work / "images" / "a" / "0.png"


def _truncated_image(work, monkeypatch):
    path = work / "images" / "a" / "0.png"
    path.write_bytes(path.read_bytes()[:200])
    return path


BAD_IMAGES = {"decompression-bomb": (_bomb, "decompression bomb"), "truncated": (_truncated_image, "truncated")}


@pytest.mark.parametrize("make, detail", BAD_IMAGES.values(), ids=BAD_IMAGES.keys())
@pytest.mark.parametrize("command", ["calibrate", "visualize"])
def test_a_bad_image_gets_the_one_line_error_of_visualize(command, make, detail, work, capsys, monkeypatch):
    path = make(work, monkeypatch)
    argv = calibrate(work) if command == "calibrate" else [
        "visualize", "--model", str(work / "model"), "--image", str(path), "--output", str(work / "kept.png")
    ]  # fmt: skip
    line = refusal(capsys, argv)
    flag = "--images" if command == "calibrate" else "--image"
    assert line.startswith(f"evit-hf {command}: error: argument {flag}: cannot read {path} as an image (")
    assert re.search(detail, line, re.IGNORECASE), line
    assert not (work / "out").exists() and not (work / "kept.png").exists()


@pytest.mark.parametrize("command", ["calibrate", "visualize"])
def test_truncated_weights_get_the_one_line_error_of_visualize(command, work, capsys):
    shutil.copytree(work / "model", work / "damaged")
    weights = work / "damaged" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    argv = calibrate(work, model="damaged") if command == "calibrate" else [
        "visualize", "--model", str(work / "damaged"), "--image", str(work / "images/a/0.png"), "--output",
        str(work / "kept.png"),
    ]  # fmt: skip
    line = refusal(capsys, argv)
    assert line.startswith(f"evit-hf {command}: error: argument --model: cannot load the model from {work}/damaged")
    assert not (work / "out").exists() and not (work / "kept.png").exists()
