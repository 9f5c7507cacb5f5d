"""The `evit-hf` command: bad arguments end with argparse's one-line error before any model is built, and
`evit-hf visualize` titles its panels with the layers that produced them."""

import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ConvNextConfig

import evit_hf
from evit_hf import benchmark_timing
from evit_hf.cli import main
from evit_hf.visualization import kept_token_panels, visualize_kept_tokens

from .model_builders import TINY, stock_and_evit


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny EViT checkpoint saved without an image processor, and the other files the commands are given."""
    root = tmp_path_factory.mktemp("cli")
    _, model = stock_and_evit("vit-classifier")
    model.save_pretrained(root / "checkpoint")
    ConvNextConfig().save_pretrained(root / "convnext")
    (root / "empty").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / "image.png")
    (root / "not_an_image.png").write_bytes(b"these bytes are no picture")
    (root / "a_file").write_text("a file where a folder is expected")
    # A checkpoint whose own image processor is damaged, and a one-channel model saved without a processor.
    shutil.copytree(root / "checkpoint", root / "damaged_processor")
    (root / "damaged_processor" / "preprocessor_config.json").write_text("{not json")
    _, grayscale = stock_and_evit("vit-classifier", shape={**TINY, "num_channels": 1})
    grayscale.save_pretrained(root / "grayscale")
    (root / "benchmark_out" / "benchmark.json").mkdir(parents=True)  # a folder where the results file goes
    return root


@pytest.fixture
def no_model_is_built(monkeypatch):
    """Fails the test if a command builds a model: every argument must be checked before."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the arguments were checked")

    monkeypatch.setattr(benchmark_timing, "build_models", refuse)
    for model_class in (evit_hf.EViTForImageClassification, evit_hf.EViTDeiTForImageClassificationWithTeacher):
        monkeypatch.setattr(model_class, "from_pretrained", refuse)
    # The same answers with and without an accelerator on the machine running the tests.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def error_line(capsys, argv, files) -> str:
    """Runs the command in-process; asserts argparse's exit (status 2, no traceback); returns its error line."""
    argv = [str(files / value[len("@") :]) if value.startswith("@") else value for value in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(error_lines) == 1 and err.rstrip().endswith(error_lines[0]), err
    return error_lines[0]


# "@name" stands for a file of the `files` fixture.
BENCHMARK_ERRORS = {
    "batch-size-0": (["--batch-sizes", "0"], "argument --batch-sizes: a batch size is a whole number >= 1, got 0"),
    "batch-size-negative": (["--batch-sizes", "4", "-2"], "argument --batch-sizes: a batch size is a whole number"),
    "image-size-0": (["--image-sizes", "0"], "argument --image-sizes: an image size is a whole number of pixels, at"),
    "image-size-below-patch": (
        ["--image-sizes", "224", "15"],
        "at least the patch size (16 px for deit-small); got 15",
    ),
    "checkpoint-patch": (["--model", "@checkpoint", "--image-sizes", "3"], "at least the patch size (4 px for"),
    "resolution-below-patch": (["--resolutions", "8"], "argument --resolutions: an image size is a whole number"),
    "keep-rate-0": (["--keep-rates", "0.7", "0"], "argument --keep-rates: keep_rate must be in (0, 1] (the share"),
    "keep-rate-above-1": (["--keep-rates", "1.5"], "reduction layer keeps), got 1.5"),
    "keep-rate-nan": (["--keep-rates", "nan"], "in (0, 1], such as 0.7; got nan"),
    "per-layer-keep-rate": (["--keep-rates", "0.9/0/0.5"], "argument --keep-rates: keep_rate must be in (0, 1]"),
    "warmup": (["--warmup", "-1"], "argument --warmup: the number of warm-up rounds is a whole number >= 0, got -1"),
    "rounds": (["--rounds", "0"], "argument --rounds: the number of timed rounds is a whole number >= 1, got 0"),
    "cuda": (["--devices", "cpu", "cuda"], "argument --devices: cuda asked for, but CUDA is not available"),
    "mps": (["--devices", "mps"], "argument --devices: mps asked for, but MPS is not available here: use cpu"),
    "tpu": (["--devices", "tpu"], "argument --devices: unknown device 'tpu': use cpu, cuda, cuda:N or mps"),
    "shape": (["--model", "deit-huge"], "argument --model: must be one of deit-tiny, deit-small, deit-base, vit-base"),
    "missing-folder": (["--model", "@missing"], "or a checkpoint folder; "),
    "no-config": (["--model", "@empty"], "has no config.json; give a folder written by save_pretrained"),
    "not-vit": (["--model", "@convnext"], "holds a 'convnext' model; the benchmark builds ViT, DeiT, CLIP"),
    "attention": (["--attn-implementations", "sdpa", "fast"], "argument --attn-implementations: cannot use 'fast'"),
    "output-dir": (["--output-dir", "@a_file/results"], "argument --output-dir: cannot write into"),
    "output-dir-is-a-file": (["--output-dir", "@a_file"], "a_file is a file, not a folder"),
    "output-dir-empty": (["--output-dir", ""], "argument --output-dir: give a folder name"),
    "output-dir-not-writable": (["--output-dir", "/proc/evit-hf/results"], "cannot create files in /proc"),
    "output-file-is-a-folder": (["--output-dir", "@benchmark_out"], "benchmark.json: it is a folder or not writable"),
    "dtype": (["--dtypes", "int8"], "argument --dtypes: invalid choice: 'int8'"),
}


@pytest.mark.parametrize("argv, message", BENCHMARK_ERRORS.values(), ids=BENCHMARK_ERRORS.keys())
def test_benchmark_rejects(argv, message, files, capsys, no_model_is_built):
    line = error_line(capsys, ["benchmark", *argv], files)
    assert line.startswith("evit-hf benchmark: error: argument --")
    assert message in line


VISUALIZE_ERRORS = {
    "missing-image": (["--image", "@missing.png"], "argument --image: ", "does not exist or is not a file"),
    "unreadable-image": (["--image", "@not_an_image.png"], "argument --image: cannot read ", "as an image"),
    "keep-rate-0": (["--keep-rate", "0"], "argument --keep-rate: keep_rate must be in (0, 1] (the share", "got 0.0"),
    "keep-rate-nan": (["--keep-rate", "nan"], "argument --keep-rate: ", "in (0, 1], such as 0.7; got nan"),
    "keep-rate-word": (["--keep-rate", "most"], "argument --keep-rate: ", "such as 0.7; got 'most'"),
    "not-vit": (["--model", "@convnext"], "argument --model: ", "is a 'convnext' model; ViT, DeiT, CLIP, MetaCLIP"),
    "missing-folder": (["--model", "@missing"], "argument --model: ", "is not a folder; give a checkpoint folder"),
    "no-config": (["--model", "@empty"], "argument --model: ", "has no config.json"),
    "output-folder": (["--output", "@a_file/kept.png"], "argument --output: cannot write ", "is a file, not a folder"),
    "output-format": (["--output", "@kept.txt"], "argument --output: cannot write a picture named", ".png, .jpg"),
    # PIL registers a writer for XBM, but for 1-bit images only: the picture would fail once the model has run.
    "output-xbm": (["--output", "@kept.xbm"], "argument --output: cannot write a picture named", "extensions .png"),
    "output-no-extension": (["--output", "@kept"], "argument --output: cannot write a picture named", ".png, .jpg"),
    "output-is-a-folder": (["--output", "@empty"], "argument --output: ", "is a folder; give a file name"),
    "output-not-writable": (["--output", "/proc/evit-hf/kept.png"], "argument --output: cannot write", "in /proc"),
    "damaged-processor": (["--model", "@damaged_processor"], "argument --model: cannot load the image processor", ""),
    "channels": (["--model", "@grayscale"], "argument --image-processor: the image processor makes 3-channel", ""),
    "processor": (["--image-processor", "@empty"], "argument --image-processor: cannot load an image processor", ""),
}


@pytest.mark.parametrize("argv, start, end", VISUALIZE_ERRORS.values(), ids=VISUALIZE_ERRORS.keys())
def test_visualize_rejects(argv, start, end, files, capsys, no_model_is_built):
    valid = {"--model": "@checkpoint", "--image": "@image.png", "--output": "@kept.png"}
    valid.update(zip(argv[::2], argv[1::2], strict=True))
    line = error_line(capsys, ["visualize", *(part for pair in valid.items() for part in pair)], files)
    assert line.startswith(f"evit-hf visualize: error: {start}") and end in line


@pytest.mark.parametrize(
    "argv, message",
    [([], "evit-hf: error: give a command: visualize, benchmark, convert or calibrate"),
     (["train"],
      "evit-hf: error: unknown command 'train'; the commands are visualize, benchmark, convert, calibrate")],
    ids=["none", "unknown"],
)  # fmt: skip
def test_evit_hf_rejects(argv, message, files, capsys):
    assert error_line(capsys, argv, files).startswith(message)


@pytest.mark.parametrize("given", ["to-the-configuration", "edited-in-place"])
def test_panel_titles_name_the_layers_that_kept_the_tokens(given, pixel_values):
    # Reduction layers listed out of order: the model runs them in layer order, and so come its kept tokens. The
    # configuration stores the list sorted, but an in-place edit of that list keeps the order it was given in.
    if given == "to-the-configuration":
        _, model = stock_and_evit("vit-classifier", reduction_layers=[3, 1])
    else:
        _, model = stock_and_evit("vit-classifier")
        model.config.reduction_layers[:] = [3, 1]
        assert model.config.reduction_layers == [3, 1]
    panels = kept_token_panels(model, pixel_values[0], keep_rate=0.5)
    assert [title for title, _ in panels] == ["input", "after layer 1", "after layer 3"]

    # What layer 1 keeps does not depend on the layers after it: the same model reducing only at layer 1 draws it.
    model.config.reduction_layers[:] = [1]
    (_, picture), (title, only_layer_1) = kept_token_panels(model, pixel_values[0], keep_rate=0.5)
    assert title == "after layer 1"
    np.testing.assert_array_equal(panels[1][1], only_layer_1)
    assert not np.array_equal(panels[2][1], only_layer_1)
    # ...and it shows ceil(0.5 * 64) = 32 patches as they are, the others dimmed.
    patch = TINY["patch_size"]
    grid = TINY["image_size"] // patch
    unchanged = (only_layer_1 == picture).all(axis=2).reshape(grid, patch, grid, patch).all(axis=(1, 3))
    assert unchanged.sum() == 32


def test_visualize_checkpoint_without_image_processor(files, tmp_path, capsys, caplog):
    assert not (files / "checkpoint" / "preprocessor_config.json").exists()
    output = tmp_path / "kept.png"
    with caplog.at_level(logging.WARNING, logger="evit_hf"):
        main(["visualize", "--model", str(files / "checkpoint"), "--image", str(files / "image.png"),
              "--output", str(output), "--keep-rate", "0.5"])  # fmt: skip
    assert f"wrote {output}" in capsys.readouterr().out
    assert "has no image processor: using a ViTImageProcessor at 32 px, mean/std 0.5." in caplog.text
    # The default processor resizes the 20 px image to the model's 32 px: the same picture as from 32 px pixels.
    model = evit_hf.EViTForImageClassification.from_pretrained(files / "checkpoint")
    expected = visualize_kept_tokens(model, torch.zeros(3, TINY["image_size"], TINY["image_size"]), keep_rate=0.5)
    assert Image.open(output).size == expected.size


def test_console_script_answers_without_traceback(tmp_path):
    # The installed command, run as a user runs it: one error line, status 2, and nothing done (the output folder
    # stays unwritten).
    script = os.path.join(os.path.dirname(sys.executable), "evit-hf")
    result = subprocess.run(
        [script, "benchmark", "--batch-sizes", "0", "--output-dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "evit-hf benchmark: error: argument --batch-sizes: a batch size is a whole number >= 1, got 0"
    )
    assert not (tmp_path / "out").exists()


def test_visualize_with_damaged_weights_answers_in_one_line(files, tmp_path, capsys):
    shutil.copytree(files / "checkpoint", tmp_path / "damaged")
    weights = tmp_path / "damaged" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    line = error_line(capsys, ["visualize", "--model", str(tmp_path / "damaged"), "--image", "@image.png",
                               "--output", str(tmp_path / "kept.png")], files)  # fmt: skip
    assert line.startswith("evit-hf visualize: error: argument --model: cannot load the model from ")
    assert not (tmp_path / "kept.png").exists()


def test_benchmark_out_of_memory_answers_in_one_line(files, capsys):
    # Ten trillion images of 32 x 32 px: the allocation fails at once, and the answer names the flags to lower.
    line = error_line(capsys, ["benchmark", "--model", "@checkpoint", "--image-sizes", "32", "--batch-sizes",
                               "10000000000000", "--rounds", "1", "--warmup", "0", "--no-memory", "--no-progress"],
                      files)  # fmt: skip
    assert "out of memory with batch sizes 10000000000000 and image sizes 32: give smaller --batch-sizes" in line


@pytest.mark.slow  # a real run in a subprocess, or a fresh interpreter: seconds on 2 cores
def test_console_script_refuses_a_malformed_checkpoint_in_one_line(tmp_path):
    # A state dict with an integer key: the unpatched command, as a user runs it, answers in one line and writes
    # nothing. (The other malformed checkpoints go through the same code in-process, in test_conversion.py.)
    torch.save({"cls_token": torch.zeros(1, 1, 8), 7: torch.zeros(3)}, tmp_path / "integer_key.pth")
    script = os.path.join(os.path.dirname(sys.executable), "evit-hf")
    result = subprocess.run(
        [script, "convert", str(tmp_path / "integer_key.pth"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("evit-hf convert: error: the state dict has keys that are not parameter names: 7;")
    ), result.stderr
    assert not (tmp_path / "out").exists()


def test_visualize_pixels_smaller_than_a_patch_answer_in_one_line(files, tmp_path, capsys):
    from transformers import ViTImageProcessor

    ViTImageProcessor(size={"height": 2, "width": 2}).save_pretrained(tmp_path / "two_pixels")  # patches are 4 px
    argv = ["visualize", "--model", "@checkpoint", "--image", "@image.png", "--image-processor",
            str(tmp_path / "two_pixels"), "--output", str(tmp_path / "kept.png")]  # fmt: skip
    line = error_line(capsys, argv, files)
    assert line.startswith("evit-hf visualize: error: argument --image-processor: ")
    assert "cannot run on the processed image of shape [1, 3, 2, 2]" in line
    assert not (tmp_path / "kept.png").exists()
