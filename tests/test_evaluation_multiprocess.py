import json
import os
import subprocess

import pytest

from .example_modules import evaluate_keep_rates
from .run_helpers import BIN, EXAMPLES, free_port, save_small_vit


SCRIPT = os.path.join(EXAMPLES, "evaluate_keep_rates.py")
TORCHRUN = os.path.join(BIN, "torchrun")


@pytest.mark.slow  # a real run in a subprocess, or a fresh interpreter: seconds on 2 cores
@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun is not installed")
def test_two_processes_count_every_sample_once(tmp_path):
    model = save_small_vit(tmp_path / "vit")
    # An odd count: one process gets one image more than the other, and no image is repeated to even them out.
    arguments = ["--model_name_or_path", model, "--keep_rates", "1.0", "0.5", "--max_eval_samples", "37",
                 "--batch_size", "8", "--num_workers", "0"]  # fmt: skip
    command = [TORCHRUN, "--nproc_per_node", "2", "--master_port", free_port(), SCRIPT, *arguments]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": f"{BIN}:{os.environ['PATH']}"}
    result = subprocess.run(
        [*command, "--output_dir", str(tmp_path / "two")], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("| keep rate |") == 1  # the table is printed by the main process only

    saved = json.loads((tmp_path / "two" / "keep_rates.json").read_text())
    assert saved["processes"] == 2
    one_process = evaluate_keep_rates.main([*arguments, "--output_dir", str(tmp_path / "one")])
    for row, expected in zip(saved["rows"], one_process, strict=True):
        assert row["samples"] == expected["samples"] == 37
        for key in ("keep_rate", "accuracy", "top5_accuracy", "macs"):
            assert row[key] == pytest.approx(expected[key]), key
