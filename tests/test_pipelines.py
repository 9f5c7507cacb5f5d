"""transformers pipelines on EViT models of every family that serves them: with evit_hf imported, and from saved
folders as remote code in a process that cannot import evit_hf."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from evit_hf.families import (
    FAMILIES,
    IMAGE_CLASSIFICATION,
    IMAGE_FEATURE_EXTRACTION,
    PIPELINE_AUTO_CLASSES,
    ZERO_SHOT_IMAGE_CLASSIFICATION,
)

from .family_folders import builders_for, tiny_image_processor, tiny_tokenizer, write_family_folder
from .model_builders import IMAGE_MODEL_FAMILIES, TINY


LABELS = ["cat", "dog", "car", "tree", "sky"]  # the classifiers' 5 labels, and the zero-shot candidates
TEMPLATE = "a photo of a {}."  # short enough for the tiny text tower's 16 positions


def pipeline_cases() -> list[tuple[str, str, str]]:
    """(task, family, builder) for every family whose record lists the task."""
    return [
        (task, family_name, builder)
        for task, auto_class_name in PIPELINE_AUTO_CLASSES.items()
        for family_name, builder in builders_for(auto_class_name)
        if task in next(family for family in FAMILIES if family.name == family_name).pipelines
    ]


CASES = pipeline_cases()
CASE_IDS = [f"{task}-{family}" for task, family, _ in CASES]


def test_every_pipeline_of_the_family_table_has_a_case():
    # The vision-language families' image-text-to-text pipeline runs in tests/test_llava_hub.py.
    listed = {(task, family.name) for family in IMAGE_MODEL_FAMILIES for task in family.pipelines}
    assert {(task, family) for task, family, _ in CASES} == listed


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(np.random.RandomState(0).randint(0, 256, (40, 48, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """builder -> (its saved folder, its model), once for the module."""
    root = tmp_path_factory.mktemp("pipeline-folders")
    saved = {}
    for _, _, builder in CASES:
        if builder not in saved:
            folder = root / builder
            saved[builder] = (str(folder), write_family_folder(builder, folder, keep_rate=0.5, label_names=LABELS))
    return saved


def call_pipeline(task_pipeline, task: str, image):
    if task == ZERO_SHOT_IMAGE_CLASSIFICATION:
        return task_pipeline(image, candidate_labels=LABELS, hypothesis_template=TEMPLATE)
    if task == IMAGE_CLASSIFICATION:
        return task_pipeline(image, top_k=len(LABELS))
    return task_pipeline(image)


def expected_result(task: str, model, image):
    """What the task's pipeline should answer, computed from the model directly: label -> score, or the features."""
    pixel_values = tiny_image_processor()(images=image, return_tensors="pt").pixel_values
    with torch.no_grad():
        if task == IMAGE_CLASSIFICATION:
            scores = model(pixel_values).logits.softmax(dim=-1)[0]
            return {model.config.id2label[index]: float(score) for index, score in enumerate(scores)}
        if task == ZERO_SHOT_IMAGE_CLASSIFICATION:
            text = tiny_tokenizer()([TEMPLATE.format(label) for label in LABELS], padding=True, return_tensors="pt")
            scores = model(pixel_values=pixel_values, **text).logits_per_image.softmax(dim=-1)[0]
            return dict(zip(LABELS, map(float, scores), strict=True))
        output = model(pixel_values)
    num_patches = (TINY["image_size"] // TINY["patch_size"]) ** 2
    assert output.last_hidden_state.shape[1] < num_patches  # the features of the reduced sequence
    return output.last_hidden_state[0].tolist()


def comparable(task: str, result):
    if task == IMAGE_FEATURE_EXTRACTION:
        return result[0]
    return {entry["label"]: entry["score"] for entry in result}


def assert_same(task: str, got, expected):
    if task == IMAGE_FEATURE_EXTRACTION:
        np.testing.assert_allclose(np.array(got), np.array(expected), rtol=0, atol=1e-5)
    else:
        assert got.keys() == expected.keys()
        for label, score in expected.items():
            assert got[label] == pytest.approx(score, abs=1e-6), label


@pytest.mark.parametrize("task, family, builder", CASES, ids=CASE_IDS)
def test_pipeline_with_evit_hf_imported(task, family, builder, folders, image):
    folder, model = folders[builder]
    task_pipeline = pipeline(task, model=folder)
    assert type(task_pipeline.model) is type(model)
    assert_same(task, comparable(task, call_pipeline(task_pipeline, task, image)), expected_result(task, model, image))


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class HideEViT(importlib.abc.MetaPathFinder):
        # evit_hf is installed in this environment: hide it, as on a machine without it.
        def find_spec(self, name, path=None, target=None):
            if name == "evit_hf" or name.startswith("evit_hf."):
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, HideEViT())
    import numpy as np
    from PIL import Image
    from transformers import pipeline

    cases, labels, template, output = json.loads(sys.argv[1])
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (40, 48, 3), dtype=np.uint8))
    results = []
    for task, folder in cases:
        task_pipeline = pipeline(task, model=folder, trust_remote_code=True)
        if task == "zero-shot-image-classification":
            result = task_pipeline(image, candidate_labels=labels, hypothesis_template=template)
        elif task == "image-classification":
            result = task_pipeline(image, top_k=len(labels))
        else:
            result = task_pipeline(image)
        results.append({"class": type(task_pipeline.model).__name__, "module": type(task_pipeline.model).__module__,
                        "result": result})
    assert not any(name.split(".")[0] == "evit_hf" for name in sys.modules), "evit_hf was imported"
    json.dump(results, open(output, "w"))
    """
)


@pytest.mark.parametrize("task, family, builder", CASES, ids=CASE_IDS)
def test_saved_auto_map_names_the_auto_class_of_each_pipeline(task, family, builder, folders):
    # register_for_auto_class records one Auto class per model; the folder's auto_map must name the task's too.
    folder, model = folders[builder]
    auto_map = json.loads((Path(folder) / "config.json").read_text())["auto_map"]
    module = type(model).__module__.split(".")[-1]
    assert auto_map[PIPELINE_AUTO_CLASSES[task]] == f"{module}.{type(model).__name__}"


@pytest.mark.slow  # about 10 s: a fresh interpreter imports transformers and builds a pipeline per case
def test_pipelines_run_saved_folders_as_remote_code_without_evit_hf(folders, image, tmp_path):
    cases = [(task, folders[builder][0]) for task, _, builder in CASES]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)
    arguments = json.dumps([cases, LABELS, TEMPLATE, str(tmp_path / "results.json")])
    subprocess.run([sys.executable, "-c", REMOTE_CODE_SCRIPT, arguments], cwd=tmp_path, env=env, check=True)
    results = json.loads((tmp_path / "results.json").read_text())
    for (task, family, builder), result in zip(CASES, results, strict=True):
        model = folders[builder][1]
        assert result["class"] == type(model).__name__, (task, family)
        assert result["module"].startswith("transformers_modules"), (task, family)  # the folder's own code
        assert_same(task, comparable(task, result["result"]), expected_result(task, model, image))


def test_a_folder_with_the_reference_image_processor_asks_no_trust_question(tmp_path, monkeypatch):
    # Converted reference checkpoints save EViTImageProcessor, whose `auto_map` transformers' AutoVideoProcessor (tried
    # by `pipeline` for image tasks) reads as remote code to trust. With evit_hf imported, nothing asks.
    import evit_hf

    write_family_folder("vit-classifier", tmp_path)
    evit_hf.EViTImageProcessor(
        size={"height": TINY["image_size"], "width": TINY["image_size"]},
        crop_size={"height": TINY["image_size"], "width": TINY["image_size"]},
    ).save_pretrained(tmp_path)
    assert "auto_map" in json.loads((tmp_path / "preprocessor_config.json").read_text())
    monkeypatch.setattr("builtins.input", lambda prompt="": pytest.fail(f"pipeline asked: {prompt}"))
    classify = pipeline("image-classification", model=str(tmp_path))
    assert type(classify.image_processor).__name__ == "EViTImageProcessor"
    assert len(classify(Image.new("RGB", (40, 36)))) > 0
