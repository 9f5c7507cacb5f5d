"""Interrupted and repeated runs of the fine-tuning example lose nothing: a killed run resumed with the same command
ends with the weights of an uninterrupted run, and rerunning a finished command changes nothing."""

import json
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import save_file
from transformers import Trainer, TrainingArguments

from evit_hf import checkpoints
from evit_hf.outputs import MANIFEST_FILE

from .example_modules import run_image_classification
from .run_helpers import kill_after_first_checkpoint, largest_difference, resume_args, save_small_vit, weights


@pytest.mark.slow  # a real run killed and rerun in subprocesses: seconds on 2 cores (--runslow)
def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(small_vit, tmp_path, caplog):
    schedule = ["--keep_rate_warmup", "2", "--keep_rate_shrink", "3", "--keep_rate_schedule_unit", "step"]
    uninterrupted = tmp_path / "uninterrupted"
    run_image_classification.main(resume_args(small_vit, uninterrupted, *schedule))

    interrupted = tmp_path / "interrupted"
    args = resume_args(small_vit, interrupted, *schedule)
    kill_after_first_checkpoint(args, interrupted, signal.SIGTERM)
    with caplog.at_level("INFO"):
        run_image_classification.main(args)  # the same command again
    assert "Resuming from" in caplog.text
    assert "missing keys" not in caplog.text.lower() and "unexpected keys" not in caplog.text.lower()

    final_state = json.loads((interrupted / "trainer_state.json").read_text())
    assert final_state["global_step"] == 8
    assert largest_difference(weights(interrupted), weights(uninterrupted)) <= 1e-6
    # Training moved the weights: equal runs are not equal because nothing happened.
    assert largest_difference(weights(uninterrupted), weights(interrupted / "checkpoint-2")) > 1e-3


def snapshot(folder) -> dict[str, bytes]:
    """Every file of a run's folder (checkpoints included) and its bytes."""
    return {
        os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
        for root, _, names in os.walk(folder)
        for name in names
    }


@pytest.fixture(scope="module")
def finished_run(small_vit, tmp_path_factory):
    """A finished run of 4 steps with evaluation, checkpoints every 2 steps."""
    output_dir = tmp_path_factory.mktemp("finished") / "run"
    args = resume_args(small_vit, output_dir, "--max_steps", "4", "--do_eval", "--max_eval_samples", "16")
    results = run_image_classification.main([*args, "--card_keep_rates", "1.0"])
    return output_dir, args, results


def test_rerunning_a_finished_command_changes_nothing(finished_run, caplog):
    output_dir, args, results = finished_run
    before = snapshot(output_dir)
    with caplog.at_level("WARNING"):
        rerun = run_image_classification.main([*args, "--card_keep_rates", "1.0"])
    assert "holds a finished run" in caplog.text and "--overwrite_output_dir" in caplog.text
    assert snapshot(output_dir) == before  # no step, no file written
    assert rerun == json.loads((output_dir / "all_results.json").read_text())
    assert rerun["eval_accuracy"] == results["eval_accuracy"]


def test_an_evaluation_only_run_leaves_a_trained_model_and_its_results_even_with_overwrite(finished_run, small_vit):
    output_dir, _, _ = finished_run
    before = snapshot(output_dir)
    # --overwrite_output_dir deletes an earlier run only to train a new one.
    run_image_classification.main(
        ["--model_name_or_path", small_vit, "--output_dir", str(output_dir), "--do_eval", "--max_eval_samples", "16",
         "--report_to", "none", "--card_keep_rates", "1.0", "0.5", "--overwrite_output_dir"]
    )  # fmt: skip
    after = snapshot(output_dir)
    written = json.loads(after.pop("eval_only_results.json"))
    listed = json.loads(after.pop(MANIFEST_FILE))["written"]
    before_listed = json.loads(before.pop(MANIFEST_FILE))["written"]
    assert after == before  # model, card, all_results.json and checkpoints untouched
    assert sorted(listed) == sorted([*before_listed, "eval_only_results.json"])  # listed as this project's
    assert written["model_name_or_path"] == small_vit
    assert 0 <= written["metrics"]["eval_accuracy"] <= 1
    assert [row["keep_rate"] for row in written["keep_rate_results"]] == [1.0, 0.7, 0.5]


@pytest.mark.slow  # a real run in a subprocess, or a fresh interpreter: seconds on 2 cores
def test_a_higher_max_steps_continues_to_the_weights_of_one_longer_run(small_vit, tmp_path):
    # A shorter --max_steps is an interruption too: constant learning rate, every token kept from the start.
    continued = tmp_path / "continued"
    run_image_classification.main(resume_args(small_vit, continued, "--max_steps", "4"))
    (continued / "checkpoint-6").mkdir()  # a checkpoint a killed run left half-written: no trainer_state.json
    shutil.copy(continued / "model.safetensors", continued / "checkpoint-6" / "model.safetensors")
    run_image_classification.main(resume_args(small_vit, continued, "--max_steps", "6"))
    longer = tmp_path / "longer"
    run_image_classification.main(resume_args(small_vit, longer, "--max_steps", "6"))
    assert json.loads((continued / "trainer_state.json").read_text())["global_step"] == 6
    assert largest_difference(weights(continued), weights(longer)) <= 1e-6
    assert largest_difference(weights(longer), weights(continued / "checkpoint-4")) > 1e-3


@pytest.mark.slow  # a real run in a subprocess, or a fresh interpreter: seconds on 2 cores
def test_overwrite_output_dir_starts_over(small_vit, tmp_path):
    output_dir = tmp_path / "run"
    run_image_classification.main(resume_args(small_vit, output_dir, "--max_steps", "4"))
    run_image_classification.main(resume_args(small_vit, output_dir, "--max_steps", "2", "--overwrite_output_dir"))
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 2
    assert not (output_dir / "checkpoint-4").exists()
    fresh = tmp_path / "fresh"
    run_image_classification.main(resume_args(small_vit, fresh, "--max_steps", "2"))
    assert largest_difference(weights(output_dir), weights(fresh)) <= 1e-6


def test_training_into_a_folder_that_holds_another_model_is_refused(small_vit, tmp_path):
    output_dir = tmp_path / "run"
    save_small_vit(output_dir)  # not written by a run: a user's files
    with pytest.raises(ValueError, match=r"holds files that no run of this project wrote there \(config.json, model"):
        run_image_classification.main(resume_args(small_vit, output_dir, "--max_steps", "2"))
    # The model of an evaluation-only run (listed as this project's), which no training there produced.
    (output_dir / MANIFEST_FILE).write_text(json.dumps({"written": os.listdir(output_dir), "claimed": []}))
    with pytest.raises(ValueError, match="already holds a model.*--overwrite_output_dir"):
        run_image_classification.main(resume_args(small_vit, output_dir, "--max_steps", "2"))


def test_load_best_model_at_end_loads_every_weight_of_the_best_checkpoint(small_vit, tmp_path, caplog):
    output_dir = tmp_path / "run"
    args = resume_args(
        small_vit, output_dir, "--max_steps", "4", "--do_eval", "--max_eval_samples", "32", "--eval_strategy",
        "steps", "--eval_steps", "2", "--load_best_model_at_end", "--metric_for_best_model", "eval_loss",
        "--greater_is_better", "false", "--card_keep_rates", "1.0",
    )  # fmt: skip
    with caplog.at_level("WARNING"):
        run_image_classification.main(args)
    assert "missing keys" not in caplog.text.lower() and "unexpected keys" not in caplog.text.lower()
    best = json.loads((output_dir / "trainer_state.json").read_text())["best_model_checkpoint"]
    assert os.path.basename(best) == "checkpoint-2"  # not the last one: loading it changes the weights
    assert largest_difference(weights(output_dir), weights(best)) == 0.0
    assert largest_difference(weights(output_dir), weights(output_dir / "checkpoint-4")) > 1e-3


class RandomDraws(torch.utils.data.Dataset):
    """Six samples; each is the first draw of its augmentation generator."""

    def __init__(self, randomness):
        self.randomness = randomness

    def __len__(self):
        return 6

    def __getitem__(self, index):
        return self.randomness.generator(index).random()


@pytest.mark.parametrize("num_workers", [0, 2], ids=["main-process", "persistent-workers"])
def test_augmentation_draws_depend_on_seed_epoch_and_index_only(num_workers):
    from evit_hf.data import AugmentationRandomness

    randomness = AugmentationRandomness(seed=3)
    # Persistent workers are started once: they must still see each new epoch.
    loader = torch.utils.data.DataLoader(
        RandomDraws(randomness), batch_size=2, num_workers=num_workers, persistent_workers=num_workers > 0,
        collate_fn=list,
    )  # fmt: skip

    def draws(epoch):
        randomness.set_epoch(epoch)
        return [value for batch in loader for value in batch]

    epoch_0, epoch_1 = draws(0), draws(1)
    assert len(set(epoch_0)) == 6 and set(epoch_0).isdisjoint(epoch_1)  # new draws each epoch
    assert draws(0) == epoch_0  # whatever was drawn in between
    assert [AugmentationRandomness(seed=3).generator(index).random() for index in range(6)] == epoch_0
    assert AugmentationRandomness(seed=4).generator(0).random() != epoch_0[0]


def copy_checkpoints(finished_output_dir, folder, names) -> None:
    """`folder` as a run killed after writing the checkpoints `names` of the finished run left it: with the names it
    claimed as this project's (see evit_hf.outputs)."""
    folder.mkdir()
    for name in names:
        shutil.copytree(finished_output_dir / name, folder / name)
    claims = {"written": [], "claimed": run_image_classification.OUTPUT_CLAIMS}
    (folder / MANIFEST_FILE).write_text(json.dumps(claims))


def test_a_run_killed_after_its_last_checkpoint_ends_with_that_checkpoint(finished_run, small_vit, tmp_path):
    output_dir, _, results = finished_run
    killed = tmp_path / "killed"
    copy_checkpoints(output_dir, killed, ["checkpoint-2", "checkpoint-4"])  # step 4 is inside the second epoch
    args = resume_args(small_vit, killed, "--max_steps", "4", "--do_eval", "--max_eval_samples", "16")
    rerun = run_image_classification.main([*args, "--card_keep_rates", "1.0"])
    final_state = json.loads((killed / "trainer_state.json").read_text())
    assert final_state["global_step"] == 4  # no step past the end
    checkpoint_state = json.loads((killed / "checkpoint-4" / "trainer_state.json").read_text())
    assert final_state["log_history"] == checkpoint_state["log_history"]
    assert largest_difference(weights(killed), weights(killed / "checkpoint-4")) == 0.0
    assert largest_difference(weights(killed), weights(output_dir)) == 0.0
    written = json.loads((killed / "all_results.json").read_text())
    assert written["eval_accuracy"] == rerun["eval_accuracy"] == results["eval_accuracy"]
    assert (killed / "README.md").exists() and (killed / "keep_rate_results.json").exists()


def test_continuing_a_run_with_other_evit_settings_is_refused(finished_run, small_vit, tmp_path):
    output_dir, finished_args, _ = finished_run
    killed = tmp_path / "killed"
    copy_checkpoints(output_dir, killed, ["checkpoint-2"])
    other_settings = ["--keep_rate", "0.5", "--reduction_layers", "2", "--no_fuse_inattentive_tokens",
                      "--keep_rate_shrink", "3", "--keep_rate_schedule_unit", "step"]  # fmt: skip
    with pytest.raises(ValueError) as error:
        run_image_classification.main(resume_args(small_vit, killed, "--max_steps", "4", *other_settings))
    message = str(error.value)
    assert message.startswith(f"The checkpoint {killed / 'checkpoint-2'} was trained with other EViT settings")
    for difference in (
        "keep_rate 0.7 there, 0.5 here",
        "reduction_layers [1, 2, 3] there, [2] here",
        "fuse_inattentive_tokens True there, False here",
        "keep_rate_shrink 0.0 there, 3.0 here",
        "keep_rate_schedule_unit None there, 'step' here",
    ):
        assert difference in message
    assert "--overwrite_output_dir" in message
    assert not (killed / "model.safetensors").exists()  # nothing trained

    # A checkpoint of an earlier version, without recorded settings: its config.json tells the model's settings.
    state_file = killed / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["stateful_callbacks"]["EViTRunSettings"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"reduction_layers \[1, 2, 3\] there, \[2\] here"):
        run_image_classification.main(resume_args(small_vit, killed, "--max_steps", "4", "--reduction_layers", "2"))
    run_image_classification.main(resume_args(small_vit, killed, "--max_steps", "4"))  # its own settings: resumes
    assert largest_difference(weights(killed), weights(output_dir)) <= 1e-6

    # A finished run is not taken for one of other settings either.
    with pytest.raises(ValueError, match=f"The finished run in {output_dir} .*keep_rate 0.7 there, 0.5 here"):
        run_image_classification.main([*finished_args, "--keep_rate", "0.5"])


@pytest.mark.slow  # two real runs: seconds on 2 cores
def test_overwrite_output_dir_starts_over_with_other_settings(small_vit, tmp_path):
    output_dir = tmp_path / "run"
    run_image_classification.main(resume_args(small_vit, output_dir, "--max_steps", "2"))
    run_image_classification.main(
        resume_args(small_vit, output_dir, "--max_steps", "2", "--keep_rate", "0.5", "--overwrite_output_dir")
    )
    assert json.loads((output_dir / "config.json").read_text())["keep_rate"] == 0.5
    recorded = json.loads((output_dir / "trainer_state.json").read_text())["stateful_callbacks"]["EViTRunSettings"]
    assert recorded["args"]["settings"]["keep_rate"] == 0.5


def truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda checkpoint: truncate(checkpoint / "model.safetensors"), "its model.safetensors does not read"),
        (lambda checkpoint: truncate(checkpoint / "trainer_state.json"), "its trainer_state.json does not read"),
        (
            lambda checkpoint: (checkpoint / "trainer_state.json").write_text("[]"),
            "its trainer_state.json holds no global_step",
        ),
    ],
    ids=["truncated-weights", "truncated-state", "invalid-state"],
)
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(finished_run, small_vit, tmp_path, caplog, damage,
                                                               problem):  # fmt: skip
    output_dir, _, _ = finished_run
    killed = tmp_path / "killed"
    copy_checkpoints(output_dir, killed, ["checkpoint-2", "checkpoint-4"])
    damage(killed / "checkpoint-4")
    with caplog.at_level("INFO"):
        run_image_classification.main(resume_args(small_vit, killed, "--max_steps", "4"))
    assert f"Skipping {killed / 'checkpoint-4'}: {problem}" in caplog.text
    assert f"Resuming from {killed / 'checkpoint-2'}." in caplog.text
    assert json.loads((killed / "trainer_state.json").read_text())["global_step"] == 4
    assert largest_difference(weights(killed), weights(output_dir)) <= 1e-6


def fake_checkpoint(folder, step: int) -> None:
    folder.mkdir(parents=True)
    save_file({"weight": torch.zeros(2)}, folder / "model.safetensors")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def test_the_newest_readable_checkpoint_by_step_number_is_resumed(tmp_path):
    for step in (2, 9, 10):
        fake_checkpoint(tmp_path / f"checkpoint-{step}", step)
    (tmp_path / "checkpoint-11").mkdir()  # half-written
    assert checkpoints.last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")
    truncate(tmp_path / "checkpoint-10" / "model.safetensors")
    assert checkpoints.last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-9")


def test_a_checkpoint_of_several_processes_needs_the_random_state_of_each(tmp_path):
    for step in (2, 4):
        fake_checkpoint(tmp_path / f"checkpoint-{step}", step)
        torch.save({"cpu": torch.random.get_rng_state()}, tmp_path / f"checkpoint-{step}" / "rng_state_0.pth")
    torch.save({"cpu": torch.random.get_rng_state()}, tmp_path / "checkpoint-2" / "rng_state_1.pth")
    # Process 1 was killed before writing its random state into checkpoint-4, after the main process wrote the rest.
    assert checkpoints.last_complete_checkpoint(str(tmp_path), 2) == str(tmp_path / "checkpoint-2")
    (tmp_path / "checkpoint-4" / "rng_state_1.pth").write_bytes(b"PK\x03\x04")  # begun, not finished
    assert checkpoints.last_complete_checkpoint(str(tmp_path), 2) == str(tmp_path / "checkpoint-2")
    assert checkpoints.last_complete_checkpoint(str(tmp_path), 1) == str(tmp_path / "checkpoint-4")


class EpochRecorder(torch.utils.data.Dataset):
    """Four samples that record the epoch the augmentation randomness is at when each is fetched."""

    def __init__(self, randomness):
        self.randomness = randomness
        self.epochs = []

    def __len__(self):
        return 4

    def __getitem__(self, index):
        self.epochs.append(self.randomness.epoch)
        return {"inputs": torch.full((2,), float(index)), "labels": torch.tensor(1.0)}


class TinyRegression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, inputs, labels):
        return {"loss": (self.linear(inputs).squeeze(-1) - labels).square().mean()}


def test_augmentation_randomness_follows_the_epochs_of_a_real_trainer(tmp_path):
    from evit_hf.data import AugmentationRandomness

    randomness = AugmentationRandomness(seed=3)
    recorder = EpochRecorder(randomness)
    args = TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=3, per_device_train_batch_size=2, save_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=True,
    )  # fmt: skip
    Trainer(model=TinyRegression(), args=args, train_dataset=recorder, callbacks=[randomness]).train()
    assert recorder.epochs == [0] * 4 + [1] * 4 + [2] * 4
