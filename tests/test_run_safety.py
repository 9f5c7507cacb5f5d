"""Runs that lose nothing and mix nothing: impossible arguments refused before any work, no overwrite of the model a
run starts from, one run at a time per output folder (a lock that a killed run does not leave behind)."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from evit_hf import run_lock
from evit_hf.run_lock import LOCK_FILE, OutputDirInUse, OutputDirLock

from .example_modules import evaluate_keep_rates, example_refusal, run_image_classification, stop_example_work
from .run_helpers import EXAMPLES, checkpoint_written, save_small_vit, stopped_run_command, training_args


SCRIPT = os.path.join(EXAMPLES, "run_image_classification.py")


@pytest.fixture
def no_work(monkeypatch):
    stop_example_work(monkeypatch)


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--max_steps", "0"], "--max_steps must be a positive number of optimizer steps, or -1"),
        (["--max_steps", "-3"], "--max_steps must be a positive number"),
        (["--max_steps", "-1", "--num_train_epochs", "0"], "--num_train_epochs must be above 0"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be at least 1; got 0"),
        (["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size must be at least 1; got 0"),
        (["--max_train_samples", "0"], r"--max_train_samples must be at least 1 \(leave it out"),
        (["--max_eval_samples", "0"], "--max_eval_samples must be at least 1"),
        (["--train_val_split", "1"], r"--train_val_split .* must be in \[0, 1\) \(0: no validation split\); got 1.0"),
        (["--train_val_split", "-0.1"], "--train_val_split .* got -0.1"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else None,
)
def test_impossible_training_arguments_are_refused_before_any_work(small_vit, tmp_path, no_work, extra, expected):
    output_dir = tmp_path / "run"
    message = example_refusal(run_image_classification.main, training_args(small_vit, output_dir, *extra))
    assert re.search(expected, message), message
    assert not output_dir.exists()  # nothing written


@pytest.mark.parametrize("layout", ["file", "under-a-file", "read-only"])
@pytest.mark.parametrize("script", ["training", "evaluation"])
def test_an_output_dir_that_cannot_be_written_is_refused_before_any_work(small_vit, tmp_path, no_work, layout, script):
    if layout == "file":
        (tmp_path / "taken").write_text("")
        output_dir, expected = tmp_path / "taken", "--output_dir .*taken is a file, not a folder"
    elif layout == "under-a-file":
        (tmp_path / "taken").write_text("")
        output_dir, expected = tmp_path / "taken" / "run", "--output_dir .*run cannot be created: .*taken is a file"
    else:
        if os.geteuid() == 0:
            pytest.skip("permission bits do not stop root")
        (tmp_path / "locked").mkdir(mode=0o500)
        output_dir, expected = tmp_path / "locked" / "run", "--output_dir .*run is not writable"
    if script == "training":
        message = example_refusal(run_image_classification.main, training_args(small_vit, output_dir))
    else:
        message = example_refusal(
            evaluate_keep_rates.main, ["--model_name_or_path", small_vit, "--output_dir", str(output_dir)]
        )
    assert re.search(expected, message), message


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--batch_size", "0"], "--batch_size must be at least 1; got 0"),
        (["--max_eval_samples", "0"], "--max_eval_samples must be at least 1"),
        (["--train_val_split", "1.5"], "--train_val_split .* got 1.5"),
    ],
    ids=["batch_size", "max_eval_samples", "train_val_split"],
)
def test_impossible_evaluation_arguments_are_refused_before_any_work(small_vit, tmp_path, no_work, extra, expected):
    output_dir = tmp_path / "table"
    message = example_refusal(
        evaluate_keep_rates.main, ["--model_name_or_path", small_vit, "--output_dir", str(output_dir), *extra]
    )
    assert re.search(expected, message), message
    assert not output_dir.exists()


def model_files(folder) -> set[str]:
    return {name for name in os.listdir(folder) if name in ("model.safetensors", "config.json")}


@pytest.mark.parametrize("where", ["output-dir-itself", "checkpoint-inside", "through-a-symlink", "relative-path"])
def test_overwrite_never_deletes_the_model_the_run_starts_from(tmp_path, monkeypatch, no_work, where):
    output_dir = tmp_path / "run"
    save_small_vit(output_dir)  # an earlier run's model, and a checkpoint of it
    save_small_vit(output_dir / "checkpoint-3")
    (tmp_path / "link").symlink_to(output_dir)
    monkeypatch.chdir(tmp_path)
    model, output, expected = {
        "output-dir-itself": (output_dir, output_dir, f"--output_dir {output_dir} is --model_name_or_path"),
        "checkpoint-inside": (output_dir / "checkpoint-3", output_dir, f"{output_dir} contains --model_name_or_path"),
        "through-a-symlink": (tmp_path / "link" / "checkpoint-3", output_dir, "contains --model_name_or_path"),
        "relative-path": (
            "run/checkpoint-3",
            "link",
            "--output_dir link contains --model_name_or_path run/checkpoint-3",
        ),
    }[where]
    message = example_refusal(run_image_classification.main, training_args(model, output, "--overwrite_output_dir"))
    assert expected in message
    assert "choose an --output_dir apart from --model_name_or_path" in message
    assert model_files(output_dir) == model_files(output_dir / "checkpoint-3") == {"model.safetensors", "config.json"}


def test_overwrite_never_deletes_the_checkpoint_the_run_resumes_from(small_vit, tmp_path, no_work):
    output_dir = tmp_path / "run"
    save_small_vit(output_dir / "checkpoint-3")
    args = training_args(small_vit, output_dir, "--overwrite_output_dir", "--resume_from_checkpoint")
    message = example_refusal(run_image_classification.main, [*args, str(output_dir / "checkpoint-3")])
    assert message.startswith(
        f"--output_dir {output_dir} contains --resume_from_checkpoint {output_dir / 'checkpoint-3'}"
    )
    assert model_files(output_dir / "checkpoint-3") == {"model.safetensors", "config.json"}


# Loads run_lock.py alone (not the package, which imports transformers): the holder is ready in a moment.
HOLD_THE_LOCK = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("run_lock", sys.argv[2])
run_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_lock)
run_lock.OutputDirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_run_into_a_locked_folder_is_refused_at_once(small_vit, tmp_path):
    output_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, str(output_dir), run_lock.__file__], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        for main, args in (
            (run_image_classification.main, training_args(small_vit, output_dir)),
            (evaluate_keep_rates.main, ["--model_name_or_path", small_vit, "--output_dir", str(output_dir)]),
        ):
            with pytest.raises(OutputDirInUse) as error:
                main(args)
            message = str(error.value)
            assert f"--output_dir {output_dir} is in use by another run (pid {holder.pid} on " in message
            assert "wait for it to end, or choose another --output_dir" in message
    finally:
        holder.kill()
        holder.wait()
    assert os.listdir(output_dir) == [LOCK_FILE]  # the refused runs wrote nothing
    with OutputDirLock(str(output_dir)):  # killed: its lock is gone with it, the file it left is taken over
        assert json.loads((output_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (output_dir / LOCK_FILE).exists()  # released: removed


def test_one_process_holds_one_lock_on_a_folder(tmp_path):
    lock = OutputDirLock(str(tmp_path / "run")).acquire()
    with pytest.raises(OutputDirInUse, match=f"pid {os.getpid()} on "):
        OutputDirLock(str(tmp_path / "run")).acquire()
    lock.release()
    OutputDirLock(str(tmp_path / "run")).acquire().release()


@pytest.mark.slow  # a real run in a subprocess, or a fresh interpreter: seconds on 2 cores
def test_killed_run_leaves_no_stale_lock_and_a_second_command_is_refused(small_vit, tmp_path, caplog):
    """Real processes: a run that stops in its third step, `python examples/run_image_classification.py` into its
    folder (refused at once), `kill -9` of the first; then the same command again, which proceeds at once and
    resumes."""
    output_dir = tmp_path / "run"
    args = [
        "--model_name_or_path", small_vit, "--output_dir", str(output_dir), "--do_train", "--max_steps", "4",
        "--per_device_train_batch_size", "16", "--max_train_samples", "40", "--save_strategy", "steps",
        "--save_steps", "2", "--report_to", "none", "--disable_tqdm", "true",
    ]  # fmt: skip
    first = subprocess.Popen(stopped_run_command(args), stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not checkpoint_written(output_dir / "checkpoint-2") and time.monotonic() < deadline:
            assert first.poll() is None, "the first run ended before its first checkpoint"
            time.sleep(0.02)
        assert checkpoint_written(output_dir / "checkpoint-2"), "checkpoint-2 was not written in time"
        second = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert f"--output_dir {output_dir} is in use by another run (pid {first.pid} on " in second.stderr
        assert first.poll() is None  # refused at once, while the first one still runs
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert first.returncode == -signal.SIGKILL
    assert (output_dir / LOCK_FILE).exists()  # left behind by kill -9, locked by nobody
    # The same command again, in this process: the refusal above went through the real command line already.
    with caplog.at_level(logging.INFO, logger="evit_hf.checkpoints"):
        run_image_classification.main(args)
    assert f"Resuming from {output_dir / 'checkpoint-2'}." in caplog.messages
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 4
    assert not (output_dir / LOCK_FILE).exists()
