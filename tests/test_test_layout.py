"""The layout of the suite: a helper that several test files share lives in a helper module (`run_helpers.py`,
`model_builders.py`, `conftest.py`, ...), never in a test file that other files import. A test file imported by
another runs its module-level setup there, hands over its fixtures by name, and cannot be changed without reading
every file that reaches into it."""

import ast
from pathlib import Path

import pytest


TESTS = Path(__file__).resolve().parent


def is_test_module(name: str) -> bool:
    """Whether the dotted module `name` (`test_x`, `tests.test_x`) is a test file of the suite."""
    return name.rsplit(".", 1)[-1].startswith("test_")


def imports_of_test_modules(source: str) -> list[tuple[int, str]]:
    """(line, statement) of each import in `source`, at any depth (in functions too), that reaches a test module:
    names from a test module (relative or absolute), a test module from a package, or the test module itself."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            named = [alias.name for alias in node.names]
            # A test module is either the module imported from or, for a package (`from tests import ...`, a
            # relative one), among the names imported.
            if (node.module and is_test_module(node.module)) or any(is_test_module(name) for name in named):
                found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Import) and any(is_test_module(alias.name) for alias in node.names):
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_no_file_of_the_suite_imports_a_test_file():
    files = sorted(TESTS.rglob("*.py"))
    # Test files, helper modules and conftest are all read: a check of no files would pass.
    assert {Path(__file__).resolve(), TESTS / "conftest.py", TESTS / "run_helpers.py"} <= set(files)
    offenders = [
        f"{path.relative_to(TESTS.parent)}:{line}: {statement}"
        for path in files
        for line, statement in imports_of_test_modules(path.read_text())
    ]
    assert not offenders, "move what these import into a helper module (e.g. tests/run_helpers.py):\n" + "\n".join(
        offenders
    )


# Some are spelled with the spaces and parentheses Python allows, which a search of the text for the usual spelling
# misses: the check reads the syntax.
@pytest.mark.parametrize(
    "source, line",
    [
        ("from . test_examples import save_small_vit", 1),
        ("from tests.test_resume import weights, largest_difference", 1),
        ("from . import (test_conversion)", 1),
        ("from tests import model_builders, test_benchmark", 1),
        ("import tests.test_multiprocess", 1),
        ("import  test_examples as examples", 1),
        ("def test_x():\n    from .. tests.test_examples import evaluate_keep_rates as example\n", 2),
    ],
)
def test_each_form_of_importing_a_test_file_is_found(source, line):
    assert [found_line for found_line, _ in imports_of_test_modules(source)] == [line]


@pytest.mark.parametrize(
    "source",
    [
        "from .run_helpers import save_small_vit",
        "from . import model_builders",
        "import pytest",
        "from transformers.testing_utils import require_torch",
        "from .example_modules import run_image_classification as test_run",
    ],
)
def test_helper_modules_and_packages_are_not_test_files(source):
    assert imports_of_test_modules(source) == []
