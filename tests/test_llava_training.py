"""Fine-tuning EViT LLaVA with Trainer: the loss on the answer tokens only, the projector alone or LoRA adapters on the
language model (peft), and the digits VQA demo."""

import copy
import os
import sys

import pytest
import torch

import evit_hf
from evit_hf.vision_language_training import (
    IGNORED_LABEL,
    ImageQuestionCollator,
    add_lora_adapters,
    answer_only_labels,
    build_digits_llava,
    digits_vqa_dataset,
    evaluate_answers,
    freeze_all_but_projector,
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


def test_the_digits_vqa_demo_runs_with_tiny_settings(tmp_path, capsys):
    results = _demo().main(["--output_dir", str(tmp_path), "--epochs", "1", "--limit", "16", "--batch_size", "16"])
    rows = results["trained at keep 1.0"]
    assert [row["schedule"] for row in rows] == [
        "keep 1, default layers", "keep 0.7, default layers", "keep 0.5, default layers", "keep 0.5, layer 2 only"
    ]  # fmt: skip
    assert [row["image_tokens"] for row in rows] == [64, 34, 18, 33]
    assert all(0 <= row["accuracy"] <= 1 and row["prefill_ms"] > 0 for row in rows)
    assert list(results) == ["trained at keep 1.0"]
    assert "| keep 0.5, layer 2 only | 33 |" in capsys.readouterr().out


@pytest.mark.slow  # a quick run of the fine-tuning stage with LoRA
def test_the_digits_vqa_demo_fine_tunes_with_lora(tmp_path):
    pytest.importorskip("peft")
    arguments = ["--output_dir", str(tmp_path), "--epochs", "1", "--limit", "16", "--batch_size", "16"]
    results = _demo().main([*arguments, "--finetune_keep_rate", "0.5", "--finetune_epochs", "1", "--lora", "true"])
    assert [row["image_tokens"] for row in results["fine-tuned at keep 0.5 (LoRA)"]] == [64, 34, 18, 33]


@pytest.mark.slow  # the full demo: minutes on 2 CPU cores
def test_the_digits_vqa_demo_learns_to_answer(tmp_path):
    results = _demo().main(["--output_dir", str(tmp_path)])
    rows = {row["schedule"]: row for row in results["trained at keep 1.0"]}
    assert rows["keep 1, default layers"]["accuracy"] >= 0.8
    assert rows["keep 0.7, default layers"]["prefill_ms"] < rows["keep 1, default layers"]["prefill_ms"]
