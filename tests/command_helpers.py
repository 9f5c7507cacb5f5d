"""Running an `evit-hf` command in this process and checking that it refuses bad input before any work: the step
where each command's work begins (`WORK_STEPS`, which conftest's `no_work` fixture makes fail the test) and the one
line of a refusal (`refusal`)."""

import pytest

import evit_hf.benchmark_timing
import evit_hf.cli
import evit_hf.commands.calibrate
import evit_hf.conversion
from evit_hf.cli import main


# The step where each command's work begins, which no refusal may reach.
WORK_STEPS = {
    "convert": (evit_hf.conversion, "read_checkpoint"),
    "calibrate": (evit_hf.commands.calibrate, "read_image_argument"),
    "benchmark": (evit_hf.benchmark_timing, "build_models"),
}


def refusal(capsys, argv) -> str:
    """Runs the command in process; asserts exit status 2 and one error line; returns the line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert "Traceback" not in err and len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0]
