import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from PIL import Image
from transformers import BertConfig

import evit_hf
from evit_hf import fine_tuning

from .example_modules import digits_budget_study, digits_demo, evaluate_keep_rates, run_image_classification
from .run_helpers import DIGIT_LABELS, save_small_vit, training_args


@pytest.fixture(scope="module")
def fine_tuned(small_vit, tmp_path_factory):
    """The example run on the embedded digits: a small ViT fine-tuned as EViT 0.7."""
    output_dir = tmp_path_factory.mktemp("run") / "evit-digits"
    results = run_image_classification.main(training_args(small_vit, output_dir, "--keep_rate", "0.7"))
    return output_dir, results


def test_fine_tuning_writes_results_model_and_card(fine_tuned):
    output_dir, results = fine_tuned
    all_results = json.loads((output_dir / "all_results.json").read_text())
    assert {"train_loss", "eval_accuracy", "eval_top5_accuracy"} <= set(all_results)
    assert all_results["eval_accuracy"] == results["eval_accuracy"]
    model = evit_hf.EViTForImageClassification.from_pretrained(output_dir)
    assert model.config.keep_rate == 0.7 and model.config.id2label[3] == "3"

    card = (output_dir / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "transformers"
    assert {"evit", "image-classification"} <= set(metadata["tags"])
    reported = metadata["model-index"][0]["results"][0]["metrics"]
    rows = json.loads((output_dir / "keep_rate_results.json").read_text())
    at_target = next(row for row in rows if row["keep_rate"] == 0.7)
    assert {m["type"]: m["value"] for m in reported} == {
        "accuracy": at_target["accuracy"],
        "top5_accuracy": at_target["top5_accuracy"],
    }
    assert "| keep rate | accuracy | top-5 | images/s | MACs |" in card
    assert "| reduction layers | 1, 2, 3 |" in card
    assert "@inproceedings{liang2022evit" in card


def test_published_folder_holds_safetensors_code_processor_and_card(fine_tuned):
    output_dir, _ = fine_tuned
    (output_dir / "checkpoint-2").mkdir(exist_ok=True)
    (output_dir / "checkpoint-2" / "model.safetensors").write_bytes(b"")
    published = fine_tuning.published_files(str(output_dir))
    assert {
        "model.safetensors",
        "config.json",
        "configuration_evit.py",
        "modeling_evit.py",
        "token_reorganization.py",
        "preprocessor_config.json",
        "README.md",
    } <= set(published)
    assert os.path.exists(output_dir / "training_args.bin")  # written by Trainer, never published
    assert not any(path.endswith((".bin", ".pt", ".pth", ".pkl")) or "checkpoint-" in path for path in published)
    assert "auto_map" in json.loads((output_dir / "config.json").read_text())


OFFLINE_LOAD = """
import sys, torch
from transformers import AutoImageProcessor, AutoModelForImageClassification
model = AutoModelForImageClassification.from_pretrained("me/evit-digits", trust_remote_code=True)
processor = AutoImageProcessor.from_pretrained("me/evit-digits")
assert "evit_hf" not in sys.modules
print(type(model).__name__, model.config.keep_rate, type(processor).__name__)
"""


@pytest.mark.slow  # a fresh process (~4 s); test_loading loads a Hub id from an offline cache by default
def test_published_model_loads_by_repo_id_from_an_offline_cache(fine_tuned, tmp_path):
    output_dir, _ = fine_tuned
    revision = "f" * 40
    snapshot = tmp_path / "hub" / "models--me--evit-digits" / "snapshots" / revision
    for relative in fine_tuning.published_files(str(output_dir)):
        (snapshot / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(output_dir / relative, snapshot / relative)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(revision)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run(
        [sys.executable, "-c", OFFLINE_LOAD], env=env, cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert result.stdout.split()[-3:] == ["EViTForImageClassification", "0.7", "ViTImageProcessorPil"] or (
        result.stdout.split()[-3:-1] == ["EViTForImageClassification", "0.7"]
    )


def test_arguments_from_a_json_file(small_vit, tmp_path):
    arguments = {
        "model_name_or_path": small_vit,
        "output_dir": str(tmp_path / "out"),
        "do_eval": True,
        "keep_rate": 0.5,
        "report_to": "none",
        "max_eval_samples": 32,
        "card_keep_rates": [],
    }
    path = tmp_path / "args.json"
    path.write_text(json.dumps(arguments))
    results = run_image_classification.main([str(path)])
    assert "eval_accuracy" in results
    assert evit_hf.EViTForImageClassification.from_pretrained(tmp_path / "out").config.keep_rate == 0.5


def test_image_folders_with_custom_columns(tmp_path):
    labels = ["cat", "dog"]
    for split, count in (("train", 6), ("val", 4)):
        for label in labels:
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                color = (200, 30, 30) if label == "cat" else (30, 30, 200)
                Image.new("RGB", (40, 36), color).save(folder / f"{i}.png")
    model = save_small_vit(tmp_path / "model", labels=labels)
    results = run_image_classification.main(
        training_args(model, tmp_path / "out", "--train_dir", str(tmp_path / "train"), "--validation_dir",
                      str(tmp_path / "val"), "--max_steps", "2")
    )  # fmt: skip
    assert 0.0 <= results["eval_accuracy"] <= 1.0
    assert "eval_top5_accuracy" not in results  # two classes: no top-5
    with pytest.raises(ValueError, match="no image column 'picture'.*--image_column_name"):
        run_image_classification.main(
            training_args(model, tmp_path / "out2", "--train_dir", str(tmp_path / "train"), "--image_column_name",
                          "picture")
        )  # fmt: skip


def test_resumes_from_the_last_checkpoint(small_vit, tmp_path):
    output_dir = tmp_path / "out"
    args = training_args(small_vit, output_dir, "--save_strategy", "steps", "--save_steps", "2")
    run_image_classification.main([*args, "--max_steps", "2"])
    checkpoint_state = output_dir / "checkpoint-2" / "trainer_state.json"
    state = json.loads(checkpoint_state.read_text())
    state["log_history"].append({"step": 2, "marker": "from checkpoint-2"})  # survives only if the run resumes
    checkpoint_state.write_text(json.dumps(state))
    run_image_classification.main(args)  # max_steps 4: continues from checkpoint-2
    final = json.loads((output_dir / "trainer_state.json").read_text())
    assert final["global_step"] == 4
    assert {"step": 2, "marker": "from checkpoint-2"} in final["log_history"]


def test_labels_that_do_not_match_the_head(tmp_path):
    model = save_small_vit(tmp_path / "model", labels=[f"class {i}" for i in range(10)])
    with pytest.raises(ValueError, match="--ignore_mismatched_sizes"):
        run_image_classification.main(training_args(model, tmp_path / "out"))
    results = run_image_classification.main(
        training_args(model, tmp_path / "out", "--ignore_mismatched_sizes", "--max_steps", "1")
    )
    assert "eval_accuracy" in results


def test_a_model_of_no_family_is_refused(tmp_path):
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path / "bert"
    )
    with pytest.raises(ValueError, match="'bert' model, of no family .*fine-tunes image classifiers of ViT, DeiT"):
        run_image_classification.main(training_args(tmp_path / "bert", tmp_path / "out"))


def test_a_schedule_that_ends_above_its_start(small_vit, tmp_path):
    with pytest.raises(ValueError, match="keep_rate must be in"):
        run_image_classification.main(
            training_args(small_vit, tmp_path / "out", "--keep_rate", "1.2", "--keep_rate_shrink", "1")
        )


@pytest.mark.parametrize("which", ["off-the-shelf", "fine-tuned"])
def test_evaluate_keep_rates_table(which, small_vit, fine_tuned, tmp_path):
    model = small_vit if which == "off-the-shelf" else str(fine_tuned[0])
    rows = evaluate_keep_rates.main(
        ["--model_name_or_path", model, "--output_dir", str(tmp_path), "--keep_rates", "1.0", "0.7", "0.5",
         "--max_eval_samples", "64"]
    )  # fmt: skip
    assert [row["keep_rate"] for row in rows] == [1.0, 0.7, 0.5]
    assert all(0 <= row["accuracy"] <= 1 and row["images_per_s"] > 0 for row in rows)
    assert rows[0]["macs"] > rows[1]["macs"] > rows[2]["macs"]
    saved = json.loads((tmp_path / "keep_rates.json").read_text())
    assert saved["rows"] == rows
    assert (tmp_path / "keep_rates.md").read_text().startswith("| keep rate | accuracy | top-5 | images/s | MACs |")


def test_evaluate_keep_rates_streaming_gives_the_rows_of_the_downloaded_split(small_vit, tmp_path):
    # A dataset folder with a validation split, read as the Hub's datasets are (load_dataset of a path).
    for label in DIGIT_LABELS:
        for i in range(2):
            folder = tmp_path / "data" / "validation" / label
            folder.mkdir(parents=True, exist_ok=True)
            Image.effect_noise((40, 36), 20 + 10 * i + int(label)).convert("RGB").save(folder / f"{i}.png")
    common = ["--model_name_or_path", small_vit, "--dataset_name", str(tmp_path / "data"),
              "--keep_rates", "1.0", "0.5", "--batch_size", "8", "--num_workers", "1"]  # fmt: skip
    downloaded = evaluate_keep_rates.main([*common, "--output_dir", str(tmp_path / "downloaded")])
    streamed = evaluate_keep_rates.main([*common, "--output_dir", str(tmp_path / "streamed"), "--streaming"])
    assert [row["samples"] for row in streamed] == [20, 20]
    for row, expected in zip(streamed, downloaded, strict=True):
        assert row.pop("images_per_s") > 0 and expected.pop("images_per_s") > 0
        assert row == expected
    with pytest.raises(ValueError, match="--streaming reads a Hub dataset: pass --dataset_name"):
        evaluate_keep_rates.main(
            ["--model_name_or_path", small_vit, "--output_dir", str(tmp_path / "x"), "--streaming"]
        )
    with pytest.raises(ValueError, match="float16 is for CUDA"):
        evaluate_keep_rates.main(
            [*common, "--output_dir", str(tmp_path / "x"), "--dtype", "float16", "--device", "cpu"]
        )


def test_visualize_kept_tokens_and_cli(fine_tuned, tmp_path):
    output_dir, _ = fine_tuned
    model = evit_hf.EViTForImageClassification.from_pretrained(output_dir)
    picture = evit_hf.visualize_kept_tokens(model, torch.randn(3, 32, 32), keep_rate=0.5)
    assert picture.width > 4 * 32 and picture.height > 32  # input + 3 reduction layers
    image_path = tmp_path / "digit.png"
    Image.new("L", (8, 8), 0).save(image_path)
    from evit_hf.cli import main as cli

    cli(["visualize", "--model", str(output_dir), "--image", str(image_path), "--output", str(tmp_path / "v.png")])
    assert Image.open(tmp_path / "v.png").size == picture.size
    with pytest.raises(ValueError, match="image processor"):
        evit_hf.visualize_kept_tokens(model, Image.open(image_path))


@pytest.mark.slow  # a real run in a subprocess, or a fresh interpreter: seconds on 2 cores
def test_digits_demo_quick_run(tmp_path):
    summary = digits_demo.run(str(tmp_path), seed=0, vit_epochs=1, evit_epochs=1)
    evit_folder = tmp_path / "evit"
    assert {"model.safetensors", "README.md", "accuracy_speed_vs_keep_rate.png", "kept_tokens.png"} <= set(
        os.listdir(evit_folder)
    )
    assert [row["keep_rate"] for row in summary["fine_tuned"]] == digits_demo.KEEP_RATES
    assert 0 < summary["ink"]["ink_share_of_all_patches"] < 1
    assert "ink" in (evit_folder / "README.md").read_text()


@pytest.mark.slow
def test_digits_demo_reaches_its_target(tmp_path):
    # The full demo (about two minutes): fine-tuned EViT 0.7 within 1 point of the ViT it started from.
    summary = digits_demo.run(str(tmp_path), seed=0)
    at_target = next(row for row in summary["fine_tuned"] if row["keep_rate"] == 0.7)
    assert at_target["accuracy"] >= summary["vit_accuracy"] - 0.01
    assert summary["vit_accuracy"] > 0.9


@pytest.mark.slow
def test_digits_budget_study_quick_run(tmp_path):
    # About 40 s: every measurement of the study, with one epoch, three steps per run and 32 calibration images.
    summary = digits_budget_study.run(str(tmp_path), vit_epochs=1, fine_tune_steps=3, calibration_images=32)
    assert [row["budget_of_keep_rate"] for row in summary["off_the_shelf"]] == [0.7, 0.5]
    for row in summary["off_the_shelf"]:
        assert row["calibrated"]["macs"] <= row["budget_macs"] and row["default"]["macs"] == row["budget_macs"]
    runs = summary["fine_tuned"]
    assert all(run["steps"] == 3 for run in runs.values())
    larger = runs["40 px, MACs of 32 px"]
    assert larger["image_size"] == 40 and larger["macs"] <= runs["unreduced, 32 px"]["macs"]
    saved = json.loads((tmp_path / "budget_study.json").read_text())
    assert saved["fine_tuned"] == runs
    assert "| 40 px, MACs of 32 px |" in (tmp_path / "budget_study.md").read_text()
