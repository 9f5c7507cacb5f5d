"""Where a fine-tuning run starts, and what its checkpoints say: the choice between a fresh start, a resume and a
finished run, with each checkpoint checked before it is trusted.

- `training_start(trainer, training_args, settings)`: the newest readable checkpoint by step number (its
  `trainer_state.json` parses with a `global_step`, its safetensors headers read, and with several processes every
  `rng_state_N.pth` is complete), nothing when the folder holds a finished run of the requested length, a refusal
  when the folder holds a model no run there trained or when the run's settings differ from the checkpoint's.
- `EViTRunSettings`: the `TrainerCallback` that records a run's EViT settings (see
  `evit_hf.fine_tuning.run_settings`) in every checkpoint's `trainer_state.json`; `check_same_settings` compares.
- `last_complete_checkpoint`, `checkpoint_problem`, `read_trainer_state`, `finished_training_steps`: the checks.
- `finished_run_results`, `finish_from_checkpoint`: a rerun of a finished command, and a checkpoint at the last step.
"""

import json
import logging
import os
import re
import zipfile
from dataclasses import dataclass

from safetensors import SafetensorError, safe_open
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState


logger = logging.getLogger(__name__)

# Written last into a checkpoint by Trainer, and into the output folder by main() once training has ended.
TRAINER_STATE = "trainer_state.json"

MODEL_FILES = ("model.safetensors", "model.safetensors.index.json")

# An evaluation-only run writes its results here, never over a trained run's files.
EVALUATION_ONLY_RESULTS = "eval_only_results.json"


def holds_model(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in MODEL_FILES)


def checkpoint_steps(output_dir: str) -> list[tuple[int, str]]:
    """The checkpoint-N folders of `output_dir` as `(N, path)`, oldest first (by N as a number: 9 before 10)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(
        (int(match.group(1)), os.path.join(output_dir, name))
        for name in os.listdir(output_dir)
        if (match := re.fullmatch(r"checkpoint-(\d+)", name)) and os.path.isdir(os.path.join(output_dir, name))
    )


def read_trainer_state(folder: str) -> dict:
    """The trainer_state.json of `folder`; a `ValueError` saying why when it is missing or does not read."""
    path = os.path.join(folder, TRAINER_STATE)
    try:
        with open(path) as handle:
            state = json.load(handle)
    except FileNotFoundError:
        raise ValueError(f"it has no {TRAINER_STATE} (the run stopped while writing it)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"its {TRAINER_STATE} does not read ({error})") from None
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise ValueError(f"its {TRAINER_STATE} holds no global_step")
    return state


def checkpoint_problem(checkpoint: str, world_size: int = 1) -> str | None:
    """Why `checkpoint` cannot be resumed from (half-written or damaged), or None when it can. `world_size`: the
    processes of the run that wrote it."""
    try:
        read_trainer_state(checkpoint)
    except ValueError as error:
        return str(error)
    if world_size > 1:
        # Each process writes its own random state, and nothing makes the others finish before the main process
        # writes trainer_state.json: a killed job can leave a checkpoint that has the state but lacks one of them.
        for rank in range(world_size):
            name = f"rng_state_{rank}.pth"
            if not zipfile.is_zipfile(os.path.join(checkpoint, name)):  # torch.save writes zip archives
                return f"its {name} is missing or incomplete (the job stopped while writing it)"
    weight_files = []
    index_file = os.path.join(checkpoint, "model.safetensors.index.json")
    if os.path.isfile(index_file):
        try:
            with open(index_file) as handle:
                weight_files = sorted(set(json.load(handle)["weight_map"].values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
            return f"its model.safetensors.index.json does not read ({error})"
    elif os.path.isfile(os.path.join(checkpoint, "model.safetensors")):
        weight_files = ["model.safetensors"]
    for name in weight_files:
        try:
            # The header lists every tensor's byte range: a truncated file does not cover them and fails here.
            with safe_open(os.path.join(checkpoint, name), "pt"):
                pass
        except (OSError, SafetensorError) as error:
            return f"its {name} does not read ({error})"
    return None


def last_complete_checkpoint(output_dir: str, world_size: int = 1) -> str | None:
    """The newest checkpoint-N folder that can be resumed from. Newer ones, half-written by a killed run (Trainer
    writes trainer_state.json last) or damaged (a truncated weights or state file), are skipped with a warning that
    names them."""
    for _, checkpoint in reversed(checkpoint_steps(output_dir)):
        problem = checkpoint_problem(checkpoint, world_size)
        if problem is None:
            return checkpoint
        logger.warning(f"Skipping {checkpoint}: {problem}. Resuming from an earlier checkpoint, if there is one.")
    return None


def finished_training_steps(output_dir: str) -> int | None:
    """The steps of the training that ended in `output_dir` (its model and final state are there), else None."""
    if not (os.path.isfile(os.path.join(output_dir, TRAINER_STATE)) and holds_model(output_dir)):
        return None
    try:
        return read_trainer_state(output_dir)["global_step"]
    except ValueError as error:
        logger.warning(f"{output_dir}: {error}; its model is not taken for a finished run.")
        return None


class EViTRunSettings(TrainerCallback, ExportableState):
    """The settings that make a run's steps what they are, recorded in every checkpoint: Trainer stores the state of
    `ExportableState` callbacks in trainer_state.json, the file it writes last, so a complete checkpoint has them.
    A resumed run compares its own settings with them (see `settings_differences`)."""

    def __init__(self, settings: dict | None = None):
        self.settings = dict(settings or {})

    def state(self) -> dict:
        return {"args": {"settings": self.settings}, "attributes": {}}

    def on_train_begin(self, args, state, control, **kwargs):
        # The state of a checkpoint from before this record has no entry for it, and Trainer's next checkpoint
        # would fail on the missing key.
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())


def recorded_settings(folder: str, settings: dict) -> dict:
    """The settings of the run that wrote `folder` (a checkpoint, or a finished run's output folder): those its
    trainer_state.json records, else (an earlier version's run) what its config.json says of `settings`' keys."""
    recorded = read_trainer_state(folder).get("stateful_callbacks", {}).get(EViTRunSettings.__name__)
    if isinstance(recorded, dict):
        return recorded.get("args", {}).get("settings", {})
    try:
        with open(os.path.join(folder, "config.json")) as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return {}
    # A keep-rate schedule changes the config's keep_rate from step to step: only a constant one is comparable.
    constant_keep_rate = not (settings["keep_rate_warmup"] or settings["keep_rate_shrink"])
    config = config.get("vision_config") or config  # CLIP-style: the vision tower's settings
    return {
        name: config[name]
        for name in settings
        if name in config and (name != "keep_rate" or constant_keep_rate) and not name.startswith("keep_rate_")
    }


def settings_differences(folder: str, settings: dict) -> list[str]:
    """How this run's `settings` differ from those of the run that wrote `folder`: 'name: X there, Y here'."""
    recorded = recorded_settings(folder, settings)
    return [
        f"{name} {recorded[name]!r} there, {value!r} here"
        for name, value in settings.items()
        if name in recorded and recorded[name] != value
    ]


def check_same_settings(folder: str, settings: dict, what: str) -> None:
    differences = settings_differences(folder, settings)
    if differences:
        raise ValueError(
            f"{what} {folder} was trained with other EViT settings than this run's: {'; '.join(differences)}. Pass "
            "its settings to continue it, --overwrite_output_dir to start over (deleting the earlier run), or "
            "another --output_dir."
        )


@dataclass
class TrainingStart:
    """Where training starts. `finished`: `output_dir` holds a finished run that already reached this run's step
    count; nothing is trained or written. `checkpoint_at_end`: `checkpoint` is at this run's last step (a run killed
    after saving it); its weights end the run, with no step trained."""

    checkpoint: str | None = None
    finished: bool = False
    checkpoint_at_end: bool = False


def training_start(trainer: Trainer, training_args: TrainingArguments, settings: dict) -> TrainingStart:
    """Where training starts (see `TrainingStart`); a refusal when the folder's run had other settings than
    `settings`, or holds a model that no run there trained."""
    output_dir = training_args.output_dir
    # The step count Trainer will aim for, from --max_steps or the epochs over this data.
    target_steps = trainer.set_initial_training_values(training_args, trainer.get_train_dataloader())[-1]
    if training_args.resume_from_checkpoint is not None:
        checkpoint = training_args.resume_from_checkpoint
        problem = checkpoint_problem(checkpoint, training_args.world_size)
        if problem is not None:
            raise ValueError(f"--resume_from_checkpoint {checkpoint}: {problem}. Pass another checkpoint.")
    else:
        checkpoint = last_complete_checkpoint(output_dir, training_args.world_size)
        trained_steps = finished_training_steps(output_dir)
        if trained_steps is not None:
            check_same_settings(output_dir, settings, "The finished run in")
            if target_steps <= trained_steps:
                return TrainingStart(finished=True)
            if checkpoint is None:
                raise ValueError(
                    f"{output_dir} holds a model trained for {trained_steps} steps, and this run asks for "
                    f"{target_steps}, but there is no checkpoint to continue from (--save_strategy no). Pass "
                    "--overwrite_output_dir to train again from --model_name_or_path, replacing it, or choose "
                    "another --output_dir."
                )
        elif checkpoint is None and holds_model(output_dir):
            raise ValueError(
                f"{output_dir} already holds a model, and no checkpoint or finished training of a run here. Choose "
                "another --output_dir, or pass --overwrite_output_dir to replace it."
            )
    if checkpoint is None:
        return TrainingStart()
    check_same_settings(checkpoint, settings, "The checkpoint")
    checkpoint_step = read_trainer_state(checkpoint)["global_step"]
    if checkpoint_step > target_steps:
        raise ValueError(
            f"{checkpoint} is past the end of this run ({checkpoint_step} steps, this run asks for {target_steps}): "
            f"pass --max_steps {checkpoint_step} or more to continue it, or --overwrite_output_dir to start over."
        )
    if checkpoint_step == target_steps:
        logger.info(f"{checkpoint} is at this run's last step ({target_steps}): finishing the run with its weights.")
        return TrainingStart(checkpoint, checkpoint_at_end=True)
    logger.info(f"Resuming from {checkpoint}.")
    return TrainingStart(checkpoint)


def finished_run_results(output_dir: str, do_eval: bool) -> dict:
    """A rerun of a finished command: nothing is trained or written; the results of the run are returned."""
    message = (
        f"{output_dir} holds a finished run of this length: nothing to train, nothing is overwritten. Pass a higher "
        "--max_steps (or --num_train_epochs) to continue it from its last checkpoint, or --overwrite_output_dir to "
        "start over."
    )
    results_file = os.path.join(output_dir, "all_results.json")
    results = {}
    if os.path.isfile(results_file):
        with open(results_file) as handle:
            results = json.load(handle)
    if do_eval and not any(key.startswith("eval_") for key in results):
        message += (
            f" Its evaluation did not finish: evaluate it with --do_eval alone, --model_name_or_path {output_dir} and "
            "another --output_dir."
        )
    logger.warning(message)
    return results


def finish_from_checkpoint(trainer: Trainer, checkpoint: str) -> dict:
    """A checkpoint at the run's last step ends the run: its weights and state, no step trained. (Trainer, resumed
    there, would train one step past the end when the last step falls inside an epoch.)"""
    trainer._load_from_checkpoint(checkpoint)
    trainer.state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE))
    return {"epoch": trainer.state.epoch, "total_flos": trainer.state.total_flos}


__all__ = [
    "EVALUATION_ONLY_RESULTS",
    "MODEL_FILES",
    "TRAINER_STATE",
    "EViTRunSettings",
    "TrainingStart",
    "check_same_settings",
    "checkpoint_problem",
    "checkpoint_steps",
    "finish_from_checkpoint",
    "finished_run_results",
    "finished_training_steps",
    "holds_model",
    "last_complete_checkpoint",
    "read_trainer_state",
    "recorded_settings",
    "settings_differences",
    "training_start",
]
