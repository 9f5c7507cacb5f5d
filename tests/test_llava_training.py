"""Fine-tuning EViT LLaVA with Trainer: the loss on the answer tokens only, the projector alone or LoRA adapters on the
language model (peft), and the digits VQA demo."""

import copy
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import evit_hf
import evit_hf.configuration_evit_base
from evit_hf.vision_language_training import (
    IGNORED_LABEL,
    SCHEDULE_KEY,
    ImageQuestionCollator,
    add_lora_adapters,
    answer_only_labels,
    build_digits_llava,
    digits_vqa_dataset,
    evaluate_answers,
    freeze_all_but_projector,
    freeze_vision_tower,
    pretrain_vision_tower,
    train_vision_language,
)


EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def test_answer_only_labels_keep_the_last_tokens_of_each_row():
    input_ids = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    labels = answer_only_labels(input_ids, [2, 1])
    assert labels.tolist() == [[IGNORED_LABEL, IGNORED_LABEL, 7, 8], [IGNORED_LABEL, IGNORED_LABEL, IGNORED_LABEL, 4]]
    assert answer_only_labels(input_ids, [0, 4]).tolist() == [[IGNORED_LABEL] * 4, [1, 2, 3, 4]]


@pytest.fixture(scope="module")
def small():
    """A small digits LLaVA (keep 0.5), its processor and 24 training examples."""
    model, processor = build_digits_llava(vision_layers=4, vision_hidden=32, text_hidden=32, seed=0)
    model.config.keep_rate = 0.5
    processor.use_model_config(model.config)
    return model, processor, digits_vqa_dataset(limit=24)


def test_the_collator_scores_only_the_answer_and_emits_the_evit_placeholders(small):
    model, processor, data = small
    batch = ImageQuestionCollator(processor)([data["train"][0], data["train"][1]])
    image_token = model.config.image_token_id
    assert (batch["input_ids"] == image_token).sum(dim=1).tolist() == [evit_hf.num_image_tokens(model.config)] * 2
    scored = batch["labels"] != IGNORED_LABEL
    assert scored.sum(dim=1).tolist() == [2, 2]  # the digit and the end of the sequence
    digit = processor.tokenizer.convert_tokens_to_ids(data["train"][0]["answer"])
    assert batch["labels"][0, -2] == digit and batch["labels"][0, -1] == processor.tokenizer.eos_token_id
    with torch.no_grad():
        loss = model(**batch).loss
    # The loss is the mean cross-entropy of those two predictions alone.
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    want = torch.nn.functional.cross_entropy(
        logits[:, -3:-1].reshape(-1, logits.shape[-1]), batch["labels"][:, -2:].reshape(-1)
    )
    torch.testing.assert_close(loss, want)


def test_a_collator_with_schedules_emits_the_placeholders_of_the_schedule_it_names(small):
    model, processor, data = small
    schedules = [([1, 2, 3], 0.5), ([2], 0.7), ([1, 2, 3], 1.0)]
    model_schedule = dict(processor.evit_schedule)
    collator = ImageQuestionCollator(processor, schedules=schedules, seed=3)
    config = copy.deepcopy(model.config)
    seen = set()
    for _ in range(12):
        batch = collator([data["train"][0], data["train"][1]])
        reduction_layers, keep_rate = batch[SCHEDULE_KEY]
        config.vision_config.set_schedule(reduction_layers, keep_rate)
        placeholders = (batch["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
        assert placeholders == [evit_hf.num_image_tokens(config)] * 2
        seen.add((tuple(reduction_layers), keep_rate))
    assert seen == {(tuple(layers), rate) for layers, rate in schedules}  # each drawn in 12 batches
    assert processor.evit_schedule == model_schedule  # the processor is left as it was
    # The draws follow the seed.
    again = ImageQuestionCollator(processor, schedules=schedules, seed=3)
    first = [again([data["train"][0]])[SCHEDULE_KEY] for _ in range(6)]
    collator = ImageQuestionCollator(processor, schedules=schedules, seed=3)
    assert [collator([data["train"][0]])[SCHEDULE_KEY] for _ in range(6)] == first


def test_trainer_runs_each_batch_at_the_schedule_its_collator_drew(small, tmp_path):
    model, processor, data = small
    model = copy.deepcopy(model)
    model_schedule = (list(model.config.vision_config.reduction_layers), model.config.vision_config.keep_rate)
    schedules = [([1, 2, 3], 0.5), ([2], 0.7), ([1, 2, 3], 1.0)]
    ran = []

    def record(module, args, kwargs):
        placeholders = int((kwargs["input_ids"] == model.config.image_token_id).sum()) // len(kwargs["input_ids"])
        vision = model.config.vision_config
        ran.append(((list(vision.reduction_layers), vision.keep_rate), placeholders))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        train_vision_language(model, processor, data["train"], str(tmp_path), schedules=schedules, max_steps=9,
                              per_device_train_batch_size=2, learning_rate=1e-3)  # fmt: skip
    finally:
        handle.remove()
    assert len(ran) == 9 and {tuple(schedule[0]) for schedule, _ in ran} >= {(1, 2, 3), (2,)}
    config = copy.deepcopy(model.config)
    for (reduction_layers, keep_rate), placeholders in ran:
        config.vision_config.set_schedule(reduction_layers, keep_rate)
        assert placeholders == evit_hf.num_image_tokens(config)
    vision = model.config.vision_config
    assert (list(vision.reduction_layers), vision.keep_rate) == model_schedule  # restored after training


def _changed(before, after) -> set[str]:
    return {name for name, tensor in after.items() if not torch.equal(tensor, before[name])}


def test_trainer_fine_tunes_the_projector_alone(small, tmp_path):
    model, processor, data = small
    model = copy.deepcopy(model)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    freeze_all_but_projector(model)
    output = train_vision_language(model, processor, data["train"], str(tmp_path), max_steps=2,
                                   per_device_train_batch_size=8, learning_rate=1e-2)  # fmt: skip
    assert torch.isfinite(torch.tensor(output.training_loss))
    changed = _changed(before, model.state_dict())
    assert changed and all(".multi_modal_projector." in f".{name}" for name in changed)


def test_the_tower_learns_to_name_the_answer_from_its_class_token_and_only_the_tower_changes(small, tmp_path):
    model, processor, data = small
    model = copy.deepcopy(model)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    vision = model.config.vision_config
    model_schedule = (list(vision.reduction_layers), vision.keep_rate)
    tower = model.model.vision_tower
    tokens_seen = set()
    handle = tower.register_forward_hook(
        lambda module, args, output: tokens_seen.add(output.last_hidden_state.shape[1])
    )
    try:
        losses = pretrain_vision_tower(model, processor, data["train"], epochs=20, batch_size=8, learning_rate=1e-2)
    finally:
        handle.remove()
    assert tokens_seen == {1 + 64}  # the whole tower at keep rate 1, though the model keeps 0.5
    assert len(losses) == 20 and losses[-1] < 0.8 * losses[0]
    changed = _changed(before, model.state_dict())
    assert changed and all(".vision_tower." in f".{name}" for name in changed)
    assert (list(vision.reduction_layers), vision.keep_rate) == model_schedule  # restored (it trains at keep 1)
    # Then LLaVA's training over the frozen tower changes everything but the tower.
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    freeze_vision_tower(model)
    train_vision_language(model, processor, data["train"], str(tmp_path), max_steps=1,
                          per_device_train_batch_size=8, learning_rate=1e-2)  # fmt: skip
    changed = _changed(before, model.state_dict())
    assert not any(".vision_tower." in f".{name}" for name in changed)
    assert any("language_model" in name for name in changed) and any("projector" in name for name in changed)


def test_trainer_fine_tunes_lora_adapters_and_the_projector(small, tmp_path):
    pytest.importorskip("peft")
    model, processor, data = small
    model = copy.deepcopy(model)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    peft_model = add_lora_adapters(model)
    trainable = [name for name, parameter in peft_model.named_parameters() if parameter.requires_grad]
    assert trainable and all("lora_" in name or "multi_modal_projector" in name for name in trainable)
    assert any("language_model" in name and "lora_" in name for name in trainable)
    train_vision_language(peft_model, processor, data["train"], str(tmp_path), max_steps=2,
                          per_device_train_batch_size=8, learning_rate=1e-2)  # fmt: skip
    merged = peft_model.merge_and_unload()
    assert type(merged) is evit_hf.EViTLlavaForConditionalGeneration
    changed = _changed(before, merged.state_dict())
    assert any("language_model" in name for name in changed)  # the merged adapters
    assert not any("vision_tower" in name for name in changed)
    assert evaluate_answers(merged, processor, data["validation"])["image_tokens"] == 18


def _demo():
    sys.path.insert(0, EXAMPLES)
    try:
        import digits_vqa_demo
    finally:
        sys.path.remove(EXAMPLES)
    return digits_vqa_demo


TINY_DEMO = ["--tower_epochs", "1", "--epochs", "1", "--limit", "16", "--batch_size", "16", "--finetune_epochs", "1"]


def test_the_digits_vqa_demo_runs_with_tiny_settings(tmp_path, capsys):
    output_dir = tmp_path / "demo"
    results = _demo().main(["--output_dir", str(output_dir), *TINY_DEMO])
    assert list(results) == ["trained at keep 1.0", "fine-tuned with reduction"]
    for rows in results.values():
        assert [row["schedule"] for row in rows] == [
            "keep 1, default layers", "keep 0.7, default layers", "keep 0.5, default layers", "keep 0.5, layer 2 only"
        ]  # fmt: skip
        assert [row["image_tokens"] for row in rows] == [64, 34, 18, 33]
        assert all(0 <= row["accuracy"] <= 1 and row["prefill_ms"] > 0 for row in rows)
    printed = capsys.readouterr().out
    assert "| keep 0.5, layer 2 only | 33 |" in printed
    written = (output_dir / "digits_vqa.md").read_text()
    assert written.strip() in printed and "Fine-tuned with reduction" in written
    assert json.loads((output_dir / "digits_vqa.json").read_text()) == results
    # A user's file in the folder is refused, and kept.
    (output_dir / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        _demo().main(["--output_dir", str(output_dir), *TINY_DEMO])
    assert (output_dir / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--keep_rates", "1.0", "0"], "--keep_rates: keep_rate must be"),
        (["--feature_layer_keep_rate", "1.5"], "--feature_layer_keep_rate: keep_rate must be"),
        (["--finetune_keep_rate", "nan"], "--finetune_keep_rate: keep_rate must be"),
        (["--epochs", "0"], "--epochs must be a positive number; got 0.0"),
        (["--tower_epochs", "-1"], "--tower_epochs must be a positive number; got -1.0"),
        (["--batch_size", "0"], "--batch_size must be at least 1; got 0"),
        (["--lora", "true", "--projector_only", "true"], "pass one of them"),
        (["--no_finetune", "--lora", "true"], "--lora sets the fine-tuning that --no_finetune skips"),
    ],
    ids=[
        "keep-rate-0",
        "feature-layer-1.5",
        "finetune-nan",
        "no-epochs",
        "tower-epochs",
        "batch-0",
        "lora-and-projector",
        "lora-without-fine-tuning",
    ],
)
def test_the_digits_vqa_demo_refuses_impossible_arguments_before_any_work(arguments, message, tmp_path, monkeypatch):
    demo = _demo()

    def refuse(*args, **kwargs):
        raise AssertionError("the demo started its work before refusing")

    for name in ("digits_vqa_dataset", "build_digits_llava"):
        monkeypatch.setattr(demo, name, refuse)
    with pytest.raises(ValueError, match=re.escape(message)):
        demo.main(["--output_dir", str(tmp_path / "demo"), *arguments])
    assert not (tmp_path / "demo").exists()


@pytest.mark.slow  # a quick run of the fine-tuning stage with LoRA
def test_the_digits_vqa_demo_fine_tunes_with_lora(tmp_path):
    pytest.importorskip("peft")
    results = _demo().main(
        ["--output_dir", str(tmp_path), *TINY_DEMO, "--finetune_keep_rate", "0.5", "--lora", "true"]
    )
    assert [row["image_tokens"] for row in results["fine-tuned at keep 0.5 (LoRA)"]] == [64, 34, 18, 33]


@pytest.mark.slow  # the full demo: minutes on 2 CPU cores
def test_the_digits_vqa_demo_learns_to_answer_and_keeps_its_accuracy_with_fewer_tokens(tmp_path):
    results = _demo().main(["--output_dir", str(tmp_path)])
    rows = {row["schedule"]: row for row in results["trained at keep 1.0"]}
    assert rows["keep 1, default layers"]["accuracy"] >= 0.8
    assert rows["keep 0.7, default layers"]["prefill_ms"] < rows["keep 1, default layers"]["prefill_ms"]
    # Fine-tuned with reduction, every schedule answers within 0.1 of the stock model.
    tuned = results["fine-tuned with reduction"]
    assert all(row["accuracy"] >= rows["keep 1, default layers"]["accuracy"] - 0.1 for row in tuned)


@pytest.mark.slow  # a fresh interpreter
def test_the_digits_vqa_demo_refuses_on_the_command_line_with_one_line_and_status_2(tmp_path):
    script = "digits_vqa_demo.py"
    command = [sys.executable, os.path.join(EXAMPLES, script), "--output_dir", str(tmp_path / "out"),
               "--keep_rates", "1", "0"]  # fmt: skip
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 2
    assert finished.stderr.strip().splitlines() == [f"{script}: error: --keep_rates: {check_keep_rate_message(0.0)}"]
    assert not (tmp_path / "out").exists()


def check_keep_rate_message(rate) -> str:
    try:
        evit_hf.configuration_evit_base.check_keep_rate(rate)
    except ValueError as error:
        return str(error)
    raise AssertionError(f"{rate} was accepted")
