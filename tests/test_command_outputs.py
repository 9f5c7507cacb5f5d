"""The `evit-hf` commands that write follow the one output policy (`evit_hf.outputs`): a run holds the lock on its
output folder for its whole life, no output is, lies inside or contains an input, and only files that a run of this
project wrote are overwritten; a folder holding anything else is refused, naming the files. Every refusal is one
line, exit status 2, before any work."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import evit_hf
import evit_hf.benchmark_timing
import evit_hf.calibration
import evit_hf.cli
import evit_hf.conversion
from evit_hf.cli import main
from evit_hf.outputs import MANIFEST_FILE
from evit_hf.run_lock import LOCK_FILE, OutputDirInUse, OutputDirLock

from .command_helpers import refusal
from .conversion_helpers import HEADS, timm_state_dict
from .family_folders import tiny_image_processor
from .model_builders import tiny_stock_model


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest on a busy machine; restored after each test


@pytest.fixture
def work(tmp_path):
    """A tiny EViT classifier folder with its image processor, a folder of images, a timm checkpoint and its class
    names, as a user has them."""
    evit_hf.apply_evit(tiny_stock_model("vit-classifier")).save_pretrained(tmp_path / "model")
    tiny_image_processor().save_pretrained(tmp_path / "model")
    generator = np.random.default_rng(0)
    for index in range(6):
        folder = tmp_path / "images" / "ab"[index % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(generator.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    torch.save(timm_state_dict(), tmp_path / "checkpoint.pth")
    (tmp_path / "labels.json").write_text(json.dumps(["a", "b", "c", "d", "e"]))
    return tmp_path


def calibrate_budget(work) -> str:
    return str(evit_hf.count_macs(evit_hf.EViTConfig.from_pretrained(work / "model"), keep_rate=0.6))


# The commands that write a folder of their own: their command line for an output folder, and what they write.
FOLDER_COMMANDS = {
    "convert": lambda work, output: [
        "convert", str(work / "checkpoint.pth"), str(output), "--num-attention-heads", str(HEADS),
        "--id2label", str(work / "labels.json"),
    ],
    "calibrate": lambda work, output: [
        "calibrate", "--model", str(work / "model"), "--images", str(work / "images"), "--macs",
        calibrate_budget(work), "--output-dir", str(output), "--search-images", "4",
    ],
}  # fmt: skip


def contents(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


FOREIGN_FILES = {
    "readme": {"README.md": b"# my notes\n"},
    "config-without-weights": {"config.json": b'{"model_type": "vit"}'},
}


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("foreign", FOREIGN_FILES.values(), ids=FOREIGN_FILES.keys())
@pytest.mark.parametrize("command", FOLDER_COMMANDS, ids=FOLDER_COMMANDS)
def test_a_folder_holding_other_files_is_refused_naming_them(command, foreign, overwrite, work, capsys, no_work):
    output = work / "out"
    output.mkdir()
    for name, content in foreign.items():
        (output / name).write_bytes(content)
    before = contents(output)
    line = refusal(capsys, FOLDER_COMMANDS[command](work, output) + (["--overwrite"] if overwrite else []))
    assert f"{output} holds files that no run of this project wrote there ({', '.join(sorted(foreign))})" in line
    assert contents(output) == before  # nothing written, nothing deleted, no lock left behind


def _safetensors_checkpoint_in_output(work):
    (work / "X").mkdir()
    save_file(timm_state_dict(), work / "X" / "model.safetensors")
    return work / "X" / "model.safetensors", work / "X"


# (command line, the input, the output, their relation) for outputs that are, lie inside or contain an input.
OVERLAPS = {
    "visualize-output-is-the-image": lambda work: (
        ["visualize", "--model", str(work / "model"), "--image", str(work / "images/a/0.png"), "--output",
         str(work / "images/a/0.png")],
        ("--image", work / "images/a/0.png"), ("--output", work / "images/a/0.png"), "is",
    ),
    "convert-into-the-checkpoints-folder": lambda work: (
        ["convert", str(work / "X/model.safetensors"), str(work / "X"), "--num-attention-heads", str(HEADS)],
        ("checkpoint", work / "X/model.safetensors"), ("output_dir", work / "X"), "contains",
    ),
    "convert-into-the-checkpoints-folder-with-overwrite": lambda work: (
        ["convert", str(work / "X/model.safetensors"), str(work / "X"), "--num-attention-heads", str(HEADS),
         "--overwrite"],
        ("checkpoint", work / "X/model.safetensors"), ("output_dir", work / "X"), "contains",
    ),
    "calibrate-into-the-model": lambda work: (
        FOLDER_COMMANDS["calibrate"](work, work / "model"), ("--model", work / "model"),
        ("--output-dir", work / "model"), "is",
    ),
    "calibrate-into-the-images": lambda work: (
        FOLDER_COMMANDS["calibrate"](work, work / "images/out"), ("--images", work / "images"),
        ("--output-dir", work / "images/out"), "lies inside",
    ),
    "benchmark-into-the-model": lambda work: (
        benchmark_argv(work, work / "model" / "results"), ("--model", work / "model"),
        ("--output-dir", work / "model" / "results"), "lies inside",
    ),
    "calibrate-around-the-images": lambda work: (
        FOLDER_COMMANDS["calibrate"](work, work), ("--model", work / "model"), ("--output-dir", work), "contains",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", OVERLAPS.values(), ids=OVERLAPS.keys())
def test_an_output_that_is_in_or_around_an_input_is_refused_naming_both(case, work, capsys, no_work):
    _safetensors_checkpoint_in_output(work)
    argv, (input_flag, input_path), (output_flag, output_path), relation = case(work)
    before = {path: path.read_bytes() for path in work.rglob("*") if path.is_file()}
    line = refusal(capsys, argv)
    assert f"{output_flag} {output_path} {relation} {input_flag} {input_path}" in line, line
    assert {path: path.read_bytes() for path in work.rglob("*") if path.is_file()} == before


def benchmark_argv(work, output):
    return ["benchmark", "--model", str(work / "model"), "--image-sizes", "32", "--batch-sizes", "1", "--rounds", "1",
            "--warmup", "0", "--no-memory", "--no-progress", "--output-dir", str(output)]  # fmt: skip


COMMANDS_WITH_OUTPUT_FOLDERS = {
    **{command: (argv, lambda work: work / "out") for command, argv in FOLDER_COMMANDS.items()},
    "benchmark": (benchmark_argv, lambda work: work / "results"),
    "visualize": (
        lambda work, output: ["visualize", "--model", str(work / "model"), "--image", str(work / "images/a/0.png"),
                              "--output", str(output / "kept.png")],
        lambda work: work / "pictures",
    ),
}  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS_WITH_OUTPUT_FOLDERS, ids=COMMANDS_WITH_OUTPUT_FOLDERS)
def test_an_output_folder_another_run_holds_is_refused_at_once(command, work, capsys, no_work, monkeypatch):
    if command == "visualize":  # its model is loaded by the family's picture model: refuse that too
        monkeypatch.setattr(evit_hf.EViTForImageClassification, "from_pretrained", no_work_at_all)
    make_argv, folder = COMMANDS_WITH_OUTPUT_FOLDERS[command]
    with OutputDirLock(str(folder(work))):
        line = refusal(capsys, make_argv(work, folder(work)))
    assert f"{folder(work)} is in use by another run (pid {os.getpid()}" in line


def no_work_at_all(*args, **kwargs):
    raise AssertionError("the command started its work before refusing")


def _holds_the_lock_while_working(monkeypatch, module, name, output, seen):
    """Wraps `module.name` (the command's work) so that it checks, while it runs, that the output folder is locked."""
    work_step = getattr(module, name)

    def working(*args, **kwargs):
        with pytest.raises(OutputDirInUse):
            OutputDirLock(str(output)).acquire()
        seen.append(name)
        return work_step(*args, **kwargs)

    monkeypatch.setattr(module, name, working)


# The function each command works in, called once its output folder is held.
HELD_WORK = {
    "convert": (evit_hf.conversion, "convert_timm_checkpoint"),
    "calibrate": (evit_hf.calibration, "calibrate_schedule"),
}


@pytest.mark.parametrize("command", FOLDER_COMMANDS, ids=FOLDER_COMMANDS)
def test_the_lock_is_held_while_working_and_an_earlier_runs_files_are_replaced_only_with_overwrite(
    command, work, capsys, monkeypatch
):
    output = work / "out"
    seen = []
    _holds_the_lock_while_working(monkeypatch, *HELD_WORK[command], output, seen)
    main(FOLDER_COMMANDS[command](work, output))
    assert seen == [HELD_WORK[command][1]]
    written = contents(output)
    assert LOCK_FILE not in written and "model.safetensors" in written
    manifest = json.loads(written[MANIFEST_FILE])
    assert set(manifest["written"]) == set(written) - {MANIFEST_FILE}
    capsys.readouterr()

    line = refusal(capsys, FOLDER_COMMANDS[command](work, output))
    assert f"{output} holds the files of an earlier run (" in line and "pass --overwrite to replace them" in line
    assert contents(output) == written

    main(FOLDER_COMMANDS[command](work, output) + ["--overwrite"])
    assert set(contents(output)) == set(written)


@pytest.mark.usefixtures("no_work")
def test_the_benchmark_writes_over_none_of_the_users_files(work, capsys):
    (work / "results").mkdir()
    (work / "results" / "benchmark.md").write_text("my notes")
    (work / "results" / "other.txt").write_text("left alone: the benchmark writes three named files")
    line = refusal(capsys, benchmark_argv(work, work / "results"))
    assert f"{work / 'results'} would overwrite files that no run of this project wrote there (benchmark.md)" in line
    assert (work / "results" / "benchmark.md").read_text() == "my notes"


def test_visualize_draws_again_over_its_own_picture_but_not_over_someone_elses(work, capsys):
    pictures = work / "pictures"
    argv = COMMANDS_WITH_OUTPUT_FOLDERS["visualize"][0](work, pictures)
    main(argv)
    main(argv)  # its own earlier picture: drawn again
    assert (pictures / "kept.png").exists() and not (pictures / LOCK_FILE).exists()
    (pictures / "holiday.png").write_bytes(b"someone's picture")
    line = refusal(capsys, [*argv[:-1], str(pictures / "holiday.png")])
    assert f"--output {pictures} would overwrite files that no run of this project wrote there (holiday.png)" in line
    assert (pictures / "holiday.png").read_bytes() == b"someone's picture"


def console(*argv) -> subprocess.CompletedProcess:
    script = os.path.join(os.path.dirname(sys.executable), "evit-hf")
    return subprocess.run([script, *map(str, argv)], capture_output=True, text=True, timeout=300)


def test_the_console_command_refuses_to_draw_over_its_image(work):
    image = work / "images/a/0.png"
    before = image.read_bytes()
    result = console("visualize", "--model", work / "model", "--image", image, "--output", image)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"evit-hf visualize: error: --output {image} is --image {image}: a run never writes where its inputs are"
        )
    )
    assert image.read_bytes() == before


def test_the_console_command_refuses_to_convert_into_the_checkpoints_folder(work):
    checkpoint, folder = _safetensors_checkpoint_in_output(work)
    before = checkpoint.read_bytes()
    result = console("convert", checkpoint, folder, "--overwrite", "--num-attention-heads", HEADS)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: output_dir {folder} contains checkpoint {checkpoint}" in result.stderr.strip().splitlines()[-1]
    assert os.listdir(folder) == ["model.safetensors"] and checkpoint.read_bytes() == before


def test_the_console_command_refuses_to_calibrate_into_a_folder_of_the_users(work):
    (work / "out").mkdir()
    (work / "out" / "README.md").write_text("my notes")
    result = console(*FOLDER_COMMANDS["calibrate"](work, work / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "holds files that no run of this project wrote there (README.md)" in result.stderr.strip().splitlines()[-1]
    assert os.listdir(work / "out") == ["README.md"]


def test_the_conversion_library_refuses_to_write_over_its_checkpoint(work):
    checkpoint, folder = _safetensors_checkpoint_in_output(work)
    with pytest.raises(evit_hf.conversion.CheckpointConversionError, match="output_dir .* contains checkpoint"):
        evit_hf.convert_timm_checkpoint(checkpoint, folder, num_attention_heads=HEADS, overwrite=True)
    assert os.listdir(folder) == ["model.safetensors"]
