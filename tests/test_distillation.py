import math

import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments

import evit_hf
from evit_hf.distillation import DistillationTrainer, distillation_loss

from .model_builders import TINY


TINY_VIT = TINY


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)  # tiny models: one thread is fastest and steady on a busy machine; restored after


def test_distillation_loss_by_hand():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    teacher = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    labels = torch.tensor([0, 2])
    alpha, temperature = 0.3, 2.0
    loss, cross_entropy, kl = distillation_loss(student, teacher, labels, alpha, temperature)

    def softmax(row):
        exps = [math.exp(value) for value in row]
        return [value / sum(exps) for value in exps]

    rows = zip(student.tolist(), labels.tolist(), strict=True)
    expected_ce = -sum(math.log(softmax(row)[label]) for row, label in rows) / 2
    expected_kl = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
        p_student = softmax([value / temperature for value in s_row])
        p_teacher = softmax([value / temperature for value in t_row])
        expected_kl += sum(t * (math.log(t) - math.log(s)) for s, t in zip(p_student, p_teacher, strict=True)) / 2
    assert cross_entropy.item() == pytest.approx(expected_ce, rel=1e-6)
    assert kl.item() == pytest.approx(expected_kl, rel=1e-6)
    assert loss.item() == pytest.approx((1 - alpha) * expected_ce + alpha * temperature**2 * expected_kl, rel=1e-6)


def test_distillation_term_vanishes_when_student_equals_teacher():
    logits = torch.randn(4, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3, 6, 1])
    loss, cross_entropy, kl = distillation_loss(logits, logits.clone(), labels, alpha=0.5, temperature=3.0)
    assert kl.item() == pytest.approx(0.0, abs=1e-7)
    assert loss.item() == pytest.approx(0.5 * cross_entropy.item(), rel=1e-6)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"distillation_alpha": 1.5}, "distillation_alpha is the weight"),
        ({"distillation_alpha": -0.1}, "distillation_alpha is the weight"),
        ({"distillation_alpha": True}, "distillation_alpha is the weight"),
        ({"distillation_alpha": 0.5, "distillation_temperature": 0}, "distillation_temperature softens"),
        ({"distillation_alpha": 0.5, "distillation_temperature": float("nan")}, "distillation_temperature softens"),
        ({"distillation_alpha": 0.5}, "needs a teacher_model"),
    ],
)
def test_bad_settings_are_refused(tmp_path, settings, message):
    model = evit_hf.EViTForImageClassification(evit_hf.EViTConfig(**TINY_VIT))
    with pytest.raises(ValueError, match=message):
        DistillationTrainer(model=model, args=TrainingArguments(tmp_path, use_cpu=True, report_to=[]), **settings)


def test_a_teacher_with_other_labels_is_refused(tmp_path):
    student = evit_hf.EViTForImageClassification(evit_hf.EViTConfig(**TINY_VIT))
    teacher = evit_hf.EViTForImageClassification(evit_hf.EViTConfig(**{**TINY_VIT, "num_labels": 3}))
    with pytest.raises(ValueError, match="teacher predicts 3 labels and the student 5"):
        DistillationTrainer(
            model=student,
            teacher_model=teacher,
            distillation_alpha=0.5,
            args=TrainingArguments(tmp_path, use_cpu=True, report_to=[]),
        )


def _images(count: int = 8) -> Dataset:
    generator = torch.Generator().manual_seed(3)
    return Dataset.from_dict(
        {
            "pixel_values": torch.randn(count, 3, 32, 32, generator=generator).tolist(),
            "labels": torch.randint(0, 5, (count,), generator=generator).tolist(),
        }
    ).with_format("torch")


def _train(tmp_path, student, teacher, alpha, steps=3):
    args = TrainingArguments(
        tmp_path,
        use_cpu=True,
        report_to=[],
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        distillation_alpha=alpha,
        distillation_temperature=2.0,
        args=args,
        train_dataset=_images(),
    )
    trainer.train()
    return trainer, [entry for entry in trainer.state.log_history if "loss" in entry]


def _pair(student_keep: float, teacher_keep: float):
    torch.manual_seed(0)
    student = evit_hf.EViTForImageClassification(evit_hf.EViTConfig(**TINY_VIT, keep_rate=student_keep))
    teacher = evit_hf.EViTForImageClassification(evit_hf.EViTConfig(**TINY_VIT, keep_rate=teacher_keep))
    teacher.load_state_dict(student.state_dict())
    return student, teacher


def test_training_logs_both_parts_and_leaves_the_teacher_untouched(tmp_path):
    student, teacher = _pair(student_keep=0.5, teacher_keep=1.0)
    teacher_weights = {name: tensor.clone() for name, tensor in teacher.state_dict().items()}
    trainer, logs = _train(tmp_path, student, teacher, alpha=0.5)
    assert len(logs) == 3
    for entry in logs:
        # The logged loss is the one optimized: (1 - a) * CE + a * T^2 * KL, T = 2.
        assert entry["loss"] == pytest.approx(0.5 * entry["loss_ce"] + 0.5 * 4 * entry["loss_distillation"], rel=1e-3)
        assert entry["loss_distillation"] > 0  # keep 0.5 against the unreduced teacher
    for name, tensor in trainer.teacher_model.state_dict().items():
        assert torch.equal(tensor, teacher_weights[name]), name
    assert all(parameter.grad is None for parameter in trainer.teacher_model.parameters())
    assert not any(torch.equal(student.state_dict()[name], teacher_weights[name]) for name in ["classifier.weight"])


def test_the_teacher_runs_without_reduction(tmp_path):
    # Teacher configured at keep 0.5 but run at keep 1; the student keeps every token and starts from the same weights:
    # the first step's distillation term is 0 only if the teacher kept every token too.
    student, teacher = _pair(student_keep=1.0, teacher_keep=0.5)
    _, logs = _train(tmp_path, student, teacher, alpha=0.5, steps=1)
    assert logs[0]["loss_distillation"] == pytest.approx(0.0, abs=1e-6)


def test_distillation_changes_the_training(tmp_path):
    student, teacher = _pair(student_keep=0.5, teacher_keep=1.0)
    _train(tmp_path / "distilled", student, teacher, alpha=0.5)
    plain, _ = _pair(student_keep=0.5, teacher_keep=1.0)
    _, logs = _train(tmp_path / "plain", plain, None, alpha=0.0)
    assert "loss_distillation" not in logs[0]
    difference = (student.classifier.weight - plain.classifier.weight).abs().max().item()
    assert difference > 1e-4


# The settings users change: gradient accumulation, logging windows, evaluation during training. A run with
# `accumulation` micro-batches of 8 / accumulation images per step sees, in each step, the same 8 images as a run with
# batches of 8 (the sampler draws the same permutation from the seed): its logged means, gradient norm, clipping and
# weights must be those of the plain run. SGD, so that the weights move by the (clipped) gradients themselves, not by
# Adam's normalization of rounding noise.


def _run(tmp_path, alpha, accumulation=1, logging_steps=1, eval_dataset=None):
    student, teacher = _pair(student_keep=0.5, teacher_keep=1.0)
    args = TrainingArguments(
        tmp_path,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        max_steps=2,
        per_device_train_batch_size=8 // accumulation,
        gradient_accumulation_steps=accumulation,
        optim="sgd",
        learning_rate=0.1,
        max_grad_norm=0.5,  # the gradient norms of these steps are above it: clipping is active
        logging_steps=logging_steps,
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher if alpha > 0 else None,
        distillation_alpha=alpha,
        distillation_temperature=2.0,
        args=args,
        train_dataset=_images(16),
        eval_dataset=eval_dataset,
    )
    trainer.train()
    return trainer, [entry for entry in trainer.state.log_history if "loss" in entry]


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory):
    """The run with batches of 8, one log per step, by alpha (each trained once per module)."""
    runs = {}

    def run(alpha):
        if alpha not in runs:
            runs[alpha] = _run(tmp_path_factory.mktemp("reference"), alpha)
        return runs[alpha]

    return run


LOGGED = ("loss", "loss_ce", "loss_distillation")


@pytest.mark.parametrize("alpha", [0.0, 0.5], ids=["plain", "distilled"])
@pytest.mark.parametrize("accumulation, logging_steps", [(4, 1), (2, 2)], ids=["accumulate-4", "accumulate-2-log-2"])
def test_accumulation_and_logging_windows_log_the_means_of_the_plain_run(
    tmp_path, plain_runs, alpha, accumulation, logging_steps
):
    reference, reference_logs = plain_runs(alpha)
    trainer, logs = _run(tmp_path, alpha, accumulation, logging_steps)
    assert all(step["grad_norm"] > 0.5 for step in reference_logs)  # every step is clipped
    assert len(logs) == 2 // logging_steps
    for window, entry in enumerate(logs):
        steps = reference_logs[window * logging_steps : (window + 1) * logging_steps]
        for name in LOGGED if alpha > 0 else ("loss",):
            expected = sum(step[name] for step in steps) / logging_steps
            assert entry[name] == pytest.approx(expected, rel=2e-3, abs=1e-6), (window, name)
        # Trainer logs the gradient norm of the window's last step.
        assert entry["grad_norm"] == pytest.approx(steps[-1]["grad_norm"], rel=2e-3), window
    for name, tensor in reference.model.state_dict().items():
        torch.testing.assert_close(trainer.model.state_dict()[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_evaluation_reports_the_students_own_loss(tmp_path):
    # eval_loss is the cross-entropy of the student at its keep rate, not the distillation mix (0.5 * CE + 2 * KL).
    eval_images = _images(12)
    trainer, _ = _run(tmp_path, alpha=0.5, eval_dataset=eval_images)
    model = trainer.model.eval()
    batch = eval_images[:]
    with torch.no_grad():
        expected = model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss.item()
        teacher_logits = trainer.teacher_model(pixel_values=batch["pixel_values"], keep_rate=1.0).logits
        student_logits = model(pixel_values=batch["pixel_values"]).logits
    mix, _, _ = distillation_loss(student_logits, teacher_logits, batch["labels"], 0.5, 2.0)
    assert abs(mix.item() - expected) > 0.05  # the two differ: the check below can tell them apart
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-4)
    assert "eval_loss_distillation" not in metrics
