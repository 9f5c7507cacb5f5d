import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    ViTForImageClassification,
    ViTImageProcessor,
    pipeline,
)

import evit_hf

from .model_builders import FAMILIES, TINY, main_output, stock_and_evit, stock_config


def to_original_key(key: str) -> str:
    """The key names transformers 4.x wrote and most Hub repositories hold."""
    key = re.sub(r"(^|\.)layers\.(\d+)\.", r"\1encoder.layer.\2.", key)
    key = key.replace("attention.q_proj", "attention.attention.query")
    key = key.replace("attention.k_proj", "attention.attention.key")
    key = key.replace("attention.v_proj", "attention.attention.value")
    key = key.replace("attention.o_proj", "attention.output.dense")
    key = key.replace("mlp.fc1", "intermediate.dense")
    return key.replace("mlp.fc2", "output.dense")


def write_checkpoint(model, folder, layout):
    """Saves `model` with its weights named in the current ("current") or in the 4.x ("original") layout."""
    model.save_pretrained(folder, save_original_format=False)
    if layout == "original":
        weights = load_file(os.path.join(folder, "model.safetensors"))
        save_file(
            {to_original_key(k): v.contiguous() for k, v in weights.items()},
            os.path.join(folder, "model.safetensors"),
            metadata={"format": "pt"},
        )
    keys = load_file(os.path.join(folder, "model.safetensors")).keys()
    assert any("attention.attention.query" in k for k in keys) == (layout == "original")


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_keys_are_the_stock_keys(family):
    stock, evit = stock_and_evit(family)
    assert list(evit.state_dict()) == list(stock.state_dict())
    assert sum(p.numel() for p in evit.parameters()) == sum(p.numel() for p in stock.parameters())


@pytest.mark.parametrize("layout", ["current", "original"])
@pytest.mark.parametrize("family", FAMILIES)
def test_plain_checkpoints_load_every_weight(family, layout, tmp_path, pixel_values):
    stock, _ = stock_and_evit(family)
    write_checkpoint(stock, tmp_path, layout)
    evit_class = FAMILIES[family][1]
    evit, info = evit_class.from_pretrained(
        tmp_path, keep_rate=0.5, fuse_inattentive_tokens=False, output_loading_info=True
    )
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(evit) is evit_class
    assert (evit.config.keep_rate, evit.config.fuse_inattentive_tokens) == (0.5, False)
    for name, tensor in stock.state_dict().items():
        assert torch.equal(evit.state_dict()[name], tensor), name
    with torch.no_grad():
        assert torch.equal(main_output(evit.eval()(pixel_values, keep_rate=1.0)), main_output(stock(pixel_values)))


@pytest.mark.parametrize("family", FAMILIES)
def test_evit_checkpoints_load_back_into_plain_models(family, tmp_path, pixel_values):
    _, evit = stock_and_evit(family)
    evit.save_pretrained(tmp_path)
    stock_class = FAMILIES[family][0]
    stock, info = stock_class.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert torch.equal(main_output(stock.eval()(pixel_values)), main_output(evit(pixel_values, keep_rate=1.0)))


def test_saved_evit_folder_round_trips(tmp_path, pixel_values):
    _, evit = stock_and_evit("deit-teacher", keep_rate=0.5, reduction_layers=[0, 2])
    evit.save_pretrained(tmp_path)
    loaded, info = AutoModelForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is evit_hf.EViTDeiTForImageClassificationWithTeacher  # picked by config.architectures
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (loaded.config.keep_rate, loaded.config.reduction_layers) == (0.5, [0, 2])
    with torch.no_grad():
        assert torch.equal(loaded.eval()(pixel_values).logits, evit(pixel_values).logits)


def test_auto_classes_know_evit():
    assert isinstance(AutoConfig.for_model("evit"), evit_hf.EViTConfig)
    assert isinstance(AutoConfig.for_model("evit_deit"), evit_hf.EViTDeiTConfig)
    config = evit_hf.EViTConfig(**TINY)
    assert type(AutoModel.from_config(config)) is evit_hf.EViTModel
    assert type(AutoModelForImageClassification.from_config(config)) is evit_hf.EViTForImageClassification
    # Like stock DeiT, `architectures` picks the head (transformers needs it set for DeiT's two heads).
    for head in (evit_hf.EViTDeiTForImageClassification, evit_hf.EViTDeiTForImageClassificationWithTeacher):
        deit_config = evit_hf.EViTDeiTConfig(**TINY, architectures=[head.__name__])
        assert type(AutoModelForImageClassification.from_config(deit_config)) is head
    assert type(AutoModel.from_config(deit_config)) is evit_hf.EViTDeiTModel


def test_config_rejects_other_model_types(tmp_path):
    stock_config("deit-teacher").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="EViTDeiTForImageClassificationWithTeacher"):
        evit_hf.EViTForImageClassification.from_pretrained(tmp_path)


def test_save_pretrained_writes_safetensors_auto_map_and_code(tmp_path):
    _, evit = stock_and_evit("vit-classifier")
    evit.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"model.safetensors", "config.json", "configuration_evit.py", "modeling_evit.py"} <= files
    assert "token_reorganization.py" in files  # imported by modeling_evit.py
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "evit"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_evit.EViTConfig",
        "AutoModelForImageClassification": "modeling_evit.EViTForImageClassification",
    }


def test_image_classification_pipeline(tmp_path):
    _, evit = stock_and_evit("vit-classifier", keep_rate=0.5)
    evit.config.id2label = {i: f"class_{i}" for i in range(TINY["num_labels"])}
    evit.config.label2id = {v: k for k, v in evit.config.id2label.items()}
    evit.save_pretrained(tmp_path)
    size = TINY["image_size"]
    processor = ViTImageProcessor(size={"height": size, "width": size})
    processor.save_pretrained(tmp_path)
    classifier = pipeline("image-classification", model=str(tmp_path))
    assert isinstance(classifier.model, evit_hf.EViTForImageClassification)
    image = Image.fromarray(
        (torch.rand(40, 50, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    )
    predictions = classifier(image, top_k=3)
    # The model in memory on the same pixels: softmax over its logits, the three most likely classes.
    with torch.no_grad():
        probabilities = evit(processor(images=image, return_tensors="pt").pixel_values).logits.softmax(dim=-1)[0]
    top = probabilities.topk(3)
    assert [p["label"] for p in predictions] == [f"class_{i}" for i in top.indices.tolist()]
    assert [p["score"] for p in predictions] == pytest.approx(top.values.tolist(), rel=1e-5, abs=1e-7)


OFFLINE_HUB_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    import evit_hf
    model = evit_hf.EViTForImageClassification.from_pretrained("some-org/tiny-vit", keep_rate=0.5).eval()
    assert model.config.keep_rate == 0.5
    pixel_values = torch.load(sys.argv[1])
    with torch.no_grad():
        full, reduced = model(pixel_values, keep_rate=1.0), model(pixel_values)
    torch.save({"full": full.logits, "reduced": reduced.logits, "kept": reduced.kept_token_indices}, sys.argv[2])
    """
)


@pytest.mark.slow  # a real run in a subprocess, or a fresh interpreter: seconds on 2 cores
def test_loads_a_hub_id_from_an_offline_cache(tmp_path, pixel_values):
    stock, _ = stock_and_evit("vit-classifier")
    # The layout huggingface_hub writes: models--ORG--NAME/{refs/main, snapshots/REVISION/...}
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--some-org--tiny-vit"
    write_checkpoint(stock, repo / "snapshots" / revision, "original")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    torch.save(pixel_values, tmp_path / "pixels.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    subprocess.run(
        [sys.executable, "-c", OFFLINE_HUB_SCRIPT, str(tmp_path / "pixels.pt"), str(tmp_path / "out.pt")],
        env=env,
        check=True,
    )
    result = torch.load(tmp_path / "out.pt")
    _, evit = stock_and_evit("vit-classifier", keep_rate=0.5)  # the same weights, built here
    with torch.no_grad():
        stock_logits = stock(pixel_values).logits
        expected = evit(pixel_values)
    torch.testing.assert_close(result["full"], stock_logits, rtol=0, atol=0)  # keep 1: the stock model's logits
    torch.testing.assert_close(result["reduced"], expected.logits, rtol=0, atol=0)
    assert [k.tolist() for k in result["kept"]] == [k.tolist() for k in expected.kept_token_indices]


def test_stock_classes_are_unchanged_by_import():
    # evit_hf registers new names only: the stock ViT classes still build stock layers.
    model = ViTForImageClassification(stock_config("vit-classifier"))
    assert type(model.vit.layers[0]).__name__ == "ViTLayer"


FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
SAVED_BEFORE_FAMILIES = os.path.join(FIXTURES, "saved_before_families")
# The frozen single-file model code that every folder shipped is stored once and copied into each folder here.
SAVED_BEFORE_FAMILIES_CODE = os.path.join(FIXTURES, "saved_before_families_code")
OLD_FOLDERS = sorted(os.listdir(SAVED_BEFORE_FAMILIES))
# The stored outputs were computed on another CPU: its matrix kernels (another instruction set, another summation
# order) differ in the last bits, a few 1e-6 for these float32 outputs. A wrong computation differs by far more, and
# the kept tokens are compared exactly.
STORED_OUTPUT_TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def old_folders(tmp_path_factory) -> dict[str, str]:
    """Each folder saved before the family split, whole again: its weights and outputs plus the stored model code."""
    root = tmp_path_factory.mktemp("saved_before_families")
    folders = {}
    for name in OLD_FOLDERS:
        folder = shutil.copytree(os.path.join(SAVED_BEFORE_FAMILIES, name), root / name)
        for code_file in sorted(os.listdir(SAVED_BEFORE_FAMILIES_CODE)):
            shutil.copy(os.path.join(SAVED_BEFORE_FAMILIES_CODE, code_file), folder / code_file)
        folders[name] = str(folder)
    return folders


def _old_folder_inputs_and_expected(name):
    expected = torch.load(os.path.join(SAVED_BEFORE_FAMILIES, name, "expected.pt"))
    return expected["inputs"], expected


@pytest.mark.parametrize("name", OLD_FOLDERS)
def test_folders_saved_before_the_family_split_load(name, old_folders):
    # Written by the single-file model code (`modeling_evit.py` holding every family): evit_hf's classes of the same
    # names load them and compute what they computed then.
    folder = old_folders[name]
    inputs, expected = _old_folder_inputs_and_expected(name)
    model, info = getattr(evit_hf, expected["class"]).from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    auto_class = AutoModelForImageClassification if "ForImageClassification" in expected["class"] else AutoModel
    assert type(auto_class.from_pretrained(folder)) is type(model)
    with torch.no_grad():
        output = model.eval()(**inputs)
    torch.testing.assert_close(getattr(output, expected["output_name"]), expected["output"], **STORED_OUTPUT_TOLERANCE)
    for got, want in zip(output.kept_token_indices, expected["kept_token_indices"], strict=True):
        assert torch.equal(got, want)


OLD_FOLDER_REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, torch
    import transformers
    results = {}
    for folder in sys.argv[1:-1]:
        auto_map = json.load(open(os.path.join(folder, "config.json")))["auto_map"]
        auto_class = next(name for name in auto_map if name != "AutoConfig")
        model = getattr(transformers, auto_class).from_pretrained(folder, trust_remote_code=True).eval()
        expected = torch.load(os.path.join(folder, "expected.pt"))
        with torch.no_grad():
            output = model(**expected["inputs"])
        results[folder] = (type(model).__name__, getattr(output, expected["output_name"]), output.kept_token_indices)
    assert "evit_hf" not in sys.modules, "evit_hf was imported"
    torch.save(results, sys.argv[-1])
    """
)


@pytest.mark.slow  # a real run in a subprocess, or a fresh interpreter: seconds on 2 cores
def test_folders_saved_before_the_family_split_load_as_remote_code(tmp_path, old_folders):
    folders = [old_folders[name] for name in OLD_FOLDERS]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)
    subprocess.run(
        [sys.executable, "-c", OLD_FOLDER_REMOTE_SCRIPT, *folders, str(tmp_path / "out.pt")],
        cwd=tmp_path,
        env=env,
        check=True,
    )
    results = torch.load(tmp_path / "out.pt")
    for name, folder in zip(OLD_FOLDERS, folders, strict=True):
        _, expected = _old_folder_inputs_and_expected(name)
        class_name, output, kept = results[folder]
        assert class_name == expected["class"]
        torch.testing.assert_close(output, expected["output"], **STORED_OUTPUT_TOLERANCE)
        assert all(torch.equal(a, b) for a, b in zip(kept, expected["kept_token_indices"], strict=True))
