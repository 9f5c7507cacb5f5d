"""A light start: `import evit_hf` loads neither torch nor transformers, the public names load on first use, and the
Auto classes know the EViT classes before anything needs them."""

import ast
import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import evit_hf


INIT_FILE = Path(evit_hf.__file__)
REPOSITORY = INIT_FILE.parent.parent
# Imported only by what uses them: never by `import evit_hf`, nor by the models.
HEAVY_MODULES = ("datasets", "evaluate", "matplotlib", "torch.utils.tensorboard")


def run_python(code: str, *args: str) -> dict:
    """Runs `code` in a fresh interpreter with this checkout first on the path; returns the JSON it prints last."""
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        cwd=REPOSITORY,
        env={**os.environ, "PYTHONPATH": str(REPOSITORY), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


def type_checking_imports() -> dict[str, str]:
    """Name -> submodule, from the `if TYPE_CHECKING:` block of evit_hf/__init__.py."""
    tree = ast.parse(INIT_FILE.read_text())
    blocks = [
        node for node in tree.body if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
    ]
    assert len(blocks) == 1
    imported = {}
    for statement in blocks[0].body:
        assert isinstance(statement, ast.ImportFrom) and statement.level == 1, ast.dump(statement)
        for alias in statement.names:
            assert alias.asname is None
            imported[alias.name] = statement.module
    return imported


def test_lazy_table_type_checking_block_and_all_name_the_same_things():
    table = {name: module for module, names in evit_hf._NAMES_BY_MODULE.items() for name in names}
    assert type_checking_imports() == table
    assert evit_hf.__all__ == sorted(evit_hf.__all__)
    assert set(evit_hf.__all__) == set(table) | {"__version__"}
    assert set(evit_hf.__all__) <= set(dir(evit_hf))


def test_every_public_name_resolves_to_its_submodules_object():
    for module, names in evit_hf._NAMES_BY_MODULE.items():
        for name in names:
            assert getattr(evit_hf, name) is getattr(importlib.import_module(f"evit_hf.{module}"), name), name
    with pytest.raises(AttributeError, match="has no attribute 'EViTForSegmentation'"):
        evit_hf.EViTForSegmentation  # noqa: B018


def test_cost_budget_apis_are_exported():
    from evit_hf.calibration import calibrate_schedule
    from evit_hf.distillation import DistillationTrainer
    from evit_hf.planning import keep_rate_for_macs
    from evit_hf.resolution import resize_position_embeddings

    exported = (evit_hf.DistillationTrainer, evit_hf.keep_rate_for_macs, evit_hf.resize_position_embeddings)
    assert exported == (DistillationTrainer, keep_rate_for_macs, resize_position_embeddings)
    assert evit_hf.calibrate_schedule is calibrate_schedule


def test_import_loads_neither_torch_nor_transformers():
    loaded = run_python(
        f"""
        import json, sys
        import evit_hf
        print(json.dumps([name for name in ("torch", "transformers", *{HEAVY_MODULES!r}) if name in sys.modules]))
        """
    )
    assert loaded == []


def test_benchmark_library_does_not_import_the_command_line_nor_torch():
    loaded = run_python(
        """
        import json, sys
        import evit_hf.benchmark
        print(json.dumps([name for name in ("evit_hf.cli", "torch") if name in sys.modules]))
        """
    )
    assert loaded == []


@pytest.mark.parametrize(
    "module", ["cli.py", *sorted(path.name for path in (INIT_FILE.parent / "commands").glob("*.py"))]
)
def test_command_line_imports_no_torch_at_module_level(module):
    path = INIT_FILE.parent / module if module == "cli.py" else INIT_FILE.parent / "commands" / module
    tree = ast.parse(path.read_text())
    imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    imported = set()
    for node in imports:
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif node.level == 0:
            imported.add(node.module.split(".")[0])
    heavy = {"torch", "transformers", "datasets", "evaluate", "matplotlib", "PIL"}
    assert (imports or module == "__init__.py") and not imported & heavy


@pytest.mark.parametrize(
    "argv, message",
    [(["benchmark", "--bogus"], "unrecognized arguments: --bogus"),
     (["benchmark", "--batch-sizes", "0"], "argument --batch-sizes: a batch size is a whole number >= 1, got 0"),
     (["benchmark", "--dtypes", "int8"], "argument --dtypes: invalid choice: 'int8'"),
     (["convert", "--keep_rate", "2"], "argument --keep_rate: keep_rate must be in (0, 1] (the share")],
    ids=["unknown-flag", "batch-size", "dtype", "convert-keep-rate"],
)  # fmt: skip
def test_argument_errors_answer_before_torch_loads(argv, message):
    result = run_python(
        """
        import contextlib, io, json, sys
        from evit_hf.cli import main
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                main(sys.argv[1:])
                code = 0
            except SystemExit as exit_:
                code = exit_.code
        print(json.dumps({"code": code, "err": err.getvalue(), "torch": "torch" in sys.modules}))
        """,
        *argv,
    )
    assert result["code"] == 2
    assert message in result["err"].strip().splitlines()[-1]
    assert not result["torch"]


@pytest.fixture(scope="module")
def saved_evit_folder(tmp_path_factory):
    from .model_builders import stock_and_evit

    folder = tmp_path_factory.mktemp("saved_evit")
    _, model = stock_and_evit("vit-classifier")
    model.save_pretrained(folder)
    evit_hf.EViTImageProcessor(
        size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(folder)
    return folder


# A fresh process importing torch (~4 s): the most common first use after `import evit_hf`, run by default.
@pytest.mark.slow  # a real run in a subprocess, or a fresh interpreter: seconds on 2 cores
def test_auto_model_loads_a_saved_folder_right_after_import(saved_evit_folder):
    loaded = run_python(
        f"""
        import json, sys
        import evit_hf
        from transformers import AutoModelForImageClassification
        model = AutoModelForImageClassification.from_pretrained(sys.argv[1])
        print(json.dumps({{"class": type(model).__module__ + "." + type(model).__name__,
                          "heavy": [name for name in {HEAVY_MODULES!r} if name in sys.modules]}}))
        """,
        str(saved_evit_folder),
    )
    # evit_hf's own class, not the folder's copy of the code (that would need trust_remote_code).
    assert loaded == {"class": "evit_hf.modeling_evit.EViTForImageClassification", "heavy": []}


@pytest.mark.slow  # a fresh process importing torch: ~4 s on 2 loaded cores
def test_auto_config_knows_evit_right_after_import():
    loaded = run_python(
        """
        import json
        import evit_hf
        from transformers import AutoConfig
        print(json.dumps(type(AutoConfig.for_model("evit", keep_rate=0.5)).__module__))
        """
    )
    assert loaded == "evit_hf.configuration_evit"


@pytest.mark.slow  # a fresh process importing torch: ~4 s on 2 loaded cores
def test_pipeline_and_image_processor_load_a_saved_folder_right_after_import(saved_evit_folder):
    loaded = run_python(
        """
        import json, sys
        import evit_hf
        from transformers import pipeline
        classifier = pipeline("image-classification", model=sys.argv[1], trust_remote_code=False)
        print(json.dumps([type(classifier.model).__module__, type(classifier.image_processor).__module__]))
        """,
        str(saved_evit_folder),
    )
    assert loaded == ["evit_hf.modeling_evit", "evit_hf.image_processing_evit"]


@pytest.mark.slow  # a fresh process importing torch: ~4 s
def test_save_pretrained_writes_auto_map_when_only_model_files_were_imported(tmp_path):
    # The registration that `save_pretrained`'s auto_map needs has run once a model file is loaded, with no Auto class
    # nor public name used.
    written = run_python(
        """
        import json, sys
        from evit_hf.configuration_evit import EViTConfig
        from evit_hf.modeling_evit import EViTForImageClassification
        config = EViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8,
                            image_size=8, patch_size=4)
        EViTForImageClassification(config).save_pretrained(sys.argv[1])
        print(json.dumps(json.load(open(sys.argv[1] + "/config.json"))["auto_map"]))
        """,
        str(tmp_path),
    )
    assert written == {
        "AutoConfig": "configuration_evit.EViTConfig",
        "AutoModelForImageClassification": "modeling_evit.EViTForImageClassification",
    }


def test_registration_hook_registers_once_at_the_first_auto_lookup(monkeypatch):
    # The hook of `import evit_hf`, on transformers' mapping classes as they are loaded here: the first lookup
    # registers and puts the original methods back; a lookup while a transformers module imports waits.
    from transformers import AutoConfig, AutoModel, ViTConfig
    from transformers.models.auto.auto_factory import _LazyAutoMapping
    from transformers.models.auto.configuration_auto import _LazyConfigMapping

    from evit_hf import auto_registration

    calls = []
    monkeypatch.setattr(auto_registration, "register_evit_auto_classes", lambda: calls.append("registered"))
    originals = {cls: dict(vars(cls)) for cls in (_LazyAutoMapping, _LazyConfigMapping)}
    hook = auto_registration._RegisterOnFirstUse()
    hook.install()
    try:
        assert _LazyConfigMapping.__getitem__ is not originals[_LazyConfigMapping]["__getitem__"]
        assert hook in sys.meta_path
        importing = True
        monkeypatch.setattr(auto_registration, "_module_importing", lambda besides=None: importing)
        assert type(AutoConfig.for_model("vit")) is ViTConfig and calls == []  # waits for the import to end
        importing = False
        assert ViTConfig in AutoModel._model_mapping and calls == ["registered"]
        AutoConfig.for_model("vit")
        assert calls == ["registered"] and hook.registered and hook not in sys.meta_path
        for cls, methods in originals.items():
            assert dict(vars(cls)) == methods  # the originals are back, and no watched attribute is left
    finally:
        hook._unwrap_lookups()
        if hook in sys.meta_path:
            sys.meta_path.remove(hook)


def test_registration_hook_registers_when_a_mapping_reads_its_entries_directly(monkeypatch):
    # `AutoImageProcessor` reads `IMAGE_PROCESSOR_MAPPING._extra_content` without a lookup method.
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING

    from evit_hf import auto_registration

    calls = []
    monkeypatch.setattr(auto_registration, "register_evit_auto_classes", lambda: calls.append("registered"))
    hook = auto_registration._RegisterOnFirstUse()
    hook.install()
    try:
        entries = IMAGE_PROCESSOR_MAPPING._extra_content
        assert calls == ["registered"] and entries is vars(IMAGE_PROCESSOR_MAPPING)["_extra_content"]
    finally:
        hook._unwrap_lookups()
        if hook in sys.meta_path:
            sys.meta_path.remove(hook)
