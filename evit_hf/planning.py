"""Keep rates for a cost budget: the largest keep rate whose multiply-accumulates fit a target."""

import math

from .configuration_evit_base import vision_config_of
from .macs import count_macs


# Keep rates are searched in steps of 0.01, from 1 down.
KEEP_RATE_STEP = 0.01


def _check_target_macs(target_macs) -> None:
    number = not isinstance(target_macs, bool) and isinstance(target_macs, (int, float))
    if not (number and math.isfinite(target_macs) and target_macs > 0):
        raise ValueError(
            f"target_macs must be a positive number of multiply-accumulates, such as 3.0e9; got {target_macs!r}."
        )


def keep_rate_for_macs(config, target_macs: float, image_size: int | tuple[int, int] | None = None) -> float:
    """The largest keep rate, to 0.01, whose [`count_macs`] at `image_size` does not exceed `target_macs`.

    Every reduction layer gets that rate (the configuration's reduction layers, or the paper's for a plain
    configuration). MACs grow with the keep rate, so the answer `r` satisfies `count_macs(r) <= target_macs <
    count_macs(r + 0.01)`, or is 1.0 when the unreduced model fits.

    Args:
        config ([`PreTrainedConfig`]):
            Any configuration [`count_macs`] reads (stock or EViT).
        target_macs (`float`):
            The budget, in multiply-accumulates of one image (e.g. `count_macs(config, image_size=224, keep_rate=1.0)`,
            the stock model's cost at 224 px, for the paper's "higher resolution at equal cost").
        image_size (`int` or `tuple[int, int]`, *optional*):
            Input size; defaults to the configuration's.

    Raises:
        `ValueError`: when even keep rate 0.01 costs more than `target_macs`, saying what it costs.

    Example:

    ```python
    >>> from transformers import AutoConfig
    >>> from evit_hf import count_macs, keep_rate_for_macs

    >>> config = AutoConfig.from_pretrained("facebook/deit-small-patch16-224")
    >>> keep_rate_for_macs(config, count_macs(config), image_size=288)  # DeiT-S at 288 px for the cost of 224 px
    ```
    """
    _check_target_macs(target_macs)
    steps = round(1 / KEEP_RATE_STEP)
    for step in range(steps, 0, -1):
        keep_rate = step / steps
        if count_macs(config, image_size=image_size, keep_rate=keep_rate) <= target_macs:
            return keep_rate
    cheapest = count_macs(config, image_size=image_size, keep_rate=KEEP_RATE_STEP)
    vision_config = vision_config_of(config)
    size = image_size if image_size is not None else vision_config.image_size
    raise ValueError(
        f"No keep rate reaches {target_macs:,.0f} MACs at image size {size}: the smallest, {KEEP_RATE_STEP}, costs "
        f"{cheapest:,} (the layers before the first reduction layer, the patch embedding and the head do not shrink). "
        "Use a larger budget, a smaller image size, or earlier reduction layers."
    )


__all__ = ["keep_rate_for_macs"]
