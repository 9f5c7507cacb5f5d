import math
from types import SimpleNamespace

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

import evit_hf
from evit_hf import KeepRateScheduler, scheduled_keep_rate

from .model_builders import TINY, stock_and_evit


@pytest.mark.parametrize(
    "step, expected",
    [(0, 1.0), (9.99, 1.0), (10, 1.0), (60, 0.85), (110, 0.7), (500, 0.7)],
    ids=lambda value: str(value),
)
def test_schedule_values(step, expected):
    # keep 1 until 10, cosine down to 0.7 over 100, then constant; halfway the cosine is at the mean
    assert scheduled_keep_rate(step, 0.7, warmup_steps=10, shrink_steps=100) == pytest.approx(expected)


def test_schedule_is_monotone_and_cosine_shaped():
    values = [scheduled_keep_rate(step, 0.5, 0, 40) for step in range(41)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert values[10] == pytest.approx(0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_no_warmup_uses_the_target_from_the_start():
    assert scheduled_keep_rate(0, 0.7, 0, 0) == 0.7


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_keep_rate": 0.9, "start_keep_rate": 0.8}, "must not end above its start"),
        ({"target_keep_rate": 1.5}, r"target_keep_rate: keep_rate must be in \(0, 1\]"),
        ({"target_keep_rate": 0.7, "start_keep_rate": 0}, r"start_keep_rate: keep_rate must be in \(0, 1\]"),
        ({"target_keep_rate": [0.9, 1.2]}, r"target_keep_rate: keep_rate must be in \(0, 1\]"),
        ({"target_keep_rate": [0.9, 0.7], "start_keep_rate": 0.8}, "must not end above its start"),
        ({"target_keep_rate": 0.7, "warmup": -1}, "must be >= 0"),
        ({"target_keep_rate": 0.7, "unit": "minute"}, "unit must be 'epoch' or 'step'"),
    ],
    ids=[
        "ends-above-start",
        "target-above-one",
        "start-zero",
        "layer-target-above-one",
        "layer-above-start",
        "negative-span",
        "bad-unit",
    ],
)
def test_invalid_schedules_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KeepRateScheduler(**kwargs)


def test_epoch_schedule_uses_fractional_epochs():
    scheduler = KeepRateScheduler(0.5, warmup=1, shrink=2, unit="epoch")
    assert scheduler.keep_rate_at(10, steps_per_epoch=10) == 1.0
    assert scheduler.keep_rate_at(20, steps_per_epoch=10) == pytest.approx(0.75)
    assert scheduler.keep_rate_at(30, steps_per_epoch=10) == 0.5


def cosine_after(steps_into_shrink):
    """Target 0.5, start 1.0, a cosine over 4 steps."""
    return 0.5 + 0.25 * (1 + math.cos(math.pi * steps_into_shrink / 4))


# Warm-up 4 steps at 1.0, then the cosine over 4 steps, then 0.5.
STEP_SCHEDULE = [
    (0, 1.0),
    (3, 1.0),
    (4, 1.0),
    (5, cosine_after(1)),
    (6, 0.75),
    (7, cosine_after(3)),
    (8, 0.5),
    (9, 0.5),
]
STEP_IDS = [f"after-{step}-steps" for step, _ in STEP_SCHEDULE]


@pytest.mark.parametrize("global_step, expected", STEP_SCHEDULE, ids=STEP_IDS)
def test_step_schedule_reads_the_steps_already_taken(global_step, expected):
    # The step that follows `global_step` optimizer steps: the first step (global_step 0) trains at the start value.
    scheduler = KeepRateScheduler(0.5, warmup=4, shrink=4, unit="step")
    assert scheduler.keep_rate_at(global_step) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("global_step, expected", STEP_SCHEDULE, ids=STEP_IDS)
@pytest.mark.parametrize("unit", ["step", "epoch"])
def test_callback_sets_the_keep_rate_of_the_coming_step(unit, global_step, expected):
    # 2 optimizer steps per epoch (20 steps, 10 epochs): in epochs, warm-up 2 and shrink 2 are 4 and 4 steps.
    spans = {"warmup": 4, "shrink": 4} if unit == "step" else {"warmup": 2, "shrink": 2}
    scheduler = KeepRateScheduler(0.5, unit=unit, **spans)
    model = SimpleNamespace(config=SimpleNamespace(keep_rate=None))
    state = TrainerState(global_step=global_step, max_steps=20, num_train_epochs=10)
    scheduler.on_step_begin(None, state, TrainerControl(), model=model)
    assert model.config.keep_rate == pytest.approx(expected, abs=1e-12)
    assert scheduler.current_keep_rate == model.config.keep_rate


class RandomImages(torch.utils.data.Dataset):
    def __init__(self, count=48):
        generator = torch.Generator().manual_seed(0)
        self.pixels = torch.randn(count, 3, TINY["image_size"], TINY["image_size"], generator=generator)
        self.labels = torch.randint(0, TINY["num_labels"], (count,), generator=generator)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"pixel_values": self.pixels[index], "labels": self.labels[index]}


class KeepRateRecorder(TrainerCallback):
    """Records the keep rate the model trains each step with (after the scheduler has set it)."""

    def __init__(self, stop_at=None):
        self.keep_rates, self.stop_at = {}, stop_at

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.keep_rates[state.global_step + 1] = model.config.keep_rate

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop_at is not None and state.global_step >= self.stop_at:
            control.should_training_stop = True


def train(output_dir, recorder, resume=None, max_steps=-1):
    _, model = stock_and_evit("vit-classifier")
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        num_train_epochs=3,  # 6 steps per epoch, 18 steps
        max_steps=max_steps,
        learning_rate=1e-3,
        save_steps=7,
        logging_steps=1,
        report_to="none",
        seed=0,
        disable_tqdm=True,
    )
    scheduler = KeepRateScheduler(0.5, warmup=0.5, shrink=1.5, unit="epoch")
    trainer = Trainer(model=model, args=args, train_dataset=RandomImages(), callbacks=[scheduler, recorder])
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.slow  # a real run in a subprocess, or a fresh interpreter: seconds on 2 cores
def test_resumed_training_sees_the_same_keep_rates(tmp_path):
    full = KeepRateRecorder()
    trainer = train(tmp_path / "full", full)
    assert len(full.keep_rates) == 18
    assert full.keep_rates[1] == 1.0 and full.keep_rates[18] == 0.5
    assert len(set(full.keep_rates.values())) > 5  # it did shrink along the way
    # 6 steps per epoch: step s (1-based) follows s - 1 steps, at epoch (s - 1) / 6; 1.0 until epoch 0.5, then the
    # cosine over 1.5 epochs (steps 4 to 13), then 0.5.
    for step, keep_rate in full.keep_rates.items():
        epoch = (step - 1) / 6
        expected = (
            1.0 if epoch <= 0.5 else 0.5 if epoch >= 2 else 0.75 + 0.25 * math.cos(math.pi * (epoch - 0.5) / 1.5)
        )
        assert keep_rate == pytest.approx(expected, abs=1e-12), step
    logged = [entry["keep_rate"] for entry in trainer.state.log_history if "keep_rate" in entry]
    assert logged == [full.keep_rates[step] for step in range(1, 19)]  # logged with the Trainer's logs
    assert trainer.model.config.keep_rate == 0.5  # left at the target

    interrupted = KeepRateRecorder(stop_at=7)
    train(tmp_path / "resumed", interrupted)
    resumed = KeepRateRecorder()
    train(tmp_path / "resumed", resumed, resume=str(tmp_path / "resumed" / "checkpoint-7"))
    assert sorted(resumed.keep_rates) == list(range(8, 19))
    assert resumed.keep_rates == {step: full.keep_rates[step] for step in range(8, 19)}


def test_epochs_count_the_steps_of_an_epoch_when_max_steps_ends_inside_one(tmp_path):
    # 10 steps of 6 per epoch: Trainer counts 2 epochs, but an epoch is still 6 steps, not 10 / 2.
    recorder = KeepRateRecorder()
    train(tmp_path / "run", recorder, max_steps=10)
    assert sorted(recorder.keep_rates) == list(range(1, 11))
    for step, keep_rate in recorder.keep_rates.items():
        expected = scheduled_keep_rate((step - 1) / 6, 0.5, warmup_steps=0.5, shrink_steps=1.5)
        assert keep_rate == pytest.approx(expected, abs=1e-12), step


def test_exported_from_the_package():
    assert evit_hf.KeepRateScheduler is KeepRateScheduler


# Warm-up starts users change: below 1, with one target or one per reduction layer (each layer from the start down to
# its own target).
@pytest.mark.parametrize("start", [1.0, 0.9, 0.75])
@pytest.mark.parametrize("target", [0.5, [0.7, 0.6, 0.5]], ids=["one-target", "per-layer"])
def test_the_warm_up_starts_at_the_start_rate_for_every_layer(start, target):
    scheduler = KeepRateScheduler(target, warmup=2, shrink=4, unit="step", start_keep_rate=start)
    targets = target if isinstance(target, list) else [target]

    def per_layer(value):
        return value if isinstance(value, list) else [value]

    for step in (0, 1, 2):  # the warm-up, and the first step of the cosine (progress 0)
        assert per_layer(scheduler.keep_rate_at(step)) == [start] * len(targets)
    halfway = per_layer(scheduler.keep_rate_at(4))
    assert halfway == pytest.approx([(start + layer_target) / 2 for layer_target in targets], abs=1e-12)
    for step in (6, 9):
        assert per_layer(scheduler.keep_rate_at(step)) == pytest.approx(targets, abs=1e-12)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_training_follows_a_per_layer_warm_up_from_a_start_below_one(tmp_path, accumulation):
    torch.set_num_threads(1)  # a tiny model: one thread is fastest and steady on a busy machine; restored after
    # 48 images in batches of 8 / accumulation: 6 optimizer steps per epoch whatever the accumulation.
    _, model = stock_and_evit("vit-classifier")
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8 // accumulation,
        gradient_accumulation_steps=accumulation,
        max_steps=6,  # ends inside the cosine: the model is left at the targets all the same
        learning_rate=1e-3,
        save_strategy="no",
        logging_steps=1,
        report_to="none",
        seed=0,
        disable_tqdm=True,
    )
    targets = [0.7, 0.6, 0.5]
    scheduler = KeepRateScheduler(targets, warmup=1 / 3, shrink=2 / 3, unit="epoch", start_keep_rate=0.9)
    recorder = KeepRateRecorder()
    Trainer(model=model, args=args, train_dataset=RandomImages(), callbacks=[scheduler, recorder]).train()
    # Epoch of step s: (s - 1) / 6. 0.9 until epoch 1/3 (steps 1-3), then the cosine over 2/3 epoch (steps 3-7).
    for step, keep_rate in recorder.keep_rates.items():
        progress = min(max(((step - 1) / 6 - 1 / 3) / (2 / 3), 0.0), 1.0)
        expected = [t + (0.9 - t) * 0.5 * (1 + math.cos(math.pi * progress)) for t in targets]
        assert keep_rate == pytest.approx(expected, abs=1e-12), step
    assert sorted(recorder.keep_rates) == list(range(1, 7))
    assert recorder.keep_rates[1] == [0.9, 0.9, 0.9]
    assert all(rate > target for rate, target in zip(recorder.keep_rates[6], targets, strict=True))
    assert model.config.keep_rate == targets
