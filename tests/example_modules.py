"""The examples of examples/ (not a package), imported as modules: the examples folder goes first on `sys.path`, as
when an example runs as a script, so that each is imported once and every test patches the same module."""

import sys

from .run_helpers import EXAMPLES


sys.path.insert(0, EXAMPLES)

import digits_budget_study  # noqa: E402
import digits_demo  # noqa: E402
import evaluate_keep_rates  # noqa: E402
import run_image_classification  # noqa: E402


__all__ = ["EXAMPLES", "digits_budget_study", "digits_demo", "evaluate_keep_rates", "run_image_classification"]
