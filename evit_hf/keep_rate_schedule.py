"""The paper's keep-rate warm-up as a `TrainerCallback`: keep every token at first, then shrink along a cosine."""

import math

from transformers import TrainerCallback

from .configuration_evit_base import check_keep_rate


def scheduled_keep_rate(
    step: float, target_keep_rate: float, warmup_steps: float, shrink_steps: float, start_keep_rate: float = 1.0
) -> float:
    """The keep rate at `step` (a global step, or a fractional epoch: any unit, as long as all three agree).

    `start_keep_rate` until `warmup_steps`, then a cosine from it down to `target_keep_rate` over `shrink_steps`, then
    `target_keep_rate`. A pure function of the step, so a resumed run sees the same values.
    """
    if step < warmup_steps:
        return start_keep_rate
    if shrink_steps <= 0 or step >= warmup_steps + shrink_steps:
        return target_keep_rate
    progress = (step - warmup_steps) / shrink_steps
    return target_keep_rate + (start_keep_rate - target_keep_rate) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _checked(name: str, keep_rate):
    try:
        return check_keep_rate(keep_rate)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


class KeepRateScheduler(TrainerCallback):
    """Sets `model.config.keep_rate` before every training step, following the paper's warm-up.

    Keep `start_keep_rate` (1.0: every token) for `warmup`, then a cosine down to `target_keep_rate` over `shrink`,
    then constant. With per-layer keep rates (a list), each reduction layer goes down to its own target. Spans are in
    epochs (`unit="epoch"`, as the reference's `shrink_start_epoch` / `shrink_epochs`; fractional epochs are computed
    from the global step) or in optimizer steps (`unit="step"`). The value is a pure
    function of the global step, so resuming from a checkpoint gives exactly the same keep rates, and it is added to
    the Trainer's logs as `keep_rate`. At the end of training the model is left at `target_keep_rate`.

    The reference recipes: from scratch, keep 1 until epoch 10 then shrink over 100 epochs; fine-tuning a pretrained
    DeiT uses the target from the start (`warmup=0, shrink=0`).

    Args:
        target_keep_rate (`float` or `list[float]`):
            The keep rate after the warm-up, in (0, 1]: one for every reduction layer, or one per reduction layer in
            ascending layer order.
        warmup (`float`, *optional*, defaults to 0):
            Span with `start_keep_rate`.
        shrink (`float`, *optional*, defaults to 0):
            Span of the cosine from `start_keep_rate` to `target_keep_rate`.
        unit (`str`, *optional*, defaults to `"epoch"`):
            `"epoch"` or `"step"`.
        start_keep_rate (`float`, *optional*, defaults to 1.0):
            The keep rate during the warm-up; not below the target.

    Example:

    ```python
    >>> from transformers import Trainer
    >>> from evit_hf import KeepRateScheduler

    >>> trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[KeepRateScheduler(0.7, 10, 100)])
    ```
    """

    def __init__(
        self,
        target_keep_rate: float,
        warmup: float = 0.0,
        shrink: float = 0.0,
        unit: str = "epoch",
        start_keep_rate: float = 1.0,
    ):
        target_keep_rate = _checked("target_keep_rate", target_keep_rate)
        start_keep_rate = _checked("start_keep_rate", start_keep_rate)
        if isinstance(start_keep_rate, list):
            raise ValueError(f"start_keep_rate is one number in (0, 1] for every layer, got {start_keep_rate}.")
        targets = target_keep_rate if isinstance(target_keep_rate, list) else [target_keep_rate]
        if max(targets) > start_keep_rate:
            raise ValueError(
                f"The keep rate schedule must not end above its start: target_keep_rate={target_keep_rate} > "
                f"start_keep_rate={start_keep_rate}. Lower the target or raise the start (at most 1.0)."
            )
        if warmup < 0 or shrink < 0:
            raise ValueError(f"warmup and shrink are spans and must be >= 0, got warmup={warmup}, shrink={shrink}.")
        if unit not in ("epoch", "step"):
            raise ValueError(f"unit must be 'epoch' or 'step', got {unit!r}.")
        self.target_keep_rate = target_keep_rate
        self.warmup = warmup
        self.shrink = shrink
        self.unit = unit
        self.start_keep_rate = start_keep_rate

    def keep_rate_at(self, global_step: int, steps_per_epoch: float | None = None) -> float | list[float]:
        """The keep rate (a list, for per-layer targets) of the step that follows `global_step` optimizer steps."""
        position = global_step
        if self.unit == "epoch":
            if not steps_per_epoch:
                raise ValueError("A schedule in epochs needs steps_per_epoch (optimizer steps per epoch).")
            position = global_step / steps_per_epoch
        if isinstance(self.target_keep_rate, list):
            return [
                scheduled_keep_rate(position, target, self.warmup, self.shrink, self.start_keep_rate)
                for target in self.target_keep_rate
            ]
        return scheduled_keep_rate(position, self.target_keep_rate, self.warmup, self.shrink, self.start_keep_rate)

    @staticmethod
    def _steps_per_epoch(args, state, train_dataloader) -> float | None:
        """Optimizer steps per epoch, counted as Trainer counts them."""
        if train_dataloader is not None and hasattr(train_dataloader, "__len__"):
            # Not max_steps / num_train_epochs: with --max_steps, Trainer rounds the epochs up to a whole number.
            accumulation = args.gradient_accumulation_steps
            return max(len(train_dataloader) // accumulation + int(len(train_dataloader) % accumulation > 0), 1)
        if state.max_steps and state.num_train_epochs:  # a loader without a length: the state's estimate
            return state.max_steps / state.num_train_epochs
        return None

    def _apply(self, args, state, model, train_dataloader) -> None:
        keep_rate = self.keep_rate_at(state.global_step, self._steps_per_epoch(args, state, train_dataloader))
        if model is not None:
            model.config.keep_rate = keep_rate
        self.current_keep_rate = keep_rate

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self._apply(args, state, model, train_dataloader)

    def on_step_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self._apply(args, state, model, train_dataloader)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:  # training logs only, not evaluation results
            return
        # The console (the progress callback runs after user callbacks) reads `logs`; the Trainer has already stored
        # a copy in the log history (trainer_state.json), so that copy gets the value too.
        logs["keep_rate"] = self.current_keep_rate
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1]["keep_rate"] = self.current_keep_rate

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            model.config.keep_rate = self.target_keep_rate


__all__ = ["KeepRateScheduler", "scheduled_keep_rate"]
