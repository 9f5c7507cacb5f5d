"""What the benchmark measures, checked before any model is built: the named shapes and checkpoint folders it takes,
`BenchmarkSettings` with its validation (`InvalidBenchmarkSetting`), and the configuration of the benchmarked model
(`macs_config`, `benchmarked_reduction_layers`). The timing is in `benchmark_timing.py`, the report in
`benchmark_report.py`, the run that ties them together in `benchmark.py`.
"""

import copy
import functools
import inspect
import os
from dataclasses import dataclass, field

from .configuration_evit_base import check_keep_rate, vision_config_of
from .messages import one_line


# torch, transformers and the family table (which imports every family's models) load on first use, not at import:
# `evit-hf` imports this module (through `benchmark.py`) to read its defaults and checks its arguments before torch
# loads.
DTYPE_NAMES = ("float32", "bfloat16", "float16")
# The tables `_tables` builds on first use, read as module attributes (`benchmark_settings.SHAPES`).
TABLE_NAMES = ("SHAPES", "FAMILY_CLASSES", "SHAPE_FAMILIES", "DTYPES")


@functools.cache
def _tables() -> dict:
    import torch

    from .families import FAMILIES, benchmark_shapes

    shapes = benchmark_shapes()
    return {
        # Model shapes by name (random weights: speed does not depend on them), from each family's record.
        "SHAPES": {name: shape for name, (_, shape) in shapes.items()},
        # The classes each family benchmarks: (stock config, stock model, EViT config, EViT model).
        "FAMILY_CLASSES": {family.name: family.benchmark_classes for family in FAMILIES if family.benchmark_classes},
        "SHAPE_FAMILIES": {name: family.name for name, (family, _) in shapes.items()},
        "DTYPES": {name: getattr(torch, name) for name in DTYPE_NAMES},
    }


def __getattr__(name: str):
    if name in TABLE_NAMES:
        return _tables()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def shape_names() -> list[str]:
    """The named shapes `--model` takes (besides checkpoint folders)."""
    return list(_tables()["SHAPES"])


def torch_dtype(dtype):
    """A torch dtype from its name (or the dtype itself)."""
    return _tables()["DTYPES"][dtype] if isinstance(dtype, str) else dtype


def is_shape_name(model: str) -> bool:
    return model in _tables()["SHAPES"]


def model_family(model: str) -> str:
    """The family name of a named shape or of a checkpoint folder."""
    if is_shape_name(model):
        return _tables()["SHAPE_FAMILIES"][model]
    return read_folder_model(model).family.name


def shape_classes(model: str) -> tuple[type, type, type, type]:
    """(stock configuration, stock model, EViT configuration, EViT model) the benchmark builds for a named shape."""
    return _tables()["FAMILY_CLASSES"][model_family(model)]


class InvalidBenchmarkSetting(ValueError):
    """A setting the benchmark cannot run with. `field` names the `BenchmarkSettings` field (the command-line option
    is `option`), `problem` says what is wrong and what is allowed."""

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"{field}: {problem}")

    @property
    def option(self) -> str:
        return "--" + {"compiled": "compile"}.get(self.field, self.field).replace("_", "-")


@dataclass
class BenchmarkSettings:
    """What `run_benchmark` measures: every combination of the list-valued settings, each against the stock model.
    Invalid settings raise `InvalidBenchmarkSetting` (a `ValueError`) here, before any model is built."""

    model: str = "deit-small"
    keep_rates: list[float | list[float]] = field(default_factory=lambda: [0.9, 0.8, 0.7, 0.6, 0.5])
    batch_sizes: list[int] = field(default_factory=lambda: [32])
    image_sizes: list[int] = field(default_factory=lambda: [224])
    attn_implementations: list[str] = field(default_factory=lambda: ["sdpa"])
    dtypes: list[str] = field(default_factory=lambda: ["float32"])
    devices: list[str] = field(default_factory=lambda: ["cpu"])
    compiled: list[bool] = field(default_factory=lambda: [False])
    modes: list[str] = field(default_factory=lambda: ["inference"])
    warmup: int = 3
    rounds: int = 10
    measure_memory: bool = True
    seed: int = 0

    def __post_init__(self):
        patch_size = model_patch_size(self.model)
        for name in ("keep_rates", "batch_sizes", "image_sizes", "attn_implementations", "dtypes", "devices",
                     "compiled", "modes"):  # fmt: skip
            if len(getattr(self, name)) == 0:
                raise InvalidBenchmarkSetting(name, "needs at least one value")
        for keep_rate in self.keep_rates:
            # One rate, or one per reduction layer (a list, in ascending layer order; its length is checked below,
            # once the model is known to be one the benchmark builds).
            _check_benchmark_keep_rate(keep_rate)
        self.keep_rates = [list(rate) if isinstance(rate, (list, tuple)) else rate for rate in self.keep_rates]
        for batch_size in self.batch_sizes:
            if not _is_whole(batch_size) or batch_size < 1:
                raise InvalidBenchmarkSetting("batch_sizes", f"a batch size is a whole number >= 1, got {batch_size}")
        check_image_sizes(self.image_sizes, patch_size, self.model)
        unknown = [dtype for dtype in self.dtypes if dtype not in DTYPE_NAMES]
        if unknown:
            raise InvalidBenchmarkSetting(
                "dtypes", f"must be among {', '.join(DTYPE_NAMES)}, got {', '.join(unknown)}"
            )
        unknown = [mode for mode in self.modes if mode not in ("inference", "train")]
        if unknown:
            raise InvalidBenchmarkSetting("modes", f"must be inference and/or train, got {', '.join(unknown)}")
        if not _is_whole(self.warmup) or self.warmup < 0:
            raise InvalidBenchmarkSetting(
                "warmup", f"the number of warm-up rounds is a whole number >= 0, got {self.warmup}"
            )
        if not _is_whole(self.rounds) or self.rounds < 1:
            raise InvalidBenchmarkSetting(
                "rounds", f"the number of timed rounds is a whole number >= 1, got {self.rounds}"
            )
        per_layer = [rate for rate in self.keep_rates if isinstance(rate, list)]
        if per_layer:
            layers = benchmarked_reduction_layers(self.model, self.image_sizes[0])
            for keep_rate in per_layer:
                _check_benchmark_keep_rate(keep_rate, layers)
        benchmarked_class = benchmarked_stock_class(self.model)
        if "train" in self.modes and not _takes_labels(benchmarked_class):
            raise InvalidBenchmarkSetting(
                "modes",
                f"train needs a classification loss; {self.model} is a {benchmarked_class.__name__} and has "
                "none: use inference",
            )
        for device in self.devices:
            problem = device_problem(device)
            if problem:
                raise InvalidBenchmarkSetting("devices", problem)
        for attn_implementation in self.attn_implementations:
            problem = attn_implementation_problem(attn_implementation)
            if problem:
                raise InvalidBenchmarkSetting("attn_implementations", problem)


def _check_benchmark_keep_rate(keep_rate, reduction_layers=None) -> None:
    """`check_keep_rate`, the configurations' own check (a per-layer list against `reduction_layers` when given), with
    its refusal as an `InvalidBenchmarkSetting` of `keep_rates`."""
    try:
        check_keep_rate(keep_rate, reduction_layers)
    except ValueError as error:
        raise InvalidBenchmarkSetting("keep_rates", str(error).rstrip(".")) from None


def _is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class FolderModel:
    """What the benchmark builds from a checkpoint folder: its configuration, family and (stock, EViT) classes."""

    config: object
    family: object
    stock_class: type
    evit_class: type

    @property
    def tower_config(self):
        """The configuration that holds the image settings (a CLIP-style model's vision tower's)."""
        return vision_config_of(self.config)


def read_folder_model(folder: str) -> FolderModel:
    """The configuration, family and classes of a checkpoint folder; `InvalidBenchmarkSetting` for anything else.
    Read each time (a few milliseconds): a folder may change between runs in one process."""
    from transformers import AutoConfig

    from .families import FAMILIES, family_for_model_type

    if not os.path.isdir(folder):
        raise InvalidBenchmarkSetting(
            "model", f"must be one of {', '.join(shape_names())} or a checkpoint folder; {folder!r} is neither"
        )
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise InvalidBenchmarkSetting(
            "model", f"{folder} has no config.json; give a folder written by save_pretrained"
        )
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as error:
        raise InvalidBenchmarkSetting(
            "model", f"cannot read the configuration in {folder}: {one_line(error)}"
        ) from None
    family = family_for_model_type(config.model_type)
    if family is None:
        names = ", ".join(each.display_name for each in FAMILIES)
        raise InvalidBenchmarkSetting(
            "model",
            f"{folder} holds a {config.model_type!r} model; the benchmark builds {names} models and their EViT "
            "versions",
        )
    # The model the folder's `architectures` names (stock or EViT); without one, the family's benchmark model.
    named = set(config.architectures or [])
    pairs = [(stock, evit) for stock, evit in family.models.items() if {stock.__name__, evit.__name__} & named]
    if not pairs:
        pairs = [family.benchmark_models or next(iter(family.models.items()))]
    stock_class, evit_class = pairs[0]
    config = copy.deepcopy(config)
    config.architectures = [stock_class.__name__]
    return FolderModel(config, family, stock_class, evit_class)


def model_patch_size(model: str) -> int:
    """The patch size of a named shape or of a checkpoint folder; `InvalidBenchmarkSetting` for anything else."""
    if is_shape_name(model):
        return _tables()["SHAPES"][model].get("patch_size", 16)
    folder_model = read_folder_model(model)
    problem = config_shape_problem(folder_model)
    if problem:
        raise InvalidBenchmarkSetting(
            "model", f"{model}/config.json {problem}; give a folder written by save_pretrained"
        )
    patch_size = folder_model.tower_config.patch_size
    return patch_size if isinstance(patch_size, int) else max(patch_size)


def config_shape_problem(folder_model: FolderModel) -> str | None:
    """Why a folder's configuration describes no model the benchmark can build and run, or None if it does."""
    tower = folder_model.tower_config
    sizes = [name for name in ("hidden_size", "num_attention_heads", "intermediate_size") if hasattr(tower, name)]
    for name in sizes:
        value = getattr(tower, name)
        if not _is_whole(value) or value < 1:
            return f"has {name}={value!r}, where the model needs a whole number >= 1"
    if not _is_whole(tower.num_hidden_layers) or tower.num_hidden_layers < 0:
        return f"has num_hidden_layers={tower.num_hidden_layers!r}, where the model needs a whole number >= 0"
    if _takes_labels(folder_model.stock_class) and (not _is_whole(folder_model.config.num_labels)
                                                     or folder_model.config.num_labels < 1):  # fmt: skip
        return f"has num_labels={folder_model.config.num_labels!r}, where a classifier needs a whole number >= 1"
    return None


def benchmarked_stock_class(model: str) -> type:
    """The stock class the benchmark times for a named shape or a checkpoint folder."""
    if is_shape_name(model):
        return shape_classes(model)[1]
    return read_folder_model(model).stock_class


def _takes_labels(model_class: type) -> bool:
    """Whether the model computes a loss (a training step needs one)."""
    return "labels" in inspect.signature(model_class.forward).parameters


def check_image_sizes(image_sizes, patch_size: int, model: str, field_name: str = "image_sizes") -> None:
    """Image sizes must hold at least one patch: the patch embedding cannot cut a smaller image. (Sizes that are not
    a multiple of the patch size run, as in transformers: the pixels past the last whole patch are not used.)"""
    for size in image_sizes:
        if not _is_whole(size) or size < patch_size:
            raise InvalidBenchmarkSetting(
                field_name,
                f"an image size is a whole number of pixels, at least the patch size ({patch_size} px for {model}); "
                f"got {size}",
            )


def device_problem(device: str) -> str | None:
    """Why `device` cannot run the benchmark here, or None if it can."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        return f"unknown device {device!r}: use cpu, cuda, cuda:N or mps"
    if parsed.type == "cpu":
        return None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            return f"{device} asked for, but CUDA is not available to this torch {torch.__version__}: use cpu"
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            return f"{device} asked for, but there are {count} CUDA devices (cuda:0 to cuda:{count - 1})"
        return None
    if parsed.type == "mps":
        if not torch.backends.mps.is_available():
            return f"{device} asked for, but MPS is not available here: use cpu"
        return None
    backend = getattr(torch, parsed.type, None)  # xpu and other accelerators with a torch.<type> module
    if backend is not None and getattr(backend, "is_available", lambda: False)():
        return None
    return f"device {device!r} is not available here: use cpu, cuda, cuda:N or mps"


def attn_implementation_problem(attn_implementation: str) -> str | None:
    """Why transformers cannot build the models with `attn_implementation` here (unknown name, kernel package not
    installed), or None if it can. Asks transformers itself, on a one-layer model without memory (meta device)."""
    config = dict(
        hidden_size=4, num_hidden_layers=1, num_attention_heads=1, intermediate_size=4, image_size=4, patch_size=4
    )
    import torch

    stock_config_class, stock_class, evit_config_class, evit_class = next(iter(_tables()["FAMILY_CLASSES"].values()))
    try:
        with torch.device("meta"):
            stock_class(stock_config_class(**config, attn_implementation=attn_implementation))
            evit_class(evit_config_class(**config, attn_implementation=attn_implementation))
    except (ValueError, ImportError, OSError, RuntimeError) as error:
        return f"cannot use {attn_implementation!r}: {one_line(error)}"
    return None


def model_config_settings(model: str, image_size: int) -> dict:
    """Keyword arguments of the configuration of a named shape at `image_size`."""
    return dict(
        dict(patch_size=16, num_labels=1000, layer_norm_eps=1e-6), **_tables()["SHAPES"][model], image_size=image_size
    )


def folder_config(model: str, image_size: int):
    """A checkpoint folder's configuration (its stock model named in `architectures`), at `image_size`."""
    folder_model = read_folder_model(model)
    config = copy.deepcopy(folder_model.config)
    vision_config_of(config).image_size = image_size
    return config


def macs_config(model: str, image_size: int):
    """The configuration of the benchmarked model, naming its architecture (its head, for `count_macs`): the EViT
    configuration of a named shape; a folder's own, which counts as EViT with its (or the paper's) reduction layers."""
    if not is_shape_name(model):
        return folder_config(model, image_size)
    _, _, evit_config_class, evit_class = shape_classes(model)
    return evit_config_class(**model_config_settings(model, image_size), architectures=[evit_class.__name__])


def benchmarked_reduction_layers(model: str, image_size: int) -> list[int]:
    """The reduction layers of the benchmarked EViT model: its configuration's, or the paper's for a stock folder (as
    `apply_evit` chooses them)."""
    from .configuration_evit_base import default_reduction_layers

    config = macs_config(model, image_size)
    vision_config = vision_config_of(config)
    layers = getattr(vision_config, "reduction_layers", None)
    return list(layers) if layers is not None else default_reduction_layers(vision_config.num_hidden_layers)


def layer_profiles_supported(model: str) -> bool:
    """Whether the overhead profile and the backend comparison, which read the layers of the first family's models
    (ViT), can run on `model`."""
    return model_family(model) == next(iter(_tables()["FAMILY_CLASSES"]))


__all__ = [
    "DTYPE_NAMES",
    "TABLE_NAMES",
    "BenchmarkSettings",
    "FolderModel",
    "InvalidBenchmarkSetting",
    "attn_implementation_problem",
    "benchmarked_reduction_layers",
    "benchmarked_stock_class",
    "check_image_sizes",
    "config_shape_problem",
    "device_problem",
    "folder_config",
    "is_shape_name",
    "layer_profiles_supported",
    "macs_config",
    "model_config_settings",
    "model_family",
    "model_patch_size",
    "read_folder_model",
    "shape_classes",
    "shape_names",
    "torch_dtype",
]
