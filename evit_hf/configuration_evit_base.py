"""What every EViT configuration shares: the token-reorganization settings, their checks, and the loading of plain
checkpoints. Each family's configuration (`configuration_evit*.py`) builds on this.

`save_pretrained` copies this file next to the weights with the family's configuration, so it only uses relative
imports.
"""

import math
import numbers
from collections.abc import Sequence


def default_reduction_layers(num_hidden_layers: int) -> list[int]:
    """The paper's reduction layers for a model of `num_hidden_layers` layers.

    Layers 3, 6 and 9 for 12 layers; for other depths round(L/4), round(L/2), round(3L/4), deduplicated and kept inside
    the model.
    """
    candidates = (round(num_hidden_layers / 4), round(num_hidden_layers / 2), round(3 * num_hidden_layers / 4))
    return sorted({index for index in candidates if 0 <= index < num_hidden_layers})


def _check_one_keep_rate(keep_rate) -> float:
    if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)) or not math.isfinite(keep_rate):
        raise ValueError(f"keep_rate must be a number in (0, 1], such as 0.7; got {keep_rate!r}.")
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(
            f"keep_rate must be in (0, 1] (the share of candidate tokens each reduction layer keeps), got {keep_rate}."
        )
    return float(keep_rate)


def vision_config_of(config):
    """The configuration that holds the image side and the EViT settings: a two-tower (CLIP-style) configuration's
    `vision_config`, or `config` itself."""
    return getattr(config, "vision_config", None) or config


def format_keep_rate(keep_rate) -> str:
    """`0.7`, or `0.9 / 0.7 / 0.5` for per-layer keep rates."""
    if isinstance(keep_rate, (list, tuple)):
        return " / ".join(f"{rate:g}" for rate in keep_rate)
    return f"{keep_rate:g}"


def check_keep_rate(keep_rate, reduction_layers: Sequence[int] | None = None) -> float | list[float]:
    """Returns `keep_rate` as a Python float, or as a list of floats (one per reduction layer, in ascending layer
    order), or raises a `ValueError` saying what is allowed. A list is checked against `reduction_layers` when
    given."""
    if not isinstance(keep_rate, (list, tuple)):
        return _check_one_keep_rate(keep_rate)
    rates = [_check_one_keep_rate(rate) for rate in keep_rate]
    if not rates:
        raise ValueError(
            "keep_rate must be a number in (0, 1], or a list of one such rate per reduction layer; got an empty list."
        )
    if reduction_layers is not None and len(rates) != len(reduction_layers):
        raise ValueError(_keep_rate_length_message(rates, reduction_layers))
    return rates


def _keep_rate_length_message(rates: Sequence[float], reduction_layers: Sequence[int]) -> str:
    return (
        f"keep_rate lists one rate per reduction layer, in ascending layer order: it has {len(rates)} ({list(rates)}) "
        f"for {len(reduction_layers)} reduction layers ({list(reduction_layers)}). Give {len(reduction_layers)} "
        "rates, or one number for every layer; to change both, set keep_rate to a number first."
    )


def _unsorted_layers_message(written_layers: Sequence[int], keep_rate: Sequence[float]) -> str:
    """The refusal of reduction layers out of ascending order set apart from the per-layer keep rates they would
    pair with: which rate belongs to which layer would be a guess."""
    layers = sorted(written_layers)
    return (
        f"reduction_layers {list(written_layers)} is not in ascending order, and keep_rate holds one rate per "
        f"reduction layer in ascending layer order ({list(keep_rate)}, set apart from these layers): which rate "
        "belongs to which layer is unclear. Give the layers and the rates together (the constructor, "
        "from_pretrained, apply_evit, config.set_schedule or config.update), "
        f"where each rate goes with its layer as written, or the layers in ascending order ({layers}) with the rates "
        "in the same order."
    )


def _in_ascending_order(reduction_layers) -> bool:
    """Whether a list of layer indices is in ascending order (anything else: not a list to pair rates with)."""
    if not isinstance(reduction_layers, (list, tuple)) or not all(
        isinstance(layer, numbers.Integral) for layer in reduction_layers
    ):
        return True
    return list(reduction_layers) == sorted(reduction_layers)


def rates_in_ascending_layer_order(written_layers: Sequence[int], keep_rate: Sequence[float]) -> list[float]:
    """`keep_rate`, given one rate per layer of `written_layers` in that order, reordered to go with the layers in
    ascending order: layers [3, 1, 2] with rates [0.9, 0.7, 0.5] become [0.7, 0.5, 0.9] for layers [1, 2, 3]."""
    if len(keep_rate) != len(written_layers):
        raise ValueError(_keep_rate_length_message(keep_rate, written_layers))
    rate_of_layer = dict(zip(written_layers, keep_rate, strict=True))
    return [rate_of_layer[layer] for layer in sorted(written_layers)]


def keep_rates_by_layer(keep_rate: float | Sequence[float], reduction_layers: Sequence[int]) -> dict[int, float]:
    """Each reduction layer's keep rate: `{layer: rate}` from one rate for all, or a list in ascending layer order."""
    if isinstance(keep_rate, (list, tuple)):
        if len(keep_rate) != len(reduction_layers):
            raise ValueError(_keep_rate_length_message(keep_rate, reduction_layers))
        return dict(zip(sorted(reduction_layers), keep_rate, strict=True))
    return dict.fromkeys(reduction_layers, keep_rate)


def check_reduction_layers(reduction_layers: Sequence[int] | None, num_hidden_layers: int) -> list[int]:
    """Returns the reduction layers as a sorted list (the defaults for `None`), or raises a `ValueError` saying what
    is allowed."""
    if reduction_layers is None:
        return default_reduction_layers(num_hidden_layers)
    if not isinstance(reduction_layers, (list, tuple)):
        raise ValueError(
            f"reduction_layers must be a list of 0-based layer indices in [0, {num_hidden_layers - 1}], or None for "
            f"the defaults ({default_reduction_layers(num_hidden_layers)} for {num_hidden_layers} layers); got "
            f"{reduction_layers!r}."
        )
    layers = list(reduction_layers)
    for index in layers:
        if isinstance(index, bool) or not isinstance(index, numbers.Integral) or not 0 <= index < num_hidden_layers:
            raise ValueError(
                f"reduction_layers holds 0-based layer indices in [0, {num_hidden_layers - 1}] for a model with "
                f"{num_hidden_layers} layers; got {index!r} in {layers}."
            )
    if len(set(layers)) != len(layers):
        raise ValueError(f"reduction_layers must not repeat a layer (list each layer once), got {layers}.")
    # The model runs its layers in index order, so the sorted list is what it does. Plain ints keep config.json valid.
    return sorted(int(index) for index in layers)


def check_fuse_inattentive_tokens(fuse_inattentive_tokens: bool) -> bool:
    """Returns `fuse_inattentive_tokens`, or raises a `ValueError` saying what is allowed."""
    if not isinstance(fuse_inattentive_tokens, bool):
        raise ValueError(f"fuse_inattentive_tokens must be True or False, got {fuse_inattentive_tokens!r}.")
    return fuse_inattentive_tokens


class _SourceModelTypesMixin:
    """Loading of plain checkpoints: a configuration of one of `source_model_types` becomes this EViT configuration
    (same fields, EViT settings from keyword arguments or defaults); any other `model_type` is refused."""

    # The plain checkpoints this configuration reads (their config.json names one of these `model_type`s).
    source_model_types: tuple[str, ...] = ()
    # The models that load this configuration, for the error that sends a checkpoint of another family here.
    model_class_names: str = ""
    # Trainer gathers every output but these during evaluation: the kept tokens are not predictions.
    keys_to_ignore_at_inference = ["kept_token_indices"]

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if cls.base_config_key and isinstance(config_dict.get(cls.base_config_key), dict):
            # A sub-configuration read from a composite checkpoint (CLIP's vision tower from a CLIP folder), as
            # `from_pretrained` does after this; its `model_type` is the sub-configuration's.
            config_dict = config_dict[cls.base_config_key]
        model_type = config_dict.get("model_type")
        if model_type is not None and model_type != cls.model_type:
            if model_type not in cls.source_model_types:
                supported = ", ".join(repr(name) for name in (cls.model_type, *cls.source_model_types))
                raise ValueError(
                    f"{cls.__name__} reads checkpoints of model_type {supported}, but "
                    f"{pretrained_model_name_or_path} is {model_type!r}: {_where_model_type_loads(model_type)}"
                )
            # A plain checkpoint becomes an EViT one: same weights, EViT settings from kwargs or defaults.
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs


def _configurations_reading(model_type: str) -> list[type]:
    """The EViT configuration classes defined so far that read checkpoints of `model_type` (own or plain)."""
    found, pending = {}, list(_SourceModelTypesMixin.__subclasses__())
    while pending:
        config_class = pending.pop()
        pending.extend(config_class.__subclasses__())
        if model_type in (getattr(config_class, "model_type", None), *config_class.source_model_types):
            found[config_class.__name__] = config_class
    return [found[name] for name in sorted(found)]


def _where_model_type_loads(model_type: str) -> str:
    """The end of the error for a checkpoint of another family: which EViT configuration and models load it."""
    readers = _configurations_reading(model_type)
    if not readers:
        return "no EViT configuration reads such checkpoints."
    names = "; ".join(f"{reader.__name__} ({reader.model_class_names})" for reader in readers)
    return f"such checkpoints load with {names}."


_NOT_GIVEN = object()


class _EViTSettingsMixin(_SourceModelTypesMixin):
    """What every EViT configuration that holds the settings shares: their validation, and loading of plain
    checkpoints."""

    def __setattr__(self, name, value):
        # The one place the EViT settings are checked: the constructor sets every field through here, and so do
        # `from_pretrained` keyword arguments, `update` and plain assignment. `KeepRateScheduler` assigns keep_rate
        # before every training step, so this stays a few comparisons.
        if name == "keep_rate":
            value = check_keep_rate(value, vars(self).get("reduction_layers"))
        elif name == "reduction_layers":
            written = list(value) if isinstance(value, (list, tuple)) else None
            value = check_reduction_layers(value, self.num_hidden_layers)
            keep_rate = vars(self).get("keep_rate")
            if isinstance(keep_rate, list):
                if len(keep_rate) != len(value):
                    raise ValueError(_keep_rate_length_message(keep_rate, value))
                if written is not None and written != value:
                    if "reduction_layers" in vars(self):
                        # An assignment: the rates were set apart from these layers (and for others, perhaps).
                        raise ValueError(_unsorted_layers_message(written, keep_rate))
                    # The constructor sets keep_rate, then reduction_layers: both came in one call, so each rate
                    # goes with its layer as written, and both are stored in ascending layer order.
                    super().__setattr__("keep_rate", rates_in_ascending_layer_order(written, keep_rate))
        elif name == "fuse_inattentive_tokens":
            value = check_fuse_inattentive_tokens(value)
        elif name == "num_hidden_layers" and isinstance(value, int) and "reduction_layers" in vars(self):
            # A new depth must still hold the reduction layers, or the model would skip the ones past its end.
            try:
                check_reduction_layers(self.reduction_layers, value)
            except ValueError as error:
                raise ValueError(
                    f"{error} To set num_hidden_layers={value}, first set reduction_layers to layers below {value}, "
                    "or pass both to the constructor or to from_pretrained."
                ) from None
        elif name == "model_type":
            # `model_type` is the class's. A composite checkpoint's sub-dictionary names the plain one
            # ("clip_vision_model"), and the constructor would store it on the object, where it would shadow ours.
            return
        super().__setattr__(name, value)

    def set_schedule(self, reduction_layers=_NOT_GIVEN, keep_rate=_NOT_GIVEN) -> None:
        """Sets `reduction_layers` and `keep_rate` together: a list of keep rates goes with the layers as written
        (`reduction_layers=[3, 1, 2], keep_rate=[0.9, 0.7, 0.5]`: layer 3 keeps 0.9), and both are stored in
        ascending layer order. Nothing changes if either is refused."""
        if reduction_layers is not _NOT_GIVEN and isinstance(keep_rate, (list, tuple)):
            layers = check_reduction_layers(reduction_layers, self.num_hidden_layers)
            written = list(reduction_layers) if isinstance(reduction_layers, (list, tuple)) else layers
            rates = rates_in_ascending_layer_order(written, check_keep_rate(keep_rate, layers))
            self.keep_rate = 1.0  # one rate fits any layers: no state in between pairs a list with other layers
            self.reduction_layers = layers
            self.keep_rate = rates
            return
        if keep_rate is not _NOT_GIVEN:
            check_keep_rate(keep_rate)
        if reduction_layers is not _NOT_GIVEN:
            check_reduction_layers(reduction_layers, self.num_hidden_layers)
        if keep_rate is not _NOT_GIVEN and not isinstance(keep_rate, (list, tuple)):
            self.keep_rate = keep_rate  # a number first: it fits the new layers, whatever the old rates were
        if reduction_layers is not _NOT_GIVEN:
            self.reduction_layers = reduction_layers
        if isinstance(keep_rate, (list, tuple)):
            self.keep_rate = keep_rate

    def update(self, config_dict):
        # Layers and rates given in one dictionary go together, as in the constructor.
        schedule = {key: config_dict[key] for key in ("reduction_layers", "keep_rate") if key in config_dict}
        super().update({key: value for key, value in config_dict.items() if key not in schedule})
        self.set_schedule(**schedule)

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        # transformers sets keyword arguments one by one on the built configuration, and a depth, reduction layers and
        # per-layer keep rates that only fit each other would fail in either order. The constructor sets them in that
        # order, so they go there; a plain checkpoint loaded at a new depth also gets that depth's default layers.
        constructor_settings = {
            key: kwargs.pop(key) for key in ("num_hidden_layers", "reduction_layers", "keep_rate") if key in kwargs
        }
        stored_rates = config_dict.get("keep_rate")
        new_layers = constructor_settings.get("reduction_layers")
        if (
            "keep_rate" not in constructor_settings
            and isinstance(stored_rates, (list, tuple))
            and not _in_ascending_order(new_layers)
        ):
            # The constructor would pair the stored rates, written for the stored layers, with these as written.
            raise ValueError(_unsorted_layers_message(new_layers, stored_rates))
        return super().from_dict({**config_dict, **constructor_settings}, **kwargs)


def _settings_checked_first(config_class):
    """Makes the EViT settings' checks run before `@strict`'s type checks on `config_class`.

    `@strict` puts its own `__setattr__` on the class, which type-checks a value before any parent's `__setattr__`
    sees it: a string keep_rate would get strict's `TypeError` wrapper instead of our `ValueError`. The parents'
    strict `__setattr__` still runs after ours and type-checks the normalized value with this class's validators.
    """
    config_class.__setattr__ = _EViTSettingsMixin.__setattr__
    return config_class


def _vision_setting(name: str) -> property:
    """A setting of a composite configuration that lives in its vision configuration, where it is checked."""

    def get(self):
        return getattr(self.vision_config, name)

    def set(self, value):
        setattr(self.vision_config, name, value)

    return property(get, set, doc=f"`vision_config.{name}`: the vision tower's setting (the text tower has none).")


class _VisionSettingsMixin(_SourceModelTypesMixin):
    """A configuration of text and vision towers (CLIP-style) whose vision configuration is an EViT one: it holds the
    settings, which this configuration reads and assigns there, so that `Config(keep_rate=0.5)`,
    `from_pretrained(folder, keep_rate=0.5)` and `config.keep_rate = 0.5` all set the vision tower's."""

    keep_rate = _vision_setting("keep_rate")
    reduction_layers = _vision_setting("reduction_layers")
    fuse_inattentive_tokens = _vision_setting("fuse_inattentive_tokens")

    def __post_init__(self, **kwargs):
        # A plain vision configuration object would be kept as it is: the vision tower needs the EViT one.
        evit_vision_config_class = self.sub_configs["vision_config"]
        if not isinstance(self.vision_config, (dict, evit_vision_config_class, type(None))):
            self.vision_config = self.vision_config.to_dict()
        # transformers would assign these one at a time after the vision configuration is built; given together,
        # they go together (a list of rates with its layers as written).
        schedule = {key: kwargs.pop(key) for key in ("reduction_layers", "keep_rate") if key in kwargs}
        super().__post_init__(**kwargs)
        self.vision_config.set_schedule(**schedule)

    def update(self, config_dict):
        schedule = {key: config_dict[key] for key in ("reduction_layers", "keep_rate") if key in config_dict}
        super().update({key: value for key, value in config_dict.items() if key not in schedule})
        self.vision_config.set_schedule(**schedule)

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        # `from_pretrained(folder, reduction_layers=..., keep_rate=...)`: transformers would assign the keyword
        # arguments one by one after building the configuration; they go to the vision configuration together.
        schedule = {key: kwargs.pop(key) for key in ("reduction_layers", "keep_rate") if key in kwargs}
        built = super().from_dict(config_dict, **kwargs)
        config = built[0] if isinstance(built, tuple) else built
        config.vision_config.set_schedule(**schedule)
        return built
