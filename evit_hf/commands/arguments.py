"""The argparse types the `evit-hf` commands share, and the hidden underscore spellings of older option names. Each
type raises `argparse.ArgumentTypeError`, which argparse turns into its one-line `evit-hf COMMAND: error: ...`."""

import argparse
import math
import os

from ..configuration_evit_base import check_keep_rate
from ..messages import one_line


def add_option_with_hidden_alias(parser: argparse.ArgumentParser, flag: str, **options) -> argparse.Action:
    """`flag` (dash spelling, `--keep-rate`), shown in --help, and its underscore spelling (`--keep_rate`), which
    earlier versions took: accepted as the same option, hidden from --help. The alias is an action of its own, so that
    an error names the spelling the user typed."""
    action = parser.add_argument(flag, **options)
    alias = "--" + flag[len("--") :].replace("-", "_")
    if alias != flag:
        alias_options = {name: value for name, value in options.items() if name != "help"}
        parser.add_argument(alias, **alias_options, dest=action.dest, help=argparse.SUPPRESS)
    return action


def looks_like_path(name: str) -> bool:
    """Whether `name` reads as a local path rather than a Hub id ("org/name" or "name"): then a missing folder is
    reported at once instead of after the Hub download's retries."""
    return (
        os.path.isabs(name)
        or name.startswith(("./", "../", "~"))
        or name in (".", "..")
        or name.count("/") > 1
        or os.sep in name.replace("/", "")
        or ("/" in name and os.path.isdir(name.split("/")[0]))  # "outputs/run1" where outputs/ exists here
    )


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a keep rate in (0, 1], such as 0.7; got {text!r}") from None


def keep_rate_argument(text: str) -> float:
    """argparse type of a keep rate: a number in (0, 1], as `check_keep_rate` (the configurations' check) allows."""
    try:
        return check_keep_rate(_number(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(one_line(error).rstrip(".")) from None


def per_layer_keep_rate_argument(text: str) -> float | list[float]:
    """argparse type of a keep rate that may differ per layer: one number in (0, 1], or one per reduction layer joined
    by "/" ("0.9/0.7/0.5"), checked by `check_keep_rate`."""
    if "/" not in text:
        return keep_rate_argument(text)
    try:
        return check_keep_rate([_number(part.strip()) for part in text.split("/")])
    except ValueError as error:
        raise argparse.ArgumentTypeError(one_line(error).rstrip(".")) from None


def _whole_number(minimum: int, refusal, doc: str):
    """argparse type of a whole number >= `minimum`; `refusal(text)` is the error for anything else."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(refusal(text))
        return value

    parse.__doc__ = doc
    return parse


def whole_number_at_least(minimum: int, what: str):
    """argparse type of a whole number >= `minimum`; `what` names it in the error."""
    return _whole_number(minimum, lambda text: f"{what} is a whole number >= {minimum}, got {text}",
                         f"argparse type of {what}: a whole number >= {minimum}.")  # fmt: skip


whole_number_argument = _whole_number(
    1, lambda text: f"expected a whole number >= 1, got {text!r}", "argparse type of a count: a whole number >= 1."
)
# What no model takes is refused here; the model's patch size, the lower bound, is checked once the model is known.
image_size_argument = _whole_number(
    1,
    lambda text: (
        f"an image size is a whole number of pixels, at least 1 and at least the model's patch size; got {text}"
    ),
    "argparse type of an image size in pixels.",
)


def yes_no_argument(value: str) -> bool:
    """argparse type of a yes/no switch given as a value (`--compile no yes`)."""
    if value.lower() in ("yes", "true", "1", "compiled"):
        return True
    if value.lower() in ("no", "false", "0", "eager"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, got {value!r}")


def layer_index_argument(text: str) -> int:
    """argparse type of a 0-based layer index."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a reduction layer is a 0-based layer index such as 3, got {text!r}"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a reduction layer is a 0-based layer index (0 or more), got {value}")
    return value


heads_argument = _whole_number(
    1,
    lambda text: f"the number of attention heads is a whole number >= 1, got {text!r}",
    "argparse type of a number of attention heads.",
)


def macs_argument(text: str) -> float:
    """argparse type of a MACs budget: a positive number, optionally with a K, M or G suffix (3.03G = 3.03e9)."""
    scale = {"K": 1e3, "M": 1e6, "G": 1e9}.get(text[-1:].upper(), 1.0)
    number = text[:-1] if scale != 1.0 else text
    try:
        value = float(number) * scale
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(
            f"a MACs budget is a positive number of multiply-accumulates per image, such as 3.03e9 or 3.03G; got "
            f"{text!r}"
        )
    return value
