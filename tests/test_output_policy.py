"""The output policy (`evit_hf.outputs`): the lock for a run's life, outputs apart from inputs, only the project's
files overwritten or deleted; and the examples that follow it."""

import json
import os

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
    assert manifest == {"written": ["model.safetensors", "runs"], "claimed": ["model.safetensors"]}
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
