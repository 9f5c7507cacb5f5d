"""Fine-tuning with distillation from the unreduced model: a `Trainer` whose loss mixes the labels' cross-entropy with
the KL divergence to a frozen teacher (the starting checkpoint, run without token reduction on the same batch)."""

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer


def check_distillation_settings(alpha: float, temperature: float) -> None:
    """`ValueError`s for an `alpha` outside [0, 1] or a temperature that is not a positive number."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(
            f"distillation_alpha is the weight of the distillation term, a number in [0, 1] (0: plain fine-tuning); "
            f"got {alpha!r}."
        )
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ValueError(
            f"distillation_temperature softens both distributions, a positive number such as 1 or 2; got "
            f"{temperature!r}."
        )


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(loss, cross_entropy, kl)` with `loss = (1 - alpha) * CE(student, labels) + alpha * T^2 * kl` and
    `kl = KL(softmax(teacher / T) || softmax(student / T))`, averaged over the batch.

    Logits are `[batch, classes]`; the loss is computed in float32 whatever their dtype (autocast)."""
    student_logits = student_logits.float()
    teacher_logits = teacher_logits.detach().float()
    cross_entropy = F.cross_entropy(student_logits, labels)
    kl = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        F.log_softmax(teacher_logits / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    loss = (1.0 - alpha) * cross_entropy + alpha * temperature**2 * kl
    return loss, cross_entropy, kl


def _accepts_keep_rate(model: nn.Module) -> bool:
    return "keep_rate" in inspect.signature(model.forward).parameters


class DistillationTrainer(Trainer):
    """A [`~transformers.Trainer`] that distills a frozen, unreduced teacher into the EViT model it trains.

    The training loss is `(1 - distillation_alpha) * CE + distillation_alpha * T^2 * KL(teacher || student)` at
    temperature `T = distillation_temperature`. The teacher sees the same (augmented) batch as the student and runs
    with every token (`keep_rate=1.0` where its forward takes one). Both parts are logged, as `loss_ce` and
    `loss_distillation`, averaged over the steps since the last log and over the processes. Evaluation reports the
    student's own loss. With `distillation_alpha=0` it is a plain `Trainer` (no teacher is needed or run).

    The teacher is never saved in checkpoints: a resumed run rebuilds it from the starting checkpoint, as the
    fine-tuning example does.

    Args:
        teacher_model (`nn.Module`, *optional*):
            The starting checkpoint's model, with the same labels as the student. It is put in eval mode, frozen and
            moved to the training device. Required when `distillation_alpha > 0`.
        distillation_alpha (`float`, *optional*, defaults to 0):
            Weight of the distillation term, in [0, 1].
        distillation_temperature (`float`, *optional*, defaults to 1):
            Softmax temperature of both distributions.
        *args, **kwargs: `Trainer`'s.

    Example:

    ```python
    >>> teacher = EViTForImageClassification.from_pretrained(checkpoint, keep_rate=1.0)
    >>> student = EViTForImageClassification.from_pretrained(checkpoint, keep_rate=0.5)
    >>> trainer = DistillationTrainer(
    ...     model=student, teacher_model=teacher, distillation_alpha=0.5, args=args, train_dataset=train_dataset
    ... )
    >>> trainer.train()
    ```
    """

    def __init__(
        self,
        *args,
        teacher_model: nn.Module | None = None,
        distillation_alpha: float = 0.0,
        distillation_temperature: float = 1.0,
        **kwargs,
    ):
        check_distillation_settings(distillation_alpha, distillation_temperature)
        if distillation_alpha > 0 and teacher_model is None:
            raise ValueError(
                f"distillation_alpha={distillation_alpha} needs a teacher_model: the starting checkpoint, loaded "
                "without token reduction (keep_rate=1.0)."
            )
        super().__init__(*args, **kwargs)
        self.distillation_alpha = float(distillation_alpha)
        self.distillation_temperature = float(distillation_temperature)
        self.teacher_model = None
        if self.distillation_alpha > 0:
            student_labels = getattr(self.model.config, "num_labels", None)
            teacher_labels = getattr(getattr(teacher_model, "config", None), "num_labels", None)
            if student_labels is not None and teacher_labels is not None and student_labels != teacher_labels:
                raise ValueError(
                    f"The teacher predicts {teacher_labels} labels and the student {student_labels}: distillation "
                    "compares their predictions class by class, so both need the same head (a teacher fine-tuned on "
                    "the dataset's labels)."
                )
            self.teacher_model = teacher_model.to(self.args.device).eval().requires_grad_(False)
            self._teacher_takes_keep_rate = _accepts_keep_rate(self.teacher_model)
            # The loss below is a mean over this batch; Trainer divides it by the gradient accumulation steps.
            self.loss_is_scaled_for_ga = False
        self._loss_part_sums: dict[str, torch.Tensor] = {}
        self._loss_part_steps = 0

    def _teacher_logits(self, inputs: dict) -> torch.Tensor:
        teacher_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        if self._teacher_takes_keep_rate:
            teacher_inputs["keep_rate"] = 1.0
        with torch.no_grad():
            return self.teacher_model(**teacher_inputs).logits

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher_model is None or not model.training or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        outputs = model(**{key: value for key, value in inputs.items() if key != "labels"})
        teacher_logits = self._teacher_logits(inputs)
        loss, cross_entropy, kl = distillation_loss(
            outputs.logits, teacher_logits, labels, self.distillation_alpha, self.distillation_temperature
        )
        for name, value in (("loss_ce", cross_entropy), ("loss_distillation", kl)):
            value = value.detach()
            self._loss_part_sums[name] = self._loss_part_sums.get(name, 0) + value
        self._loss_part_steps += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Training logs (they hold "loss") get the mean of each part since the last one. Every process logs at the same
        # steps, so the gather below is collective.
        if "loss" in logs and self._loss_part_steps:
            for name, total in self._loss_part_sums.items():
                mean = (total / self._loss_part_steps).reshape(1)
                logs[name] = round(self.accelerator.gather(mean).mean().item(), 6)
            self._loss_part_sums, self._loss_part_steps = {}, 0
        super().log(logs, start_time)


__all__ = ["DistillationTrainer", "distillation_loss"]
