"""The helper modules of the suite do what the tests that use them rely on. Each helper here guards other tests (a
refusal is one line, no command starts its work, two runs end with the same weights); one that quietly accepted
everything would let those tests pass whatever the code does."""

import json
import socket
import sys

import pytest
import torch

import evit_hf

from . import command_helpers
from .command_helpers import WORK_STEPS, refusal
from .model_builders import TWO_LAYERS
from .run_helpers import checkpoint_written, free_port, largest_difference


def test_no_work_makes_every_work_step_and_model_loading_fail_the_test(no_work, tmp_path):
    for module, name in WORK_STEPS.values():
        with pytest.raises(AssertionError, match="started its work"):
            getattr(module, name)()
    with pytest.raises(AssertionError, match="started its work"):
        evit_hf.EViTForImageClassification.from_pretrained(tmp_path)


def exits(status: int, *error_lines: str):
    """A stand-in for `evit-hf`'s main that prints `error_lines` to stderr and exits with `status`."""

    def main(argv):
        for line in error_lines:
            print(line, file=sys.stderr)
        raise SystemExit(status)

    return main


def test_refusal_returns_the_one_error_line_of_exit_status_2(monkeypatch, capsys):
    monkeypatch.setattr(command_helpers, "main", exits(2, "usage: evit-hf", "evit-hf convert: error: no such file"))
    assert refusal(capsys, ["convert"]) == "evit-hf convert: error: no such file"


@pytest.mark.parametrize(
    "status, error_lines",
    [
        (1, ["evit-hf convert: error: no such file"]),
        (2, ["evit-hf convert: error: no such file", "evit-hf convert: error: and another"]),
        (2, ["Traceback (most recent call last):", "evit-hf convert: error: no such file"]),
        (2, ["evit-hf convert: error: no such file", "converting..."]),
        (2, []),
    ],
    ids=["exit-status-1", "two-error-lines", "a-traceback-before-the-line", "output-after-the-line", "no-error-line"],
)
def test_refusal_fails_the_test_of_any_other_ending(status, error_lines, monkeypatch, capsys):
    monkeypatch.setattr(command_helpers, "main", exits(status, *error_lines))
    with pytest.raises(AssertionError):
        refusal(capsys, ["convert"])


def test_largest_difference_is_the_largest_magnitude_over_all_tensors():
    first = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0, -3.0])}
    second = {"a": torch.tensor([1.5, 2.0]), "b": torch.tensor([0.0, 1.0])}  # b differs by -4 in its last entry
    assert largest_difference(first, second) == 4.0
    with pytest.raises(AssertionError):
        largest_difference(first, {"a": second["a"]})  # a tensor missing from one side is no match


def test_a_checkpoint_is_written_once_its_trainer_state_reads(tmp_path):
    checkpoint = tmp_path / "checkpoint-2"
    assert not checkpoint_written(checkpoint)  # no folder yet
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text("")  # opened by Trainer, nothing written yet
    assert not checkpoint_written(checkpoint)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    assert checkpoint_written(checkpoint)


def test_free_port_is_a_port_this_machine_can_listen_on():
    port = int(free_port())
    assert 0 < port < 65536
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))


def test_two_layers_reduce_tokens_in_both_layers():
    # The compiled benchmark test relies on it: both layers reorganize tokens, so both kinds of layer are compiled.
    assert evit_hf.EViTConfig(**TWO_LAYERS).reduction_layers == [0, 1]
