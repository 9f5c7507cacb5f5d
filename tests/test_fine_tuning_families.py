"""The fine-tuning example on every family of the table that has an image classifier, through its command line, and
its cost-budget flags: per-layer keep rates, --image_size, --match_macs_of_image_size and distillation."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    DeiTForImageClassificationWithTeacher,
    ViTForImageClassification,
)

import evit_hf
from evit_hf import fine_tuning
from evit_hf.families import FAMILIES
from evit_hf.macs import count_macs
from evit_hf.resolution import resize_position_embeddings

from .example_modules import run_image_classification
from .image_files import good_folder, image_check_cache  # noqa: F401  (autouse: the test's own image-check cache)
from .model_builders import FAMILY_TESTERS, IMAGE_MODEL_FAMILIES, TESTERS, stock_config, tiny_stock_model
from .run_helpers import kill_after_first_checkpoint, largest_difference, resume_args, save_small_vit, weights


CLASSIFIER = "AutoModelForImageClassification"
CLASSIFIER_FAMILIES = [family for family in FAMILIES if family.auto_classes.get(CLASSIFIER)]
FAMILIES_WITHOUT_CLASSIFIER = [family for family in IMAGE_MODEL_FAMILIES if not family.auto_classes.get(CLASSIFIER)]


def family_checkpoints():
    """(family, builder) for every tiny checkpoint of a family with a classifier: its base models, CLIP-style vision
    towers (with and without projection) and whole models, and its classifiers."""
    return [
        pytest.param(family, builder, id=f"{family.name}-{builder}")
        for family in CLASSIFIER_FAMILIES
        for builder in FAMILY_TESTERS[family.name]
    ]


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory):
    """Two classes, four images each, for training and for validation."""
    root = tmp_path_factory.mktemp("images")
    return good_folder(root / "train"), good_folder(root / "val", count=2)


def folder_args(model, output_dir, image_folders, *extra):
    train, validation = image_folders
    return [
        "--model_name_or_path", str(model),
        "--output_dir", str(output_dir),
        "--train_dir", str(train),
        "--validation_dir", str(validation),
        "--do_train", "--do_eval",
        "--max_steps", "2",
        "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "8",
        "--learning_rate", "1e-4",
        "--report_to", "none",
        "--save_strategy", "no",
        "--disable_tqdm", "true",
        "--card_keep_rates", "1.0",
        "--ignore_mismatched_sizes",
        *extra,
    ]  # fmt: skip


def patch_embedding_weight(state_dict: dict) -> torch.Tensor:
    """The patch embedding's convolution: the one 4-dimensional weight of every family's model."""
    (weight,) = [tensor for tensor in state_dict.values() if tensor.dim() == 4]
    return weight


@pytest.mark.parametrize(("family", "builder"), family_checkpoints())
def test_every_family_fine_tunes_and_reloads_as_an_image_classifier(family, builder, image_folders, tmp_path):
    start = tiny_stock_model(builder)
    start.save_pretrained(tmp_path / "start")
    output_dir = tmp_path / "out"
    results = run_image_classification.main(
        folder_args(tmp_path / "start", output_dir, image_folders, "--keep_rate", "0.5")
    )
    assert 0.0 <= results["eval_accuracy"] <= 1.0
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 2

    reloaded = AutoModelForImageClassification.from_pretrained(output_dir)
    assert type(reloaded) is family.auto_classes[CLASSIFIER][0]
    assert reloaded.config.id2label == {0: "cat", 1: "dog"}
    tower_config = getattr(reloaded.config, "vision_config", None) or reloaded.config
    assert tower_config.keep_rate == 0.5
    # The starting checkpoint's weights, moved by two small steps: loaded, then trained.
    moved = (patch_embedding_weight(reloaded.state_dict()) - patch_embedding_weight(start.state_dict())).abs().max()
    assert 0 < moved.item() < 1e-2
    logits = reloaded(torch.randn(2, 3, tower_config.image_size, tower_config.image_size)).logits
    assert logits.shape == (2, 2)


# The image classifiers of every family with one: a teacher must predict the dataset's labels.
CLASSIFIER_TESTERS = [
    pytest.param(tester, id=tester.name)
    for tester in TESTERS.values()
    if tester.auto_class is AutoModelForImageClassification
]


@pytest.mark.parametrize("tester", CLASSIFIER_TESTERS)
def test_every_family_fine_tunes_with_distillation_from_its_unreduced_start(tester, image_folders, tmp_path):
    torch.manual_seed(0)
    labels = dict(num_labels=2, id2label={0: "cat", 1: "dog"}, label2id={"cat": 0, "dog": 1})
    config = tester.stock_config_class(**{**tester.settings, **labels})
    tester.stock_class(config).save_pretrained(tmp_path / "start")
    output_dir = tmp_path / "out"
    run_image_classification.main(
        folder_args(tmp_path / "start", output_dir, image_folders, "--keep_rate", "0.5", "--distillation_alpha", "0.5",
                    "--logging_steps", "1")
    )  # fmt: skip
    logged = [entry for entry in json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
              if "loss_ce" in entry]  # fmt: skip
    assert [entry["step"] for entry in logged] == [1, 2]
    # The student (keep 0.5) and the unreduced teacher start from the same weights yet disagree: the term is live.
    assert all(entry["loss_ce"] > 0 and entry["loss_distillation"] > 0 for entry in logged)


def test_a_distilled_deit_fine_tunes_from_its_class_head(image_folders, tmp_path):
    torch.manual_seed(0)
    labels = dict(id2label={0: "cat", 1: "dog"}, label2id={"cat": 0, "dog": 1})
    start = DeiTForImageClassificationWithTeacher(stock_config("deit-teacher", num_labels=2, **labels)).eval()
    start.save_pretrained(tmp_path / "start")
    # Evaluation only, into an empty folder: the model is saved as it starts.
    run_image_classification.main(
        folder_args(tmp_path / "start", tmp_path / "out", image_folders, "--do_train", "false", "--keep_rate", "1.0")
    )
    saved = AutoModelForImageClassification.from_pretrained(tmp_path / "out")
    assert torch.equal(saved.classifier.weight, start.cls_classifier.weight)
    pixel_values = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(saved(pixel_values).logits, start(pixel_values).cls_logits)


REMOTE_CODE_LOAD = """
import sys, torch
from transformers import AutoModelForImageClassification
model = AutoModelForImageClassification.from_pretrained(sys.argv[1], trust_remote_code=True)
assert "evit_hf" not in sys.modules
config = model.config.vision_config
logits = model(torch.zeros(1, 3, config.image_size, config.image_size)).logits
print(type(model).__name__, config.keep_rate, logits.shape)
"""


@pytest.mark.slow  # a fresh process (~5 s); test_modeling loads every family's saved folder as remote code
def test_a_clip_model_fine_tuned_loads_as_remote_code_without_evit_hf(image_folders, tmp_path):
    tiny_stock_model("clip").save_pretrained(tmp_path / "clip")
    output_dir = tmp_path / "out"
    run_image_classification.main(folder_args(tmp_path / "clip", output_dir, image_folders, "--max_steps", "1"))
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    printed = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_LOAD, str(output_dir)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert printed[:2] == ["EViTCLIPForImageClassification", "0.7"]
    assert printed[-1].endswith("2])")


@pytest.mark.parametrize("family", FAMILIES_WITHOUT_CLASSIFIER, ids=lambda family: family.name)
def test_a_family_without_a_classifier_is_refused_naming_those_with_one(family, image_folders, tmp_path):
    (builder,) = FAMILY_TESTERS[family.name][:1]
    tiny_stock_model(builder).save_pretrained(tmp_path / "start")
    supported = ", ".join(f.display_name for f in CLASSIFIER_FAMILIES)
    with pytest.raises(ValueError, match=f"{family.display_name} has no image classifier.*{supported}") as error:
        run_image_classification.main(folder_args(tmp_path / "start", tmp_path / "out", image_folders))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def digits_args(model, output_dir, *extra):
    return [
        "--model_name_or_path", str(model),
        "--output_dir", str(output_dir),
        "--max_steps", "2",
        "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "64",
        "--max_train_samples", "32",
        "--max_eval_samples", "32",
        "--report_to", "none",
        "--save_strategy", "no",
        "--disable_tqdm", "true",
        "--card_keep_rates", "1.0",
        *extra,
    ]  # fmt: skip


def card_settings(output_dir) -> str:
    return (output_dir / "README.md").read_text()


def test_one_keep_rate_per_reduction_layer(small_vit, tmp_path):
    output_dir = tmp_path / "out"
    run_image_classification.main(
        digits_args(small_vit, output_dir, "--do_train", "--do_eval", "--keep_rate", "0.9", "0.7", "0.5")
    )
    config = AutoConfig.from_pretrained(output_dir)
    assert config.keep_rate == [0.9, 0.7, 0.5] and config.reduction_layers == [1, 2, 3]
    card = card_settings(output_dir)
    assert "| keep rate | 0.9 / 0.7 / 0.5 (one per reduction layer) |" in card
    rows = json.loads((output_dir / "keep_rate_results.json").read_text())
    assert rows[0]["keep_rate"] == [0.9, 0.7, 0.5]
    assert rows[0]["macs"] == count_macs(config)


def test_a_keep_rate_list_of_the_wrong_length_is_refused_before_any_data(small_vit, tmp_path, monkeypatch):
    monkeypatch.setattr(run_image_classification, "load_data", lambda *args: pytest.fail("data loaded"))
    with pytest.raises(ValueError, match=r"it has 2 \(\[0.9, 0.7\]\) for 3 reduction layers \(\[1, 2, 3\]\)") as error:
        run_image_classification.main(
            digits_args(small_vit, tmp_path / "out", "--do_train", "--keep_rate", "0.9", "0.7")
        )
    assert "\n" not in str(error.value)
    # With the reduction layers it names, the same list fits.
    with pytest.raises(ValueError, match="it has 3 .* for 2 reduction layers"):
        run_image_classification.main(
            digits_args(small_vit, tmp_path / "out", "--do_train", "--keep_rate", "0.9", "0.7", "0.5",
                        "--reduction_layers", "1", "3")
        )  # fmt: skip


def test_a_larger_image_size_resizes_positions_processor_config_and_card(small_vit, tmp_path):
    output_dir = tmp_path / "out"
    # Evaluation only, into an empty folder: the model is saved as evaluated, untrained.
    results = run_image_classification.main(digits_args(small_vit, output_dir, "--do_eval", "--image_size", "48"))
    assert "eval_accuracy" in results
    saved = evit_hf.EViTForImageClassification.from_pretrained(output_dir)
    assert saved.config.image_size == 48
    expected = resize_position_embeddings(evit_hf.EViTForImageClassification.from_pretrained(small_vit), 48)
    assert saved.vit.embeddings.position_embeddings.shape == (1, 1 + 12 * 12, 32)
    assert torch.equal(saved.vit.embeddings.position_embeddings, expected.vit.embeddings.position_embeddings)
    processor = AutoImageProcessor.from_pretrained(output_dir)
    assert processor(images=Image.new("RGB", (30, 20)), return_tensors="pt").pixel_values.shape[-2:] == (48, 48)
    assert "| input size | 48 px |" in card_settings(output_dir)


def test_image_processor_at_size_scales_the_resize_before_a_center_crop():
    from transformers import CLIPImageProcessor, ViTImageProcessor

    clip = fine_tuning.image_processor_at_size(CLIPImageProcessor(), 288)
    assert clip.crop_size["height"] == clip.crop_size["width"] == 288
    assert clip.size["shortest_edge"] == 288  # 224 -> 224 before: the same ratio
    deit = fine_tuning.image_processor_at_size(
        ViTImageProcessor(size={"height": 256, "width": 256}, do_center_crop=True, crop_size=224), 288
    )
    assert (deit.size["height"], deit.crop_size["height"]) == (329, 288)
    plain = fine_tuning.image_processor_at_size(ViTImageProcessor(), 64)
    assert (plain.size["height"], plain.size["width"]) == (64, 64)
    assert ViTImageProcessor().size["height"] == 224  # a copy: the original is left as it was


def test_match_macs_of_image_size_chooses_the_largest_keep_rate_within_the_stock_cost(small_vit, tmp_path, caplog):
    output_dir = tmp_path / "out"
    with caplog.at_level("INFO"):
        run_image_classification.main(
            digits_args(small_vit, output_dir, "--do_train", "--do_eval", "--image_size", "40",
                        "--match_macs_of_image_size", "32")
        )  # fmt: skip
    config = AutoConfig.from_pretrained(output_dir)
    stock_cost = count_macs(AutoConfig.from_pretrained(small_vit))
    chosen = config.keep_rate
    assert 0 < chosen < 1 and config.image_size == 40
    assert count_macs(config) <= stock_cost < count_macs(config, keep_rate=round(chosen + 0.01, 2))
    assert f"Keep rate {chosen}:" in caplog.text
    recorded = json.loads((output_dir / "trainer_state.json").read_text())["stateful_callbacks"]["EViTRunSettings"]
    assert recorded["args"]["settings"]["match_macs_of_image_size"] == 32
    assert recorded["args"]["settings"]["keep_rate"] == chosen
    assert "| keep rate chosen for the MACs of | the unreduced model at 32 px |" in card_settings(output_dir)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--keep_rate", "0.5", "--match_macs_of_image_size", "32"], "pass only one of them"),
        (["--distillation_alpha", "1.5"], r"--distillation_alpha is the weight .* in \[0, 1\]"),
        (["--distillation_temperature", "0"], "--distillation_temperature .* a positive number"),
        (["--image_size", "0"], "--image_size is an image side in pixels"),
        (["--image_size", "3"], r"--image_size 3 is smaller than one patch of the model \(4 px\)"),
        (["--image_size", "48", "--match_macs_of_image_size", "8"], "--match_macs_of_image_size 8: No keep rate"),
    ],
    ids=["keep-rate-and-match", "alpha", "temperature", "image-size", "image-size-below-patch", "budget-too-small"],
)
def test_bad_cost_budget_flags_are_refused_in_one_line_before_any_data(extra, message, small_vit, tmp_path,
                                                                        monkeypatch):  # fmt: skip
    monkeypatch.setattr(run_image_classification, "load_data", lambda *args: pytest.fail("data loaded"))
    with pytest.raises(ValueError, match=message) as error:
        run_image_classification.main(digits_args(small_vit, tmp_path / "out", "--do_train", *extra))
    assert "\n" not in str(error.value)


def test_distillation_logs_both_loss_parts_and_is_part_of_the_run_settings(small_vit, tmp_path):
    output_dir = tmp_path / "out"
    distillation = ["--distillation_alpha", "0.5", "--distillation_temperature", "2", "--logging_steps", "1"]
    run_image_classification.main(digits_args(small_vit, output_dir, "--do_train", "--do_eval", *distillation))
    state = json.loads((output_dir / "trainer_state.json").read_text())
    training_logs = [entry for entry in state["log_history"] if "loss" in entry]
    assert len(training_logs) == 2
    assert all(entry["loss_ce"] > 0 and entry["loss_distillation"] >= 0 for entry in training_logs)
    settings = state["stateful_callbacks"]["EViTRunSettings"]["args"]["settings"]
    assert (settings["distillation_alpha"], settings["distillation_temperature"]) == (0.5, 2.0)
    assert "| distillation from the unreduced model | alpha 0.5, temperature 2.0 |" in card_settings(output_dir)
    # Continuing the run with another weight is refused, naming the difference.
    with pytest.raises(ValueError, match="distillation_alpha 0.5 there, 0.3 here"):
        run_image_classification.main(
            digits_args(small_vit, output_dir, "--do_train", "--max_steps", "3", "--distillation_alpha", "0.3")
        )


def test_distillation_from_a_checkpoint_without_the_datasets_head_is_refused(image_folders, tmp_path):
    # A digits classifier for a cat/dog folder: the teacher would be a random head.
    model = save_small_vit(tmp_path / "model")
    with pytest.raises(ValueError, match="--distillation_alpha distills the starting checkpoint.*fine-tune it"):
        run_image_classification.main(
            folder_args(model, tmp_path / "out", image_folders, "--distillation_alpha", "0.5")
        )


def test_the_teacher_is_the_unreduced_starting_checkpoint(small_vit, tmp_path, monkeypatch):
    teachers = []
    trainer_init = evit_hf.distillation.DistillationTrainer.__init__

    def recording_init(self, *args, teacher_model=None, **kwargs):
        teachers.append(teacher_model)
        trainer_init(self, *args, teacher_model=teacher_model, **kwargs)

    monkeypatch.setattr(evit_hf.distillation.DistillationTrainer, "__init__", recording_init)
    run_image_classification.main(
        digits_args(small_vit, tmp_path / "out", "--do_train", "--distillation_alpha", "0.5", "--keep_rate", "0.5")
    )
    (teacher,) = teachers
    start = ViTForImageClassification.from_pretrained(small_vit).state_dict()
    assert largest_difference(teacher.state_dict(), start) == 0  # the starting weights, not the trained ones
    assert teacher.config.keep_rate == 1.0 and not teacher.training
    assert not any(parameter.requires_grad for parameter in teacher.parameters())


@pytest.mark.slow
def test_a_killed_distilled_run_resumes_to_the_weights_of_an_uninterrupted_one(small_vit, tmp_path):
    distillation = ["--distillation_alpha", "0.5", "--distillation_temperature", "2", "--keep_rate", "0.5"]
    distillation += ["--logging_steps", "2"]
    uninterrupted = tmp_path / "uninterrupted"
    run_image_classification.main(resume_args(small_vit, uninterrupted, *distillation))
    interrupted = tmp_path / "interrupted"
    args = resume_args(small_vit, interrupted, *distillation)
    kill_after_first_checkpoint(args, interrupted, signal.SIGTERM)
    run_image_classification.main(args)
    assert largest_difference(weights(interrupted), weights(uninterrupted)) <= 1e-6
    assert largest_difference(weights(uninterrupted), weights(interrupted / "checkpoint-2")) > 1e-3
    logs = json.loads((interrupted / "trainer_state.json").read_text())["log_history"]
    assert any("loss_distillation" in entry for entry in logs)


def test_card_metadata_reports_the_per_layer_target(small_vit, tmp_path):
    output_dir = tmp_path / "out"
    run_image_classification.main(digits_args(small_vit, output_dir, "--do_eval", "--keep_rate", "0.8", "0.6", "0.4"))
    card = card_settings(output_dir)
    metadata = yaml.safe_load(card.split("---")[1])
    reported = {m["type"]: m["value"] for m in metadata["model-index"][0]["results"][0]["metrics"]}
    rows = json.loads((output_dir / "eval_only_results.json").read_text())["keep_rate_results"]
    assert reported["accuracy"] == next(row for row in rows if row["keep_rate"] == [0.8, 0.6, 0.4])["accuracy"]
