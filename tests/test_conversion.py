"""`evit-hf convert` / `evit_hf.convert_timm_checkpoint`: timm-layout checkpoints (the reference's training
checkpoints, timm and DeiT releases) become evit_hf folders whose logits are the method run on the same weights by
the literal implementation in spec_reference.py."""

import argparse
import json
import math
import os
import subprocess
import sys
import textwrap
from importlib import resources

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoImageProcessor, AutoModelForImageClassification

import evit_hf
from evit_hf.cli import main
from evit_hf.conversion import CheckpointConversionError, imagenet1k_labels

from .conversion_helpers import HEADS, IMAGE_SIZE, MLP, PATCH, WIDTH, timm_state_dict
from .spec_reference import reference_timm_logits


# The paper's layers for depth 4: round(4/4), round(4/2), round(3*4/4).
DEFAULT_LAYERS = [1, 2, 3]


def reference_args(**overrides):
    """The reference's main.py arguments that conversion reads, among others it does not."""
    values = dict(
        base_keep_rate=0.6,
        drop_loc="(0, 2)",
        fuse_token=True,
        input_size=IMAGE_SIZE,
        nb_classes=1000,
        model="deit_small_patch16_shrink_base",
        lr=2e-5,
    )
    return argparse.Namespace(**{**values, **overrides})


def training_checkpoint(args=None, with_ema=True):
    model = timm_state_dict(seed=0, classes=1000)
    checkpoint = {
        "model": model,
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 2e-5, "params": [0]}]},
        "lr_scheduler": {"t_initial": 30},
        "epoch": 29,
        "scaler": {"scale": 65536.0},
        "args": args or reference_args(),
    }
    if with_ema:
        checkpoint["model_ema"] = timm_state_dict(seed=1, classes=1000)
    return checkpoint


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("checkpoints") / "checkpoint.pth"
    torch.save(training_checkpoint(), path)
    return path


def relative_difference(actual, expected) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def assert_matches_reference(model, state_dict, pixels, keep_rate, layers, fuse, heads=HEADS):
    with torch.no_grad():
        logits = model(pixels).logits
        expected = reference_timm_logits(state_dict, pixels, heads, keep_rate, layers, fuse)
    difference = relative_difference(logits, expected)
    assert difference <= 1e-5, f"relative logit difference {difference:.2e}"
    return difference


def convert(argv):
    """Runs `evit-hf convert` in-process; returns the model it built."""
    from evit_hf.cli import run_command

    return run_command(["convert", *(str(value) for value in argv)])


def test_reference_training_checkpoint(checkpoint_file, tmp_path, pixels):
    folder = tmp_path / "converted"
    convert([checkpoint_file, folder, "--num-attention-heads", HEADS])
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    assert type(model) is evit_hf.EViTForImageClassification
    config = model.config
    assert (config.keep_rate, config.reduction_layers, config.fuse_inattentive_tokens) == (0.6, [0, 2], True)
    assert (config.layer_norm_eps, config.hidden_act, config.num_attention_heads) == (1e-6, "gelu", HEADS)
    assert (config.image_size, config.patch_size, config.intermediate_size) == (IMAGE_SIZE, PATCH, MLP)
    assert config.id2label[0] == "tench, Tinca tinca" and config.id2label[999].startswith("toilet tissue")
    assert_matches_reference(model, training_checkpoint()["model"], pixels, 0.6, [0, 2], True)

    files = set(os.listdir(folder))
    expected = {"model.safetensors", "config.json", "modeling_evit.py", "preprocessor_config.json", "README.md"}
    assert expected | {"image_processing_evit.py"} <= files
    assert not any(name.endswith((".bin", ".pth")) for name in files)
    assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModelForImageClassification"] == (
        "modeling_evit.EViTForImageClassification"
    )
    card = (folder / "README.md").read_text()
    assert "converted from `checkpoint.pth` ('model' of a training checkpoint (epoch 29)" in card
    assert "| keep rate | 0.6 | checkpoint args |" in card and "| reduction layers (0-based) | 0, 2 |" in card
    # The reference's evaluation transform: the shorter side resized to input_size / 0.875.
    transform = f"shorter side resized to {int(IMAGE_SIZE / 0.875)} px, bicubic; center crop {IMAGE_SIZE} px"
    assert transform in " ".join(card.split())


def test_distilled_safetensors(tmp_path, pixels):
    # Width 128: the heads come from width / 64 = 2.
    state_dict = timm_state_dict(seed=3, width=128, distilled=True)
    save_file(state_dict, tmp_path / "deit_distilled.safetensors")
    names = [f"class {index}" for index in range(5)]
    (tmp_path / "labels.json").write_text(json.dumps({str(index): name for index, name in enumerate(names)}))
    folder = tmp_path / "converted"
    convert([tmp_path / "deit_distilled.safetensors", folder, "--id2label", tmp_path / "labels.json"])
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    assert type(model) is evit_hf.EViTDeiTForImageClassificationWithTeacher
    assert type(model.config) is evit_hf.EViTDeiTConfig
    config = model.config
    assert (config.keep_rate, config.reduction_layers, config.fuse_inattentive_tokens) == (0.7, DEFAULT_LAYERS, True)
    assert config.num_attention_heads == 2 and [config.id2label[i] for i in range(5)] == names
    assert_matches_reference(model, state_dict, pixels, 0.7, DEFAULT_LAYERS, True, heads=2)
    with torch.no_grad():
        kept = model(pixels).kept_token_indices
    assert all((indices >= 0).all() for indices in kept[:1])  # both prefix tokens stayed out of the candidates


def test_overrides_beat_the_checkpoint_args(checkpoint_file, tmp_path, pixels):
    folder = tmp_path / "converted"
    argv = [checkpoint_file, folder, "--num-attention-heads", HEADS, "--keep-rate", 0.5]
    model = convert([*argv, "--reduction-layers", 3, 1, "--no-fuse"])
    config = model.config
    assert (config.keep_rate, config.reduction_layers, config.fuse_inattentive_tokens) == (0.5, [1, 3], False)
    state_dict = training_checkpoint()["model"]
    assert_matches_reference(model, state_dict, pixels, 0.5, [1, 3], False)
    # The overrides change the logits: the args' settings would not pass for them.
    with torch.no_grad():
        args_logits = reference_timm_logits(state_dict, pixels, HEADS, 0.6, [0, 2], True)
        assert relative_difference(model(pixels).logits, args_logits) > 1e-3
    card = (folder / "README.md").read_text()
    assert "| keep rate | 0.5 | override |" in card and "| inattentive tokens | dropped | override |" in card


def test_underscore_spellings_convert_as_the_dash_ones(checkpoint_file, tmp_path):
    # The spellings of earlier versions still work (hidden from --help): the same folder as with the dash spellings.
    from safetensors.torch import load_file

    def underscored(flag):
        return "--" + flag[len("--") :].replace("-", "_")

    def options(spell):
        return [spell("--num-attention-heads"), HEADS, spell("--keep-rate"), 0.5, spell("--reduction-layers"), 3, 1,
                spell("--no-fuse"), spell("--use-ema")]  # fmt: skip

    folders = {}
    for name, spell in (("dashes", str), ("underscores", underscored)):
        folders[name] = tmp_path / name
        convert([checkpoint_file, folders[name], *options(spell)])
    configs = {name: json.loads((folder / "config.json").read_text()) for name, folder in folders.items()}
    assert configs["underscores"] == configs["dashes"]
    config = configs["dashes"]
    assert (config["keep_rate"], config["reduction_layers"], config["fuse_inattentive_tokens"]) == (0.5, [1, 3], False)
    weights = {name: load_file(folder / "model.safetensors") for name, folder in folders.items()}
    assert weights["underscores"].keys() == weights["dashes"].keys()
    assert all(torch.equal(weights["underscores"][key], weights["dashes"][key]) for key in weights["dashes"])
    # The underscore spelling of --use-ema took the EMA weights, not the model's.
    ema_patch_weight = training_checkpoint()["model_ema"]["patch_embed.proj.weight"]
    assert any(torch.equal(tensor, ema_patch_weight) for tensor in weights["underscores"].values())


def test_listed_names_shows_the_first_ten_and_counts_the_rest():
    from evit_hf.timm_layout import listed_names

    names = [f"blocks.{index}.attn.qkv.weight" for index in range(12)]
    assert listed_names(names) == ", ".join(names[:10]) + " and 2 more"
    assert listed_names(names[:10]) == ", ".join(names[:10])
    assert listed_names(names[:3], shown=2) == f"{names[0]}, {names[1]} and 1 more"


def test_use_ema_converts_the_ema_weights(checkpoint_file, pixels):
    model = evit_hf.convert_timm_checkpoint(checkpoint_file, num_attention_heads=HEADS, use_ema=True)
    checkpoint = training_checkpoint()
    assert_matches_reference(model, checkpoint["model_ema"], pixels, 0.6, [0, 2], True)
    with torch.no_grad():
        not_ema = reference_timm_logits(checkpoint["model"], pixels, HEADS, 0.6, [0, 2], True)
        assert relative_difference(model(pixels).logits, not_ema) > 1e-3


def test_state_dict_under_model_without_args_gets_the_defaults(pixels):
    state_dict = timm_state_dict(seed=4)
    with pytest.warns(UserWarning, match="LABEL_0, LABEL_1"):
        model = evit_hf.convert_timm_checkpoint({"model": state_dict}, num_attention_heads=HEADS)
    config = model.config
    assert (config.keep_rate, config.reduction_layers, config.fuse_inattentive_tokens) == (0.7, DEFAULT_LAYERS, True)
    assert [config.id2label[i] for i in range(5)] == [f"LABEL_{i}" for i in range(5)]
    assert_matches_reference(model, state_dict, pixels, 0.7, DEFAULT_LAYERS, True)


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification
    model = AutoModelForImageClassification.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
    assert "evit_hf" not in sys.modules, "evit_hf was imported"
    with torch.no_grad():
        logits = model(torch.load(sys.argv[2])).logits
    torch.save({"logits": logits, "class": type(model).__name__, "processor": type(processor).__name__}, sys.argv[3])
    """
)


@pytest.mark.slow  # a real run in a subprocess, or a fresh interpreter: seconds on 2 cores
def test_folder_loads_as_remote_code_without_evit_hf(checkpoint_file, tmp_path, pixels):
    folder = tmp_path / "converted"
    model = evit_hf.convert_timm_checkpoint(checkpoint_file, folder, num_attention_heads=HEADS)
    torch.save(pixels, tmp_path / "pixels.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)
    subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_SCRIPT, str(folder), str(tmp_path / "pixels.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path,
        env=env,
        check=True,
    )
    result = torch.load(tmp_path / "out.pt")
    assert (result["class"], result["processor"]) == ("EViTForImageClassification", "EViTImageProcessor")
    with torch.no_grad():
        torch.testing.assert_close(result["logits"], model(pixels).logits, rtol=0, atol=0)


def evaluation_transform(image: Image.Image, input_size: int, crop_offset, grayscale=False) -> torch.Tensor:
    """The reference's evaluation transform by hand: shorter side to int(input_size / 0.875) with PIL bicubic (the
    longer side scaled and truncated), a center crop at `crop_offset(margin)`, ImageNet mean and std (their means
    over the channels for a grayscale image)."""
    width, height = image.size
    short = int(input_size / 0.875)
    if width <= height:
        size = (short, int(short * height / width))
    else:
        size = (int(short * width / height), short)
    resized = image.resize(size, Image.BICUBIC)
    left, top = crop_offset(size[0] - input_size), crop_offset(size[1] - input_size)
    crop = np.asarray(resized.crop((left, top, left + input_size, top + input_size)), dtype=np.float32) / 255
    if grayscale:
        mean, std = np.float32(np.mean([0.485, 0.456, 0.406])), np.float32(np.mean([0.229, 0.224, 0.225]))
        crop = (crop[:, :, None] - mean) / std
    else:
        crop = (crop - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return torch.from_numpy(crop).permute(2, 0, 1)


def reference_crop_offset(margin: int) -> int:
    # The reference's center crop rounds half the margin to the nearest integer (half to even).
    return int(round(margin / 2))


def floor_crop_offset(margin: int) -> int:
    return margin // 2


@pytest.fixture(scope="module")
def photo():
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image("china.jpg"))  # 640 x 427, a real photograph


@pytest.fixture(scope="module")
def processor_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("processor")
    evit_hf.conversion.reference_image_processor(224).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("size", [(300, 420), (427, 427), (640, 256)], ids=["portrait", "square", "landscape"])
def test_image_processor_is_the_reference_transform(photo, processor_folder, size):
    processor = AutoImageProcessor.from_pretrained(processor_folder)
    image = photo.resize(size, Image.BICUBIC) if size != photo.size else photo
    pixel_values = processor(images=image, return_tensors="pt").pixel_values[0]
    expected = evaluation_transform(image, 224, reference_crop_offset)
    assert pixel_values.shape == (3, 224, 224)
    torch.testing.assert_close(pixel_values, expected, rtol=0, atol=1e-5)


def test_image_processor_crops_where_the_reference_crops(photo, processor_folder):
    # 640 x 427 resizes to 383 x 256: the reference crops at round(159 / 2) = 80, where transformers' own center crop
    # (159 // 2 = 79) would start one pixel earlier.
    processor = AutoImageProcessor.from_pretrained(processor_folder)
    assert type(processor) is evit_hf.EViTImageProcessor
    pixel_values = processor(images=photo, return_tensors="pt").pixel_values[0]
    expected = evaluation_transform(photo, 224, reference_crop_offset)
    torch.testing.assert_close(pixel_values, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(pixel_values, evaluation_transform(photo, 224, floor_crop_offset), atol=1e-2)


def half_up_crop_offset(margin: int) -> int:
    return math.floor(margin / 2 + 0.5)


# Sizes whose margin after the resize is odd on one axis (the shorter side goes to 256 px, the crop is 224 px): 157
# (half 78.5: the reference's half to even gives 78, half up 79) and 159 (half 79.5: 80, flooring 79).
ODD_MARGINS = {
    "landscape-157": ((447, 300), half_up_crop_offset),
    "landscape-159": ((449, 300), floor_crop_offset),
    "portrait-157": ((300, 447), half_up_crop_offset),
    "portrait-159": ((300, 449), floor_crop_offset),
}


@pytest.mark.parametrize("case", ODD_MARGINS)
def test_image_processor_rounds_each_axis_as_the_reference(photo, processor_folder, case):
    size, other_rounding = ODD_MARGINS[case]
    processor = AutoImageProcessor.from_pretrained(processor_folder)
    image = photo.resize(size, Image.BICUBIC)
    pixel_values = processor(images=image, return_tensors="pt").pixel_values[0]
    expected = evaluation_transform(image, 224, reference_crop_offset)
    torch.testing.assert_close(pixel_values, expected, rtol=0, atol=1e-5)
    # The other rounding crops one pixel elsewhere on this axis, so a processor rounding that way would fail above.
    assert not torch.allclose(pixel_values, evaluation_transform(image, 224, other_rounding), atol=1e-2)


def test_imagenet_labels_ship_with_the_package():
    path = resources.files("evit_hf").joinpath("data_files", "imagenet1k_labels.txt")
    assert path.is_file()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1000 and lines == imagenet1k_labels()
    assert lines[0] == "tench, Tinca tinca"
    assert lines[1] == "goldfish, Carassius auratus"
    assert lines[999] == "toilet tissue, toilet paper, bathroom tissue"
    assert all(line.strip() == line and line for line in lines)


# ------------------------------------------------------------------------------------------------------------------
# Refusals: one argparse line, exit status 2, nothing written.
# ------------------------------------------------------------------------------------------------------------------

CALLS = []


def record_call(*args):
    """A function a malicious pickle would call on load; the test proves it never ran."""
    CALLS.append(args)
    return args


class CreatesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class CallsAFunction:
    def __reduce__(self):
        return (record_call, ("unpickled",))


def refusal(capsys, argv, output) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", *map(str, argv)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    assert lines[0].startswith("evit-hf convert: error: ")
    assert not output.exists(), "a refused conversion wrote its output folder"
    return lines[0]


def test_refuses_pickles_that_would_run_code(tmp_path, capsys):
    marker = tmp_path / "created_by_unpickling"
    torch.save({"model": timm_state_dict(), "args": CreatesAFile(marker)}, tmp_path / "creates.pth")
    torch.save({"model": timm_state_dict(), "extra": CallsAFunction()}, tmp_path / "calls.pth")
    # Without the safe load, unpickling these does run their code (so the test below can fail):
    assert torch.load(tmp_path / "calls.pth", weights_only=False)["extra"] == ("unpickled",) and CALLS
    CALLS.clear()
    output = tmp_path / "out"
    line = refusal(capsys, [tmp_path / "creates.pth", output], output)
    assert "refusing to read" in line and "system" in line and "could run code" in line
    line = refusal(capsys, [tmp_path / "calls.pth", output], output)
    assert "record_call" in line
    assert not marker.exists() and not CALLS


def unmapped(extra_keys):
    return timm_state_dict(extra=extra_keys)


REFUSALS = {
    "layer-scale-fc-norm-registers-relative-positions": (
        lambda tmp: {
            "model": unmapped(
                ["blocks.0.ls1.gamma", "fc_norm.weight", "reg_token", "blocks.1.attn.relative_position_bias_table"]
            )
        },
        [],
        "4 weight(s) with no place in transformers' ViT/DeiT: blocks.0.ls1.gamma, fc_norm.weight, reg_token, "
        "blocks.1.attn.relative_position_bias_table",
    ),
    "non-square-grid": (
        lambda tmp: {**timm_state_dict(), "pos_embed": torch.zeros(1, 1 + 8 * 6, WIDTH)},
        [],
        "pos_embed has 49 positions, which is not 1 prefix token(s) plus a square grid",
    ),
    "missing-weights": (
        lambda tmp: {k: v for k, v in timm_state_dict().items() if k != "norm.weight"},
        [],
        "lacks weights a timm VisionTransformer has: norm.weight",
    ),
    "missing-block-weight": (
        lambda tmp: {k: v for k, v in timm_state_dict().items() if k != "blocks.2.norm2.bias"},
        [],
        'Missing key(s) in state_dict: "vit.layers.2.layernorm_after.bias"',
    ),
    "ema-without-model-ema": (
        lambda tmp: training_checkpoint(with_ema=False),
        ["--use-ema"],
        "--use-ema (use_ema=True) asks for the EMA weights, but the checkpoint has no 'model_ema' entry",
    ),
    "ema-of-bare-state-dict": (lambda tmp: timm_state_dict(), ["--use-ema"], "bare state dict with no 'model_ema'"),
    "id2label-count": (
        lambda tmp: timm_state_dict(),
        ["--id2label", "@labels3.json"],
        "has 3 names, but the checkpoint's head has 5 classes",
    ),
    "id2label-not-json": (lambda tmp: timm_state_dict(), ["--id2label", "@bad.json"], "is not valid JSON"),
    "id2label-not-utf8": (lambda tmp: timm_state_dict(), ["--id2label", "@latin1.json"], "is not UTF-8 text"),
    "id2label-names-not-text": (
        lambda tmp: timm_state_dict(),
        ["--id2label", "@lists.json"],
        "must map the class indices 0 to N-1 to names",
    ),
    "id2label-missing": (lambda tmp: timm_state_dict(), ["--id2label", "@nothing.json"], "does not exist"),
    "bad-drop-loc": (
        lambda tmp: training_checkpoint(reference_args(drop_loc="layers three and six")),
        [],
        "args.drop_loc is 'layers three and six'; expected 0-based layer indices such as '(3, 6, 9)'",
    ),
    # A falsy setting is a setting: keep rate 0 is refused, not replaced by the default 0.7.
    "args-keep-rate-0": (
        lambda tmp: training_checkpoint(reference_args(base_keep_rate=0.0)),
        [],
        "got 0.0. (from the checkpoint args)",
    ),
    "drop-loc-past-depth": (
        lambda tmp: training_checkpoint(reference_args(drop_loc="(3, 6, 9)")),
        [],
        "got 6 in [3, 6, 9]",
    ),
    "reduction-layer-past-depth": (lambda tmp: timm_state_dict(), ["--reduction-layers", "1", "7"], "got 7 in [1, 7]"),
    "reduction-layer-not-an-index": (lambda tmp: timm_state_dict(), ["--reduction-layers", "x"], "0-based layer"),
    "keep-rate": (lambda tmp: timm_state_dict(), ["--keep-rate", "0"], "argument --keep-rate: keep_rate must be in"),
    "heads-do-not-divide": (
        lambda tmp: timm_state_dict(),
        ["--num-attention-heads", "3"],
        "num_attention_heads=3 does not divide the width 32",
    ),
    "heads-not-inferable": (
        lambda tmp: timm_state_dict(),
        None,
        "the width 32 is not a multiple of 64, so the number of attention heads cannot be inferred; pass "
        "--num-attention-heads",
    ),
    "nb-classes-mismatch": (
        lambda tmp: {**training_checkpoint(reference_args(nb_classes=10))},
        [],
        "args.nb_classes is 10, but its head has 1000 classes",
    ),
    "input-size-mismatch": (
        lambda tmp: training_checkpoint(reference_args(input_size=224)),
        [],
        "args.input_size is 224, but its position embeddings are for 32 px images (8 x 8 patches)",
    ),
    "not-a-checkpoint": (lambda tmp: [torch.zeros(2)], [], "holds a list, not a state dict or a training checkpoint"),
    "no-state-dict": (lambda tmp: {"epoch": 3, "note": "x"}, [], "neither a state dict of tensors nor a checkpoint"),
    "missing-file": (None, [], "checkpoint.pth does not exist or is not a file"),
    "not-a-pickle": (b"not a checkpoint at all", [], "cannot read"),
    "text-file": (b"hello", [], "as a PyTorch checkpoint (KeyError); it is damaged or not a file written by torch"),
    "empty-file": (b"", [], "checkpoint.pth is empty (0 bytes)"),
    "0-d-tensor-file": (lambda tmp: torch.tensor(3.0), [], "holds a Tensor, not a state dict or a training"),
    "0-d-cls-token": (
        lambda tmp: {**timm_state_dict(), "cls_token": torch.tensor(1.0)},
        [],
        "cls_token has shape []; a timm VisionTransformer's cls_token is [1, 1, width]",
    ),
    "0-d-block-weight": (
        lambda tmp: {**timm_state_dict(), "blocks.1.attn.qkv.weight": torch.tensor(1.0)},
        [],
        "1 weight(s) do not fit a 4-layer ViT/DeiT of width 32 with 5 classes (read from cls_token, blocks.N, "
        "blocks.0.mlp.fc1 and head): blocks.1.attn.qkv.weight [] (expected [96, 32])",
    ),
    "0-d-head": (lambda tmp: {**timm_state_dict(), "head.weight": torch.tensor(1.0)}, [], "head.weight has shape []"),
    "width-mismatch": (
        lambda tmp: {**timm_state_dict(), "norm.weight": torch.ones(16)},
        [],
        "norm.weight [16] (expected [32])",
    ),
    "no-classes": (
        lambda tmp: {**timm_state_dict(), "head.weight": torch.zeros(0, WIDTH), "head.bias": torch.zeros(0)},
        [],
        "head.weight has shape [0, 32]; a timm VisionTransformer's head.weight is [classes, width]",
    ),
    "integer-key": (
        lambda tmp: {**timm_state_dict(), 7: torch.zeros(3)},
        [],
        "the state dict has keys that are not parameter names: 7; a state dict maps names such as",
    ),
    "non-tensor-values": (
        lambda tmp: {**timm_state_dict(), "norm.weight": [1.0] * WIDTH, "epoch": 3},
        [],
        "the state dict has entries that are not tensors: norm.weight (list), epoch (int)",
    ),
    "integer-weights": (
        lambda tmp: {**timm_state_dict(), "cls_token": torch.zeros(1, 1, WIDTH, dtype=torch.int64)},
        [],
        "weights that are not floating-point numbers: cls_token (torch.int64)",
    ),
    "non-tensor-in-model": (
        lambda tmp: {"model": {**timm_state_dict(), "n_averaged": 3}},
        [],
        "the checkpoint's 'model' entry has entries that are not tensors: n_averaged (int)",
    ),
    "model-not-a-dict": (lambda tmp: {"model": "vit_small"}, [], "the checkpoint's 'model' entry is a str, not a"),
    "model-empty": (lambda tmp: {"model": {}}, [], "the checkpoint's 'model' entry is empty: it holds no weights"),
    "nested-under-state_dict": (
        lambda tmp: {"state_dict": timm_state_dict(), "epoch": 3},
        [],
        "(its entries: state_dict, epoch). It holds a state dict at checkpoint['state_dict']: save that alone, e.g. "
        "torch.save(checkpoint['state_dict'], 'weights.pth')",
    ),
    "nested-under-model-model": (
        lambda tmp: {"model": {"model": timm_state_dict()}},
        [],
        "It holds a state dict at checkpoint['model']['model']",
    ),
    "qkv-bias-in-some-blocks": (
        lambda tmp: {k: v for k, v in timm_state_dict().items() if k != "blocks.1.attn.qkv.bias"},
        [],
        "blocks 0, 2, 3 have a qkv bias (attn.qkv.bias) and blocks 1 do not",
    ),
    "four-channels": (
        lambda tmp: {**timm_state_dict(), "patch_embed.proj.weight": torch.zeros(WIDTH, 4, PATCH, PATCH)},
        [],
        "the model takes 4 input channels (patch_embed.proj.weight), but images have 3 (RGB) or 1 (grayscale)",
    ),
}


def write_checkpoint(make, path):
    """Writes a `REFUSALS` case's file: what `make` builds, saved with torch.save, or `make` itself as bytes."""
    if callable(make):
        torch.save(make(path.parent), path)
    elif isinstance(make, bytes):
        path.write_bytes(make)


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals(case, tmp_path, capsys):
    make, extra, message = REFUSALS[case]
    checkpoint = tmp_path / "checkpoint.pth"
    write_checkpoint(make, checkpoint)
    (tmp_path / "labels3.json").write_text(json.dumps(["a", "b", "c"]))
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "latin1.json").write_bytes('{"0": "caf\xe9"}'.encode("latin-1"))
    (tmp_path / "lists.json").write_text(json.dumps([[name] for name in "abcde"]))
    output = tmp_path / "out"
    argv = [checkpoint, output] + (["--num-attention-heads", str(HEADS)] if extra is not None else [])
    argv += [str(tmp_path / value[1:]) if value.startswith("@") else value for value in extra or []]
    line = refusal(capsys, argv, output)
    assert message in line, line


def test_refuses_a_folder_of_someone_elses_files_even_with_overwrite(tmp_path, capsys):
    torch.save(timm_state_dict(), tmp_path / "checkpoint.pth")
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("someone's file")
    for overwrite in ([], ["--overwrite"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["convert", str(tmp_path / "checkpoint.pth"), str(output), "--num-attention-heads", str(HEADS),
                  *overwrite])  # fmt: skip
        assert exit_info.value.code == 2
        assert "files that no run of this project wrote there (keep.txt)" in capsys.readouterr().err
        assert os.listdir(output) == ["keep.txt"]


def test_api_refusals_raise_value_errors(tmp_path):
    with pytest.raises(CheckpointConversionError, match="fc_norm.weight"):
        evit_hf.convert_timm_checkpoint(unmapped(["fc_norm.weight"]), tmp_path / "out", num_attention_heads=HEADS)
    assert not (tmp_path / "out").exists()
    assert issubclass(CheckpointConversionError, ValueError)


# Refusals that come from the conversion itself (not from the command's own argument checks).
LIBRARY_REFUSALS = [case for case, (make, extra, _) in REFUSALS.items() if make is not None and not extra]


@pytest.mark.parametrize("case", LIBRARY_REFUSALS)
def test_library_users_get_the_message_of_the_command(case, tmp_path, capsys):
    make, extra, message = REFUSALS[case]
    checkpoint = tmp_path / "checkpoint.pth"
    write_checkpoint(make, checkpoint)
    heads = {"num_attention_heads": HEADS} if extra is not None else {}
    with pytest.raises(CheckpointConversionError) as error:
        evit_hf.convert_timm_checkpoint(checkpoint, tmp_path / "out", **heads)
    assert message in str(error.value)
    assert not (tmp_path / "out").exists()
    argv = [checkpoint, tmp_path / "out"] + (["--num-attention-heads", HEADS] if extra is not None else [])
    assert refusal(capsys, argv, tmp_path / "out") == f"evit-hf convert: error: {' '.join(str(error.value).split())}"


@pytest.mark.parametrize(
    "output, message",
    [("a_file", "cannot write {tmp}/a_file: {tmp}/a_file is a file, not a folder"),
     ("a_file/converted", "{tmp}/a_file is a file, not a folder"),
     ("/proc/evit-hf/converted", "cannot create files in /proc")],
    ids=["a-file", "inside-a-file", "not-writable"],
)  # fmt: skip
def test_refuses_an_output_folder_it_cannot_write(output, message, checkpoint_file, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    output = output if output.startswith("/") else str(tmp_path / output)
    line = refusal(capsys, [checkpoint_file, output, "--num-attention-heads", HEADS], tmp_path / "converted")
    assert line.startswith("evit-hf convert: error: argument output_dir: cannot write ")
    assert message.format(tmp=tmp_path) in line
    assert (tmp_path / "a_file").read_text() == "not a folder"


@pytest.mark.parametrize("content", [b"", b"not a safetensors file"], ids=["empty", "text"])
def test_refuses_a_safetensors_file_that_is_none(content, tmp_path, capsys):
    (tmp_path / "weights.safetensors").write_bytes(content)
    line = refusal(capsys, [tmp_path / "weights.safetensors", tmp_path / "out"], tmp_path / "out")
    assert ("is empty (0 bytes)" if not content else "cannot read") in line


def test_falsy_args_values_are_the_checkpoints_settings(tmp_path, pixels):
    # fuse_token=False and drop_loc=0 are settings like any other: they must not fall back to the defaults (fused,
    # the paper's layers), which would convert the model as one it was not trained as.
    args = reference_args(base_keep_rate=0.5, drop_loc=0, fuse_token=False)
    torch.save(training_checkpoint(args, with_ema=False), tmp_path / "checkpoint.pth")
    folder = tmp_path / "converted"
    convert([tmp_path / "checkpoint.pth", folder, "--num-attention-heads", HEADS])
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    config = model.config
    assert (config.keep_rate, config.reduction_layers, config.fuse_inattentive_tokens) == (0.5, [0], False)
    assert_matches_reference(model, training_checkpoint()["model"], pixels, 0.5, [0], False)
    card = (folder / "README.md").read_text()
    assert "| inattentive tokens | dropped | checkpoint args |" in card
    assert "| reduction layers (0-based) | 0 | checkpoint args |" in card


def test_checkpoint_without_qkv_bias(tmp_path, pixels):
    # timm's qkv_bias=False models have no blocks.N.attn.qkv.bias: the configuration says so, and the logits are the
    # method's on those weights.
    state_dict = {key: value for key, value in timm_state_dict(seed=5).items() if not key.endswith("attn.qkv.bias")}
    save_file(state_dict, tmp_path / "no_qkv_bias.safetensors")
    folder = tmp_path / "converted"
    with pytest.warns(UserWarning, match="no id2label"):
        convert([tmp_path / "no_qkv_bias.safetensors", folder, "--num-attention-heads", HEADS])
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    assert model.config.qkv_bias is False
    assert model.vit.layers[0].attention.q_proj.bias is None
    assert_matches_reference(model, state_dict, pixels, 0.7, DEFAULT_LAYERS, True)


def test_one_channel_checkpoint_gets_a_grayscale_processor(tmp_path, photo):
    # A patch embedding with one input channel: the folder's processor turns a colour photo into the one channel the
    # model takes (PIL's luma, the ImageNet mean and std averaged over the channels), as the model expects it.
    state_dict = timm_state_dict(seed=6)
    state_dict["patch_embed.proj.weight"] = state_dict["patch_embed.proj.weight"][:, :1].clone()
    torch.save(state_dict, tmp_path / "grayscale.pth")
    folder = tmp_path / "converted"
    with pytest.warns(UserWarning, match="no id2label"):
        convert([tmp_path / "grayscale.pth", folder, "--num-attention-heads", HEADS])
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    assert model.config.num_channels == 1
    pixel_values = processor(images=photo, return_tensors="pt").pixel_values
    assert pixel_values.shape == (1, 1, IMAGE_SIZE, IMAGE_SIZE)
    expected = evaluation_transform(photo.convert("L"), IMAGE_SIZE, reference_crop_offset, grayscale=True)
    torch.testing.assert_close(pixel_values[0], expected, rtol=0, atol=1e-5)
    # Arrays (as data pipelines pass them) are converted with the same weights.
    from_array = processor(images=np.asarray(photo), return_tensors="pt").pixel_values
    torch.testing.assert_close(from_array, pixel_values, rtol=0, atol=2 / 255 / 0.226)
    assert_matches_reference(model, state_dict, pixel_values, 0.7, DEFAULT_LAYERS, True)
