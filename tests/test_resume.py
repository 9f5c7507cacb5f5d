"""Interrupted and repeated runs of the fine-tuning example lose nothing: a killed run resumed with the same command
ends with the weights of an uninterrupted run, and rerunning a finished command changes nothing."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from .test_examples import EXAMPLES, run_image_classification, save_small_vit


# The example with every training step slowed down, so that a signal can land while the run is in progress. The
# sleep changes no number: the weights depend only on the data, the seed and the steps taken.
SLOWED_RUN = """
import sys, time
sys.path.insert(0, sys.argv[1])
import transformers
training_step = transformers.Trainer.training_step
def slow_training_step(*args, **kwargs):
    time.sleep(0.25)
    return training_step(*args, **kwargs)
transformers.Trainer.training_step = slow_training_step
import run_image_classification
run_image_classification.main(sys.argv[2:])
"""


def resume_args(model, output_dir, *extra):
    return [
        "--model_name_or_path", str(model),
        "--output_dir", str(output_dir),
        "--do_train",
        "--max_steps", "8",
        "--per_device_train_batch_size", "16",
        "--max_train_samples", "40",  # 3 steps an epoch: the run crosses epochs, the last batch is short
        "--learning_rate", "5e-3",
        "--lr_scheduler_type", "constant",
        "--save_strategy", "steps",
        "--save_steps", "2",
        "--report_to", "none",
        "--disable_tqdm", "true",
        "--seed", "3",
        *extra,
    ]  # fmt: skip


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "model.safetensors"))


def largest_difference(first: dict, second: dict) -> float:
    assert first.keys() == second.keys()
    return max((first[name] - second[name]).abs().max().item() for name in first)


def kill_after_first_checkpoint(args, output_dir, signal_number) -> str:
    """Starts the example in a process of its own, sends it `signal_number` once checkpoint-2 is complete, and
    returns what it printed."""
    process = subprocess.Popen(
        [sys.executable, "-c", SLOWED_RUN, EXAMPLES, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    state_file = os.path.join(output_dir, "checkpoint-2", "trainer_state.json")  # the last file a checkpoint gets
    deadline = time.monotonic() + 120
    while not os.path.exists(state_file) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal_number)
    output, _ = process.communicate(timeout=60)
    assert process.returncode != 0, f"the run ended before it could be interrupted:\n{output}"
    assert not os.path.exists(os.path.join(output_dir, "model.safetensors")), "the run got to its end"
    return output


@pytest.fixture(scope="module")
def small_vit(tmp_path_factory):
    return save_small_vit(tmp_path_factory.mktemp("vit") / "model")


@pytest.mark.parametrize(
    "signal_number, schedule",
    [
        (signal.SIGTERM, ["--keep_rate_warmup", "2", "--keep_rate_shrink", "3", "--keep_rate_schedule_unit", "step"]),
        (signal.SIGINT, []),
    ],
    ids=["sigterm-keep-rate-warmup", "sigint-constant-keep-rate"],
)
def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(
    small_vit, tmp_path, signal_number, schedule, caplog
):
    uninterrupted = tmp_path / "uninterrupted"
    run_image_classification.main(resume_args(small_vit, uninterrupted, *schedule))

    interrupted = tmp_path / "interrupted"
    args = resume_args(small_vit, interrupted, *schedule)
    kill_after_first_checkpoint(args, interrupted, signal_number)
    with caplog.at_level("INFO"):
        run_image_classification.main(args)  # the same command again
    assert "Resuming from" in caplog.text
    assert "missing keys" not in caplog.text.lower() and "unexpected keys" not in caplog.text.lower()

    final_state = json.loads((interrupted / "trainer_state.json").read_text())
    assert final_state["global_step"] == 8
    assert largest_difference(weights(interrupted), weights(uninterrupted)) <= 1e-6
    # Training moved the weights: equal runs are not equal because nothing happened.
    assert largest_difference(weights(uninterrupted), weights(interrupted / "checkpoint-2")) > 1e-3
