import gc
import os
import tempfile

import pytest
import torch


# Image-folder checks are cached in the datasets cache: the suite (and the runs it starts) writes its own, never the
# user's. Set before datasets is imported, which reads it once.
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="evit-hf-tests-datasets-cache-")

from .model_builders import TINY  # noqa: E402  (after the cache folder is set)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_finish(session):
    # Trainer.train() starts with a full garbage collection (accelerate's `free_memory`), which walks every object
    # the process holds: with torch, transformers and datasets imported, about half a second each time, 70 times in
    # the suite. The objects that exist once every test module is imported (the libraries') are moved out of the
    # collector's sight; the tests' own objects are collected as before.
    gc.freeze()


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: pass --runslow to run")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (bash scripts/gpu_check.sh runs these on a GPU machine)")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """A test that changes torch's thread count changes the numbers of every later test in the process: a different
    split of the work sums in another order. Each test starts with the thread count the process started with."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def pixel_values():
    return torch.randn(3, 3, TINY["image_size"], TINY["image_size"], generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def small_vit(tmp_path_factory):
    """A tiny ViT classifier of the bundled digits (10 labels, 32 px, patch 4, 4 layers: reduction layers 1, 2, 3),
    saved once per test file."""
    from .run_helpers import save_small_vit  # imported here: see no_work

    return save_small_vit(tmp_path_factory.mktemp("vit") / "model")


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test when an `evit-hf` command starts its work: reads the checkpoint, decodes an image or loads a
    model. (The tests of the examples stop their work with `example_modules.stop_example_work`.)"""
    # Imported here, not at the top: the suite's first imports stay model_builders' (transformers' auto classes, then
    # evit_hf), an order that decides whether `import evit_hf` leaves its registration hook waiting for a first
    # lookup; test_import_time's hook test depends on it.
    import evit_hf

    from .command_helpers import WORK_STEPS

    def refuse(*args, **kwargs):
        raise AssertionError("the command started its work before refusing")

    for module, name in WORK_STEPS.values():
        monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(evit_hf.EViTForImageClassification, "from_pretrained", refuse)
