"""The examples of examples/ (not a package), imported as modules: the examples folder goes first on `sys.path`, as
when an example runs as a script, so that each is imported once and every test patches the same module."""

import sys

import pytest

from .run_helpers import EXAMPLES


sys.path.insert(0, EXAMPLES)

import digits_budget_study  # noqa: E402
import digits_demo  # noqa: E402
import evaluate_keep_rates  # noqa: E402
import run_image_classification  # noqa: E402


def stop_example_work(monkeypatch, configuration: bool = False) -> None:
    """Makes loading data or a model in the examples fail the test, a refusal having to come before either; with
    `configuration`, reading the checkpoint's configuration in the evaluation example too."""

    def work_began(*args, **kwargs):
        raise AssertionError("the run loaded data or a model before refusing its arguments")

    for module in (run_image_classification, evaluate_keep_rates):
        monkeypatch.setattr(module, "load_data", work_began)
    monkeypatch.setattr(run_image_classification, "evit_class_for", work_began)
    monkeypatch.setattr(evaluate_keep_rates, "evaluation_model_class", work_began)
    if configuration:
        monkeypatch.setattr(evaluate_keep_rates.AutoConfig, "from_pretrained", work_began)


def example_refusal(main, args) -> str:
    """The one-line message of the `ValueError` an example's `main(args)` refuses with."""
    with pytest.raises(ValueError) as error:
        main(args)
    message = str(error.value)
    assert "\n" not in message  # one line
    return message


__all__ = [
    "EXAMPLES",
    "digits_budget_study",
    "digits_demo",
    "evaluate_keep_rates",
    "example_refusal",
    "run_image_classification",
    "stop_example_work",
]
