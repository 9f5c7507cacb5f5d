"""The output policy (`evit_hf.outputs`): the lock for a run's life, outputs apart from inputs, only the project's
files overwritten or deleted; and the examples that follow it."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from evit_hf.outputs import (
    MANIFEST_FILE,
    ForeignFilesError,
    OutputDirInUse,
    OutputFolder,
    OutputOverlapsInput,
    check_outputs_apart_from_inputs,
)
from evit_hf.run_lock import LOCK_FILE

from .example_modules import evaluate_keep_rates, example_refusal, run_image_classification, stop_example_work
from .run_helpers import EXAMPLES, training_args


# ---- outputs apart from inputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "input_", "relation"),
    [("data", "data", "is"), ("data/out", "data", "lies inside"), ("out", "out/train", "contains")],
)
def test_an_output_overlapping_an_input_is_refused_naming_both(tmp_path, output, input_, relation):
    (tmp_path / input_).mkdir(parents=True)
    output_path, input_path = str(tmp_path / output), str(tmp_path / input_)
    with pytest.raises(OutputOverlapsInput) as error:
        check_outputs_apart_from_inputs([("--output_dir", output_path)], [("--train_dir", input_path)])
    message = str(error.value)
    assert "\n" not in message
    assert f"--output_dir {output_path} {relation} --train_dir {input_path}" in message


def test_overlap_compares_real_paths(tmp_path):
    (tmp_path / "model").mkdir()
    os.symlink(tmp_path / "model", tmp_path / "link")
    with pytest.raises(OutputOverlapsInput, match="is --model_name_or_path"):
        check_outputs_apart_from_inputs(
            [("--output_dir", str(tmp_path / "link"))], [("--model_name_or_path", str(tmp_path / "model"))]
        )


def test_a_hub_id_and_a_sibling_folder_are_not_overlapping_inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data-out").mkdir()  # shares a prefix, not a folder
    check_outputs_apart_from_inputs(
        [("--output_dir", "data-out"), ("--output_dir", "facebook")],
        [("--model_name_or_path", "facebook/deit-tiny-patch16-224"), ("--train_dir", "data"), ("--x", None)],
    )


# ---- the lock and the manifest ------------------------------------------------------------------------------------


def test_a_second_run_into_a_held_folder_is_refused_at_once(tmp_path):
    with OutputFolder(str(tmp_path / "out")):
        with pytest.raises(OutputDirInUse, match="in use by another run"):
            OutputFolder(str(tmp_path / "out")).acquire()


@pytest.mark.parametrize("foreign", ["README.md", "config.json", "notes"])
def test_a_folder_with_a_users_files_is_refused_naming_them(tmp_path, foreign):
    out = tmp_path / "out"
    out.mkdir()
    (out / foreign).mkdir() if foreign == "notes" else (out / foreign).write_text("mine")
    with pytest.raises(ForeignFilesError) as error:
        OutputFolder(str(out), claims=["README.md", "config.json"]).acquire()
    assert foreign in str(error.value) and "\n" not in str(error.value)
    assert (out / foreign).exists()
    assert sorted(os.listdir(out)) == [foreign]  # neither lock nor manifest left behind


def test_an_empty_folder_and_the_policys_own_files_are_accepted(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text("")  # left by a killed run
    with OutputFolder(str(out)) as folder:
        assert folder.held


def test_what_a_run_writes_is_recorded_and_a_rerun_is_accepted(tmp_path):
    out = tmp_path / "out"
    with OutputFolder(str(out), claims=["model.safetensors"]):
        (out / "model.safetensors").write_text("weights")
        (out / "runs").mkdir()  # not claimed: appeared during the run
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest == {
        "written": ["model.safetensors", "runs"],
        "claimed": ["model.safetensors"],
        "files": {"runs": []},  # what the run left inside each folder it wrote
    }
    assert not (out / LOCK_FILE).exists()
    with OutputFolder(str(out)) as folder:
        assert folder.foreign_files() == []


def test_a_killed_runs_claims_make_its_rerun_accepted(tmp_path):
    out = tmp_path / "out"
    folder = OutputFolder(str(out), claims=["checkpoint-[0-9]*"]).acquire()
    (out / "checkpoint-5").mkdir()
    folder._lock.release()  # killed: the system drops the lock, release() never runs
    with OutputFolder(str(out)) as rerun:
        assert rerun.foreign_files() == []
    (out / "checkpoint-x").mkdir()  # not a checkpoint name: the user's
    with pytest.raises(ForeignFilesError, match="checkpoint-x"):
        OutputFolder(str(out)).acquire()


def test_clear_deletes_only_what_runs_wrote(tmp_path):
    out = tmp_path / "out"
    with OutputFolder(str(out), claims=["model.safetensors", "checkpoint-[0-9]*"]):
        (out / "model.safetensors").write_text("weights")
        (out / "checkpoint-2").mkdir()
    with OutputFolder(str(out)) as folder:
        deleted = folder.clear()
        assert sorted(os.path.basename(path) for path in deleted) == ["checkpoint-2", "model.safetensors"]
        assert folder.entries() == []


def test_clear_leaves_a_file_that_appeared_during_the_run(tmp_path):
    out = tmp_path / "out"
    with OutputFolder(str(out), claims=["model.safetensors"]):
        (out / "model.safetensors").write_text("weights")
    with OutputFolder(str(out)) as folder:
        (out / "notes.txt").write_text("written by hand while the run held the folder")
        assert [os.path.basename(path) for path in folder.clear()] == ["model.safetensors"]
    assert os.listdir(out) != [] and (out / "notes.txt").read_text().startswith("written by hand")


def test_a_shared_folder_refuses_only_overwriting_a_users_file(tmp_path):
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    (pictures / "cat.jpg").write_text("image")
    with OutputFolder(str(pictures), "--output", claims=["kept.png"], shared=True):
        (pictures / "kept.png").write_text("picture")
    assert json.loads((pictures / MANIFEST_FILE).read_text())["written"] == ["kept.png"]
    with OutputFolder(str(pictures), "--output", claims=["kept.png"], shared=True):
        pass  # its own earlier output
    with pytest.raises(ForeignFilesError, match="would overwrite files .*cat.jpg"):
        OutputFolder(str(pictures), "--output", claims=["cat.jpg"], shared=True).acquire()


def test_a_run_that_wrote_nothing_leaves_no_folder(tmp_path):
    with OutputFolder(str(tmp_path / "out"), claims=["model.safetensors"]):
        pass
    assert not (tmp_path / "out").exists()


def test_a_damaged_manifest_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="does not read"):
        OutputFolder(str(out)).acquire()


# ---- the examples follow the policy ---------------------------------------------------------------------------------


@pytest.fixture
def no_work(monkeypatch):
    stop_example_work(monkeypatch, configuration=True)


def evaluation_args(model, output_dir, *extra):
    return ["--model_name_or_path", str(model), "--output_dir", str(output_dir), "--num_workers", "0", *extra]


# Each tool's command line for a model, an output folder and more flags.
TOOLS = {
    "training": (run_image_classification.main, training_args),
    "evaluation-only": (
        run_image_classification.main,
        lambda model, out, *extra: [
            "--model_name_or_path",
            str(model),
            "--output_dir",
            str(out),
            "--do_eval",
            "--report_to",
            "none",
            "--max_eval_samples",
            "16",
            *extra,
        ],
    ),  # fmt: skip
    "keep-rate table": (evaluate_keep_rates.main, evaluation_args),
}


@pytest.mark.parametrize("tool", TOOLS)
def test_a_data_folder_inside_the_output_folder_is_refused_naming_both(small_vit, tmp_path, no_work, tool):
    main, arguments = TOOLS[tool]
    output_dir = tmp_path / "out"
    (output_dir / "data" / "a").mkdir(parents=True)
    flag = "--train_dir" if tool == "training" else "--validation_dir"
    overwrite = ["--overwrite_output_dir"] if tool == "training" else []
    message = example_refusal(main, arguments(small_vit, output_dir, flag, str(output_dir / "data"), *overwrite))
    assert f"--output_dir {output_dir} contains {flag} {output_dir / 'data'}" in message
    assert sorted(os.listdir(output_dir)) == ["data"]


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("users_file", ["README.md", "config.json"])
def test_a_folder_of_a_users_files_is_refused_naming_them(small_vit, tmp_path, no_work, tool, users_file):
    main, arguments = TOOLS[tool]
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / users_file).write_text("{}" if users_file == "config.json" else "# my notes")
    message = example_refusal(main, arguments(small_vit, output_dir))
    assert f"--output_dir {output_dir} holds files that no run of this project wrote there ({users_file})" in message
    assert sorted(os.listdir(output_dir)) == [users_file]  # untouched; no lock or list left


@pytest.mark.parametrize(
    ("tool", "flags", "expected"),
    [
        ("training", ["--card_keep_rates", "0", "1.5"], "--card_keep_rates: keep_rate must be in (0, 1]"),
        ("training", ["--card_keep_rates", "0", "1"], "got 0."),
        ("training", ["--keep_rate", "1.5"], "--keep_rate: keep_rate must be in (0, 1]"),
        ("training", ["--keep_rate", "0.9", "0.7", "--reduction_layers", "1", "2", "3"], "it has 2"),
        ("keep-rate table", ["--keep_rates", "0"], "--keep_rates: keep_rate must be in (0, 1]"),
        ("keep-rate table", ["--keep_rates", "1.5"], "--keep_rates: keep_rate must be in (0, 1]"),
        ("keep-rate table", ["--keep_rates", "nan"], "--keep_rates: keep_rate must be a number in (0, 1]"),
        ("keep-rate table", ["--keep_rates", "0.9/x"], "--keep_rates: '0.9/x' is not a keep rate"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else None,
)
def test_keep_rates_are_checked_before_any_model_loads(small_vit, tmp_path, no_work, tool, flags, expected):
    main, arguments = TOOLS[tool]
    message = example_refusal(main, arguments(small_vit, tmp_path / "out", *flags))
    assert expected in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("script", "flags"),
    [
        pytest.param(
            "run_image_classification.py", ["--do_train", "--card_keep_rates", "0", "1.5"], marks=pytest.mark.slow
        ),
        pytest.param("evaluate_keep_rates.py", ["--keep_rates", "nan"], marks=pytest.mark.slow),
    ],
)
def test_a_refusal_on_the_command_line_is_one_line_with_status_2(small_vit, tmp_path, script, flags):
    command = [sys.executable, os.path.join(EXAMPLES, script), "--model_name_or_path", small_vit,
               "--output_dir", str(tmp_path / "out"), *flags]  # fmt: skip
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 2
    lines = finished.stderr.strip().splitlines()
    assert lines == [f"{script}: error: {lines[0].split(': error: ', 1)[1]}"] and "keep_rate" in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_folders_own_schedule_is_the_default_when_fine_tuning_it(small_vit, tmp_path):
    evit_folder = save_small_evit(small_vit, tmp_path / "calibrated", reduction_layers=[1, 2], keep_rate=[0.9, 0.6])
    output_dir = tmp_path / "out"
    run_image_classification.main(training_args(evit_folder, output_dir, "--max_steps", "1"))
    saved = json.loads((output_dir / "config.json").read_text())
    assert (saved["reduction_layers"], saved["keep_rate"]) == ([1, 2], [0.9, 0.6])
    # Every entry the run wrote is listed as the project's; a rerun into the folder is accepted.
    manifest = json.loads((output_dir / MANIFEST_FILE).read_text())
    assert set(manifest["written"]) == set(os.listdir(output_dir)) - {MANIFEST_FILE}
    (output_dir / "notes.txt").write_text("mine")
    message = example_refusal(
        run_image_classification.main, training_args(evit_folder, output_dir, "--max_steps", "1")
    )
    assert "(notes.txt)" in message


def save_small_evit(stock_folder, folder, reduction_layers, keep_rate) -> str:
    import evit_hf

    model = evit_hf.EViTForImageClassification.from_pretrained(
        stock_folder, reduction_layers=reduction_layers, keep_rate=keep_rate
    )
    model.save_pretrained(folder)
    from transformers import ViTImageProcessor

    ViTImageProcessor.from_pretrained(stock_folder).save_pretrained(folder)
    return str(folder)


def test_the_keep_rate_table_has_per_layer_rows_and_the_folders_own_schedule(small_vit, tmp_path):
    evit_folder = save_small_evit(small_vit, tmp_path / "calibrated", reduction_layers=[1, 2], keep_rate=[0.9, 0.6])
    rows = evaluate_keep_rates.main(
        evaluation_args(evit_folder, tmp_path / "table", "--keep_rates", "1.0", "0.8/0.5", "--max_eval_samples", "8")
    )
    assert [(row["keep_rate"], row.get("own_schedule", False)) for row in rows] == [
        (1.0, False),
        ([0.8, 0.5], False),
        ([0.9, 0.6], True),
    ]
    assert rows[0]["macs"] > rows[2]["macs"] > rows[1]["macs"]
    table = (tmp_path / "table" / "keep_rates.md").read_text()
    assert "| 0.9 / 0.6 (the model's own) |" in table and "| 0.8 / 0.5 |" in table
    message = example_refusal(
        evaluate_keep_rates.main, evaluation_args(evit_folder, tmp_path / "t2", "--keep_rates", "0.9/0.8/0.7")
    )
    assert "--keep_rates 0.9/0.8/0.7" in message and "it has 3" in message


@pytest.mark.slow
def test_resuming_a_distillation_with_another_teacher_is_refused_naming_both(small_vit, tmp_path):
    output_dir = tmp_path / "out"
    distill = ["--distillation_alpha", "0.5", "--save_strategy", "steps", "--save_steps", "1", "--do_eval", "false"]
    run_image_classification.main(training_args(small_vit, output_dir, *distill, "--max_steps", "1"))
    other_teacher = shutil.copytree(small_vit, tmp_path / "other-teacher")
    message = example_refusal(
        run_image_classification.main, training_args(other_teacher, output_dir, *distill, "--max_steps", "2")
    )
    assert f"distillation_teacher {os.path.realpath(small_vit)!r} there, {str(other_teacher)!r} here" in message


@pytest.mark.parametrize(
    "builder", ["vit-classifier", "deit-teacher", "clip-classifier", "dinov2-classifier", "dinov3"]
)
def test_per_layer_keep_rates_reach_the_configuration_as_written(builder):
    import copy

    from evit_hf.configuration_evit_base import keep_rates_by_layer, vision_config_of
    from evit_hf.fine_tuning import apply_evit_settings

    from .model_builders import cached_stock_and_evit

    config = copy.deepcopy(cached_stock_and_evit(builder)[1].config)  # 4 layers
    apply_evit_settings(config, [0.9, 0.7, 0.5], [3, 1, 2])
    settings = vision_config_of(config)
    assert keep_rates_by_layer(settings.keep_rate, settings.reduction_layers) == {3: 0.9, 1: 0.7, 2: 0.5}
    # A later call replaces the whole schedule, whatever the earlier per-layer list was.
    apply_evit_settings(config, [0.6, 0.4], [2, 0])
    assert keep_rates_by_layer(settings.keep_rate, settings.reduction_layers) == {2: 0.6, 0: 0.4}


def test_the_examples_are_thin_scripts_on_the_package():
    import ast

    with open(os.path.join(EXAMPLES, "run_image_classification.py")) as handle:
        assert len(handle.read().splitlines()) <= 600
    with open(os.path.join(EXAMPLES, "evaluate_keep_rates.py")) as handle:
        tree = ast.parse(handle.read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "run_image_classification" not in imported
    import evit_hf
    from evit_hf.fine_tuning import leave_process_group

    assert evit_hf.leave_process_group is leave_process_group and leave_process_group.__doc__


def test_a_file_put_inside_a_folder_an_earlier_run_wrote_is_refused_not_deleted(tmp_path):
    output_dir = str(tmp_path / "out")
    with OutputFolder(output_dir, claims=["checkpoint-[0-9]*"]):
        os.makedirs(os.path.join(output_dir, "checkpoint-2", "nested"))
        for name in ("model.safetensors", "nested/optimizer.pt"):
            with open(os.path.join(output_dir, "checkpoint-2", name), "w") as handle:
                handle.write("weights")
    notes = os.path.join(output_dir, "checkpoint-2", "nested", "mine.txt")
    with open(notes, "w") as handle:
        handle.write("a user's notes")
    with pytest.raises(ForeignFilesError, match=r"\(checkpoint-2/nested/mine\.txt\)"):
        OutputFolder(output_dir, claims=["checkpoint-[0-9]*"]).acquire()
    assert os.path.exists(notes)
    os.remove(notes)
    # Without the user's file, --overwrite_output_dir's clear deletes the run's folder as before.
    with OutputFolder(output_dir, claims=["checkpoint-[0-9]*"]) as folder:
        assert folder.clear() == [os.path.join(output_dir, "checkpoint-2")]
    assert not os.path.exists(os.path.join(output_dir, "checkpoint-2"))
