import json
import math
import os
import shutil
import subprocess
import weakref
from types import SimpleNamespace

import pytest

import evit_hf

from .run_helpers import BIN, EXAMPLES, free_port, save_small_vit


SCRIPT = os.path.join(EXAMPLES, "run_image_classification.py")
TORCHRUN = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port"]


ACCELERATE_LAUNCH = [os.path.join(BIN, "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                     "--main_process_port"]  # fmt: skip
# Distillation from the unreduced starting model: the teacher runs in each process on its part of the batch.
DISTILLATION = ["--distillation_alpha", "0.5", "--distillation_temperature", "2", "--logging_steps", "2"]


@pytest.mark.slow  # a real run in a subprocess, or a fresh interpreter: seconds on 2 cores
@pytest.mark.parametrize(
    "launcher, extra",
    [
        # Each run costs three processes' start-up: the suite runs one, with the most in it (accelerate's launcher,
        # which starts torch's; distillation); the plain runs of either launcher are slow-marked.
        pytest.param(TORCHRUN, [], marks=pytest.mark.slow),
        # On a machine without GPUs, accelerate's processes train on CPU with gloo.
        pytest.param(ACCELERATE_LAUNCH, [], marks=pytest.mark.slow),
        (ACCELERATE_LAUNCH, DISTILLATION),
    ],
    ids=["torchrun", "accelerate-launch", "accelerate-launch-distilled"],
)
def test_two_processes_train_one_model(launcher, extra, tmp_path):
    if not os.path.exists(launcher[0]):
        pytest.skip(f"{launcher[0]} is not installed")
    launcher = [*launcher, free_port()]
    model = save_small_vit(tmp_path / "vit")
    output_dir = tmp_path / "out"
    command = [
        *launcher,
        SCRIPT,
        "--model_name_or_path", model,
        "--output_dir", str(output_dir),
        "--do_train",
        "--max_steps", "4",
        "--per_device_train_batch_size", "8",
        "--keep_rate", "0.7",
        "--keep_rate_shrink", "2",
        "--keep_rate_schedule_unit", "step",
        "--report_to", "none",
        "--save_strategy", "no",
        "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": f"{BIN}:{os.environ['PATH']}"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    train_results = json.loads((output_dir / "train_results.json").read_text())
    train_size = len(evit_hf.digits_dataset(seed=42)["train"])
    # one optimizer step consumes 8 images in each of the 2 processes (one process alone: 4 / ceil(size / 8))
    assert train_results["epoch"] == pytest.approx(4 / math.ceil(train_size / 16))
    if extra:  # both parts of the distillation loss, averaged over the processes, in the logs
        logged = [entry for entry in json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
                  if "loss_ce" in entry]  # fmt: skip
        assert [entry["step"] for entry in logged] == [2, 4]
        assert all(entry["loss_ce"] > 0 and entry["loss_distillation"] >= 0 for entry in logged)
    loaded = evit_hf.EViTForImageClassification.from_pretrained(output_dir)
    assert loaded.config.keep_rate == 0.7
    shutil.rmtree(output_dir)


def test_leaving_the_process_group_frees_the_wrapped_model_first(tmp_path, monkeypatch):
    """DistributedDataParallel's reducer holds the process group. Freed after `destroy_process_group`, it is the
    group's last holder and destroys it with the GIL held, which can hang against gloo's worker threads: the wrapped
    model has to be gone when the group is destroyed."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = torch.nn.Linear(2, 2)
        wrapped = DistributedDataParallel(model)
        wrapped_reference = weakref.ref(wrapped)
        accelerator = SimpleNamespace(prepared=[wrapped])  # as accelerate keeps the prepared model
        accelerator.free_memory = accelerator.prepared.clear
        trainer = SimpleNamespace(model=model, model_wrapped=wrapped, accelerator=accelerator)
        del wrapped
        destroy = torch.distributed.destroy_process_group
        wrapped_alive_at_destroy = []

        def recording_destroy(*args, **kwargs):
            wrapped_alive_at_destroy.append(wrapped_reference() is not None)
            destroy(*args, **kwargs)

        monkeypatch.setattr(torch.distributed, "destroy_process_group", recording_destroy)
        evit_hf.leave_process_group(trainer)
        assert wrapped_alive_at_destroy == [False]
        assert trainer.model_wrapped is model
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
