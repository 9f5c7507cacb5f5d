"""Helpers of the tests that run the examples: a small saved ViT of the bundled digits, the command lines of short
training runs, the weights a run wrote, and runs started in processes of their own (a run stopped and killed after
its first checkpoint, a free port and the environment's launchers for runs of several processes).

The examples themselves, imported as modules, are in `example_modules.py`: importing them costs seconds, which the
tests that only save a model or build a command line do not pay.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor


EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
# The folder of this Python's commands (torchrun, accelerate): the launchers of the environment the tests run in.
BIN = os.path.dirname(sys.executable)

DIGIT_LABELS = [str(d) for d in range(10)]


def free_port() -> str:
    with socket.socket() as probe:  # a port of our own: launchers default to 29500, which may still be taken
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def save_small_vit(folder, labels=DIGIT_LABELS, image_size=32):
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=image_size,
        patch_size=4,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return str(folder)


def training_args(model, output_dir, *extra):
    return [
        "--model_name_or_path", str(model),
        "--output_dir", str(output_dir),
        "--do_train", "--do_eval",
        "--max_steps", "4",
        "--per_device_train_batch_size", "16",
        "--per_device_eval_batch_size", "128",
        "--report_to", "none",
        "--save_strategy", "no",
        "--max_eval_samples", "64",
        "--disable_tqdm", "true",
        "--card_keep_rates", "1.0", "0.5",
        *extra,
    ]  # fmt: skip


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


# The example as a command that stops in its third step, once checkpoint-2 is written, until a signal ends it: the
# signal lands at the same point of every run, whatever the machine's load. The stop changes no number. It runs with
# the test process's thread count (argv[2]): with another count, matrix products sum in another order, and the
# weights of the two halves of the run would differ from an uninterrupted run in the test process by about 3e-5.
STOPPED_RUN = """
import sys, time
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(int(sys.argv[2]))
import transformers
training_step = transformers.Trainer.training_step
def stopping_training_step(trainer, *args, **kwargs):
    if trainer.state.global_step >= 2:
        time.sleep(600)
    return training_step(trainer, *args, **kwargs)
transformers.Trainer.training_step = stopping_training_step
import run_image_classification
run_image_classification.main(sys.argv[3:])
"""


def stopped_run_command(args) -> list[str]:
    """The command line of the example that stops in its third step (`STOPPED_RUN`), with the test's thread count."""
    return [sys.executable, "-c", STOPPED_RUN, EXAMPLES, str(torch.get_num_threads()), *args]


def checkpoint_written(checkpoint) -> bool:
    """Whether Trainer has written `checkpoint` to its end: its trainer_state.json (the last file) reads. The file
    exists from the moment Trainer opens it, before its contents are written."""
    try:
        return json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] >= 0
    except (OSError, ValueError, KeyError):
        return False


def kill_after_first_checkpoint(args, output_dir, signal_number) -> str:
    """Starts the example in a process of its own, sends it `signal_number` once checkpoint-2 is written (while it
    waits in step 3), and returns what it printed."""
    process = subprocess.Popen(
        stopped_run_command(args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not checkpoint_written(output_dir / "checkpoint-2") and process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"checkpoint-2 was not written in time:\n{process.communicate()[0]}")
        time.sleep(0.02)
    process.send_signal(signal_number)
    output, _ = process.communicate(timeout=60)
    assert process.returncode != 0, f"the run ended before it could be interrupted:\n{output}"
    assert not os.path.exists(os.path.join(output_dir, "checkpoint-4")), "the run went on past step 2"
    return output
