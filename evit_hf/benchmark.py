"""Speed of EViT against the stock transformers model with the same weights, measured in one process: the library
behind `evit-hf benchmark` (whose options `cli.py` parses), taking plain values.

    settings = BenchmarkSettings(model="deit-small", batch_sizes=[1, 4, 32], keep_rates=[0.7, 0.5])
    results = run_benchmark(settings)  # {"environment", "settings", "rows", "small_batches"}
    write_benchmark_files(results, "outputs/bench")

Models run in alternation (one call of each per round, after a warm-up), so that drifts of the machine hit every model
alike; each row reports the median and the spread of its rounds, images/s, latency, peak memory, and its speed-up over
the stock model next to the MACs ratio (the bound for a speed-up that comes from doing less arithmetic). The
small-batch report (`smallest_batches_at_bound`) gives, per model and keep rate, the smallest batch size measured at
which EViT reaches `BOUND_SHARE` (95%) of its MACs ratio.
"""

import copy
import ctypes
import functools
import gc
import importlib.util
import inspect
import itertools
import json
import math
import multiprocessing
import os
import statistics
import time
from dataclasses import asdict, dataclass, field

from .configuration_evit_base import format_keep_rate, vision_config_of
from .messages import one_line, writable_folder_problem


# torch, transformers and the family table (which imports every family's models) load on first use, not at import:
# `evit-hf` imports this module to read its defaults and checks its arguments before torch loads.
DTYPE_NAMES = ("float32", "bfloat16", "float16")
# A row whose speed-up is this share of its MACs ratio or more has reached the bound (the small-batch report).
BOUND_SHARE = 0.95


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
    if name in ("SHAPES", "FAMILY_CLASSES", "SHAPE_FAMILIES", "DTYPES"):
        return _tables()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def shape_names() -> list[str]:
    """The named shapes `--model` takes (besides checkpoint folders)."""
    return list(_tables()["SHAPES"])


def _torch_dtype(dtype):
    """A torch dtype from its name (or the dtype itself)."""
    return _tables()["DTYPES"][dtype] if isinstance(dtype, str) else dtype


def is_shape_name(model: str) -> bool:
    return model in _tables()["SHAPES"]


def model_family(model: str) -> str:
    """The family name of a named shape or of a checkpoint folder."""
    if is_shape_name(model):
        return _tables()["SHAPE_FAMILIES"][model]
    return _folder_model(model).family.name


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
            # One rate, or one per reduction layer (a list, in ascending layer order).
            for rate in keep_rate if isinstance(keep_rate, (list, tuple)) and keep_rate else [keep_rate]:
                if not _is_number(rate) or not math.isfinite(rate) or not 0 < rate <= 1:
                    raise InvalidBenchmarkSetting(
                        "keep_rates",
                        f"a keep rate is the share of tokens each reduction layer keeps, in (0, 1]; got {keep_rate}",
                    )
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
            from .configuration_evit_base import check_keep_rate

            layers = benchmarked_reduction_layers(self.model, self.image_sizes[0])
            for keep_rate in per_layer:
                try:
                    check_keep_rate(keep_rate, layers)
                except ValueError as error:
                    raise InvalidBenchmarkSetting("keep_rates", str(error).rstrip(".")) from None
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


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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


def _folder_model(folder: str) -> FolderModel:
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
    folder_model = _folder_model(model)
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
        return _tables()["FAMILY_CLASSES"][model_family(model)][1]
    return _folder_model(model).stock_class


def _takes_labels(model_class: type) -> bool:
    """Whether the model computes a loss (a training step needs one)."""
    return "labels" in inspect.signature(model_class.forward).parameters


def _takes_text(model) -> bool:
    """Whether the model has a text tower too (CLIP-style): the benchmark then times its image features only."""
    return hasattr(model, "get_image_features") and hasattr(model, "get_text_features")


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
    folder_model = _folder_model(model)
    config = copy.deepcopy(folder_model.config)
    vision_config_of(config).image_size = image_size
    return config


def build_models(
    model: str = "deit-small",
    image_size: int = 224,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    dtype="float32",
    device: str = "cpu",
):
    """A stock model and its EViT model of the same shape and weights, in eval mode. A named shape builds its
    family's benchmark model (`ViTForImageClassification`, `CLIPVisionModelWithProjection`, ...); a checkpoint folder
    of any family builds the model its configuration names, with random weights, and its EViT conversion. `dtype` is
    a name of `DTYPE_NAMES` or a torch dtype."""
    import torch

    from .patch import apply_evit

    dtype = _torch_dtype(dtype)
    torch.manual_seed(seed)
    if is_shape_name(model):
        settings = model_config_settings(model, image_size)
        stock_config_class, stock_class, evit_config_class, evit_class = _tables()["FAMILY_CLASSES"][
            model_family(model)
        ]
        stock = stock_class(stock_config_class(**settings, attn_implementation=attn_implementation))
        evit = evit_class(evit_config_class(**settings, attn_implementation=attn_implementation))
        evit.load_state_dict(stock.state_dict())
    else:
        stock_class = _folder_model(model).stock_class
        stock = stock_class._from_config(folder_config(model, image_size), attn_implementation=attn_implementation)
        # The conversion the EViT constructors run, on a copy: the same weights by construction.
        evit = apply_evit(copy.deepcopy(stock))
    return stock.to(device, dtype).eval(), evit.to(device, dtype).eval()


def _synchronize(device: str) -> None:
    """Waits for the device's queued work, so that a timing covers the computation and not just its launch."""
    import torch

    device_type = torch.device(device).type
    if device_type != "cpu":
        getattr(torch, device_type).synchronize()


def _step_function(model, pixel_values, labels, mode: str, keep_rate):
    """One inference call, or one training step (forward, backward, optimizer step), of `model`. A model with a text
    tower too runs its image features: the text tower runs once per text, not per image."""
    import torch

    arguments = {} if keep_rate is None else {"keep_rate": keep_rate}
    if mode == "inference":
        forward = model.get_image_features if _takes_text(model) else model

        def step():
            with torch.inference_mode():
                return forward(pixel_values, **arguments)

        return step
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(pixel_values, labels=labels, **arguments).loss.backward()
        optimizer.step()

    return step


def _resident_memory() -> tuple[int, int]:
    """(current, peak) resident memory of this process in bytes, from /proc (Linux)."""
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, amount, _ = line.split()
                values[name] = int(amount) * 1024
    return values["VmRSS:"], values["VmHWM:"]


def _measure_cpu_peak_memories(queue, model, image_size, attn_implementation, dtype, mode, batch_size, keep_rates):
    """In a fresh process: for each keep rate (None: the stock model), how far one step raises the resident memory."""
    import torch

    stock, evit = build_models(model, image_size, attn_implementation, 0, dtype)
    pixel_values = torch.randn(batch_size, 3, image_size, image_size, dtype=_torch_dtype(dtype))
    labels = torch.zeros(batch_size, dtype=torch.long)
    peaks = []
    for keep_rate in keep_rates:
        chosen = stock if keep_rate is None else evit
        chosen.train(mode == "train")
        step = _step_function(chosen, pixel_values, labels, mode, keep_rate)
        step()  # the optimizer's state exists from here on
        del step  # ...and goes with it, before the next model is measured
        step = _step_function(chosen, pixel_values, labels, mode, keep_rate)
        step()
        gc.collect()
        try:  # hand freed memory back to the system, so that the measured step has to take it again
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets the peak (VmHWM) to the current resident memory
        before, _ = _resident_memory()
        step()
        peaks.append(_resident_memory()[1] - before)
        del step
    queue.put(peaks)


def _cpu_peak_memories(group: dict, keep_rates: list, settings) -> list[int]:
    """Peak memory one step of each model adds on CPU, measured in one fresh process (nothing else allocated)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(
        target=_measure_cpu_peak_memories,
        args=(queue, settings.model, group["image_size"], group["attn_implementation"], group["dtype"],
              group["mode"], group["batch_size"], keep_rates),
    )  # fmt: skip
    process.start()
    peaks = queue.get(timeout=1800)
    process.join()
    return peaks


def _cuda_peak_memory(step) -> int:
    """Peak memory one step adds, from CUDA's allocator statistics."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - baseline


def run_benchmark(settings: BenchmarkSettings, progress: bool = True) -> dict:
    """Measures every combination in `settings`. Returns {"environment": ..., "settings": ..., "rows": [...],
    "small_batches": [...]} (`smallest_batches_at_bound` of the rows)."""
    import torch
    from tqdm.auto import tqdm

    groups = [
        dict(zip(("batch_size", "image_size", "attn_implementation", "dtype", "device", "compiled", "mode"), values,
                 strict=True))
        for values in itertools.product(
            settings.batch_sizes, settings.image_sizes, settings.attn_implementations, settings.dtypes,
            settings.devices, settings.compiled, settings.modes,
        )
    ]  # fmt: skip
    rows = []
    bar = tqdm(total=len(groups) * (settings.warmup + settings.rounds), disable=not progress, desc="benchmark")
    for group in groups:
        rows += _run_group(settings, group, bar)
    bar.close()
    environment = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return {
        "environment": environment,
        "settings": asdict(settings),
        "rows": rows,
        "small_batches": smallest_batches_at_bound(rows),
    }


def _run_group(settings: BenchmarkSettings, group: dict, bar) -> list[dict]:
    import torch

    from .macs import count_macs

    device, dtype, mode = group["device"], _torch_dtype(group["dtype"]), group["mode"]
    batch_size, image_size = group["batch_size"], group["image_size"]
    stock, evit = build_models(settings.model, image_size, group["attn_implementation"], settings.seed, dtype, device)
    if mode == "train":
        stock.train()
        evit.train()
    if group["compiled"]:
        # One static graph per keep rate: by default a second keep rate would make dynamo trace it as a symbolic
        # float, which breaks the graph at the keep-rate check.
        stock, evit = torch.compile(stock, dynamic=False), torch.compile(evit, dynamic=False)
    generator = torch.Generator().manual_seed(settings.seed)
    pixel_values = torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(device, dtype)
    # Labels within the head (a checkpoint folder may have any number of classes): the loss of a training step.
    labels = torch.randint(0, stock.config.num_labels, (batch_size,), generator=generator).to(device)

    variants = [("stock", None, stock)] + [("evit", keep_rate, evit) for keep_rate in settings.keep_rates]
    steps = [_step_function(model, pixel_values, labels, mode, keep_rate) for _, keep_rate, model in variants]
    timings = [[] for _ in variants]
    for round_index in range(settings.warmup + settings.rounds):
        for index, step in enumerate(steps):
            _synchronize(device)
            start = time.perf_counter()
            step()
            _synchronize(device)
            if round_index >= settings.warmup:
                timings[index].append(time.perf_counter() - start)
        bar.update(1)

    config = macs_config(settings.model, image_size)
    stock_macs = count_macs(config, image_size=image_size, keep_rate=1.0)
    stock_median = statistics.median(timings[0])
    peaks = [None] * len(variants)
    device_type = torch.device(device).type
    # Peak memory is read from CUDA's allocator or from the resident memory of a CPU process; other devices have none.
    if settings.measure_memory and not group["compiled"]:
        if device_type == "cuda":
            peaks = [_cuda_peak_memory(step) for step in steps]
        elif device_type == "cpu":
            peaks = _cpu_peak_memories(group, [keep_rate for _, keep_rate, _ in variants], settings)
    rows = []
    for (variant, keep_rate, _), seconds, peak in zip(variants, timings, peaks, strict=True):
        median = statistics.median(seconds)
        macs = count_macs(config, image_size=image_size, keep_rate=keep_rate or 1.0)
        speedup = stock_median / median
        rows.append(
            dict(
                group,
                model=settings.model,
                variant=variant,
                keep_rate=keep_rate,
                images_per_s=batch_size / median,
                images_per_s_min=batch_size / max(seconds),
                images_per_s_max=batch_size / min(seconds),
                latency_ms=1000 * median,
                peak_memory_mb=None if peak is None else peak / 2**20,
                speedup=speedup,
                macs=macs,
                macs_ratio=stock_macs / macs,
                speedup_over_macs_ratio=speedup / (stock_macs / macs),
            )
        )
    return rows


def benchmarked_reduction_layers(model: str, image_size: int) -> list[int]:
    """The reduction layers of the benchmarked EViT model: its configuration's, or the paper's for a stock folder (as
    `apply_evit` chooses them)."""
    from .configuration_evit_base import default_reduction_layers

    config = macs_config(model, image_size)
    vision_config = vision_config_of(config)
    layers = getattr(vision_config, "reduction_layers", None)
    return list(layers) if layers is not None else default_reduction_layers(vision_config.num_hidden_layers)


def _key(value):
    """A row value usable in a set or as a key: a per-layer keep rate (a list) as a tuple."""
    return tuple(value) if isinstance(value, list) else value


def _mean_keep_rate(keep_rate) -> float:
    """Where a per-layer keep rate sits on a keep-rate axis: the mean of its rates."""
    return sum(keep_rate) / len(keep_rate) if isinstance(keep_rate, list) else keep_rate


def macs_config(model: str, image_size: int):
    """The configuration of the benchmarked model, naming its architecture (its head, for `count_macs`): the EViT
    configuration of a named shape; a folder's own, which counts as EViT with its (or the paper's) reduction layers."""
    if not is_shape_name(model):
        return folder_config(model, image_size)
    _, _, evit_config_class, evit_class = _tables()["FAMILY_CLASSES"][model_family(model)]
    return evit_config_class(**model_config_settings(model, image_size), architectures=[evit_class.__name__])


def resolution_comparison(
    model: str = "deit-small",
    keep_rate: float = 0.7,
    image_sizes=(256, 288),
    reference_image_size: int = 224,
    batch_size: int = 32,
    attn_implementation: str = "sdpa",
    rounds: int = 10,
    warmup: int = 3,
) -> list[dict]:
    """EViT at larger inputs against the stock model at `reference_image_size` (the paper's "more tokens for the same
    cost"): images/s and MACs of each, alternating in one process."""
    import torch

    from .macs import count_macs

    stock, _ = build_models(model, reference_image_size, attn_implementation)
    runners = {("stock", reference_image_size): (stock, reference_image_size, None)}
    for size in image_sizes:
        _, evit = build_models(model, size, attn_implementation)
        runners[("evit", size)] = (evit, size, keep_rate)
    inputs = {size: torch.randn(batch_size, 3, size, size) for _, size, _ in runners.values()}
    timings = {key: [] for key in runners}
    with torch.inference_mode():
        for round_index in range(warmup + rounds):
            for key, (net, size, rate) in runners.items():
                start = time.perf_counter()
                net(inputs[size]) if rate is None else net(inputs[size], keep_rate=rate)
                if round_index >= warmup:
                    timings[key].append(time.perf_counter() - start)
    reference = statistics.median(timings[("stock", reference_image_size)])
    reference_macs = count_macs(macs_config(model, reference_image_size), keep_rate=1.0)
    rows = []
    for (variant, size), seconds in timings.items():
        net, _, rate = runners[(variant, size)]
        macs = count_macs(macs_config(model, size), keep_rate=rate or 1.0)
        rows.append(
            dict(
                variant=variant,
                image_size=size,
                keep_rate=rate,
                images_per_s=batch_size / statistics.median(seconds),
                speed_relative_to_stock_at_reference=reference / statistics.median(seconds),
                macs=macs,
                macs_relative_to_stock_at_reference=macs / reference_macs,
            )
        )
    return rows


def reorganization_overhead(
    model: str = "deit-small", keep_rate: float = 0.7, batch_size: int = 32, image_size: int = 224, rounds: int = 10
) -> dict:
    """The share of an EViT forward spent reorganizing tokens: class-token attention row, scoring, top-k, gathering,
    fusion and position tracking, timed on the real tensors of each reduction layer, against the whole forward."""
    import torch

    from .token_reorganization import class_token_attention, reorganize_tokens, track_token_positions

    _, evit = build_models(model, image_size)
    pixel_values = torch.randn(batch_size, 3, image_size, image_size)
    captured = {}

    def capture(layer_index):
        def hook(module, args, kwargs, output):
            if kwargs.get("num_keep") is not None:
                captured[layer_index] = (args[0], kwargs["num_keep"])

        return hook

    handles = [
        layer.register_forward_hook(capture(index), with_kwargs=True) for index, layer in enumerate(evit.vit.layers)
    ]
    with torch.inference_mode():
        evit(pixel_values, keep_rate=keep_rate)
    for handle in handles:
        handle.remove()

    # Inputs of the reorganization in each reduction layer: queries, keys and the post-attention tokens.
    cases = []
    with torch.inference_mode():
        for index, (layer_input, num_keep) in sorted(captured.items()):
            attention = evit.vit.layers[index].attention
            hidden = evit.vit.layers[index].layernorm_before(layer_input)
            shape = (*hidden.shape[:-1], -1, attention.head_dim)
            query = attention.q_proj(hidden).view(shape).transpose(1, 2)
            key = attention.k_proj(hidden).view(shape).transpose(1, 2)
            positions = torch.arange(layer_input.shape[1] - 1).expand(batch_size, -1)
            cases.append((query, key, layer_input, num_keep, positions, attention.scaling))

    def reorganize_all():
        for query, key, tokens, num_keep, positions, scaling in cases:
            class_attention = class_token_attention(query, key, scaling)
            _, kept = reorganize_tokens(tokens, class_attention, 1, num_keep, fuse=True)
            track_token_positions(positions, kept, fused=True)

    forward_times, reorganize_times = [], []
    with torch.inference_mode():
        for round_index in range(rounds + 2):
            start = time.perf_counter()
            evit(pixel_values, keep_rate=keep_rate)
            middle = time.perf_counter()
            reorganize_all()
            end = time.perf_counter()
            if round_index >= 2:
                forward_times.append(middle - start)
                reorganize_times.append(end - middle)
    forward, reorganization = statistics.median(forward_times), statistics.median(reorganize_times)
    return {
        "model": model,
        "keep_rate": keep_rate,
        "batch_size": batch_size,
        "forward_ms": 1000 * forward,
        "reorganization_ms": 1000 * reorganization,
        "share": reorganization / forward,
    }


def markdown_table(rows: list[dict]) -> str:
    columns = ["mode", "device", "dtype", "compiled", "batch_size", "image_size", "variant", "keep_rate"]
    columns += ["images_per_s", "latency_ms", "peak_memory_mb", "speedup", "macs_ratio", "speedup_over_macs_ratio"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            if isinstance(value, float):
                cells.append(
                    f"{value:.3f}"
                    if column in ("speedup", "macs_ratio", "speedup_over_macs_ratio")
                    else f"{value:.1f}"
                )
            elif column == "keep_rate" and isinstance(value, list):
                cells.append(format_keep_rate(value))
            else:
                cells.append("" if value is None else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_speedups(rows: list[dict], path: str) -> None:
    """Speed-up over the stock model against keep rate, one line per setting, with the MACs bound dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    series = {}
    for row in rows:
        if row["variant"] != "evit":
            continue
        label = f"{row['mode']} {row['device']} {row['dtype']} bs{row['batch_size']} {row['image_size']}px"
        label += " compiled" if row["compiled"] else ""
        series.setdefault(label, []).append(row)
    for label, points in series.items():
        points.sort(key=lambda row: -_mean_keep_rate(row["keep_rate"]))
        axis.plot(
            [_mean_keep_rate(p["keep_rate"]) for p in points], [p["speedup"] for p in points], marker="o", label=label
        )
    bound = sorted(
        {(_mean_keep_rate(row["keep_rate"]), row["macs_ratio"]) for row in rows if row["variant"] == "evit"},
        reverse=True,
    )
    axis.plot([k for k, _ in bound], [r for _, r in bound], linestyle="--", color="grey", label="MACs bound")
    axis.set_xlabel("keep rate (per-layer rates: their mean)")
    axis.set_ylabel("speed-up over the stock model")
    axis.invert_xaxis()
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def max_logit_difference_between_backends(
    model: str = "deit-small", keep_rate: float = 0.7, batch_size: int = 8, seed: int = 0
) -> dict:
    """Largest |logit difference| of EViT with eager against SDPA attention, same weights and inputs."""
    import torch

    _, eager = build_models(model, attn_implementation="eager", seed=seed)
    _, sdpa = build_models(model, attn_implementation="sdpa", seed=seed)
    pixel_values = torch.randn(batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        a, b = eager(pixel_values, keep_rate=keep_rate), sdpa(pixel_values, keep_rate=keep_rate)
    same_tokens = all(torch.equal(x, y) for x, y in zip(a.kept_token_indices, b.kept_token_indices, strict=True))
    return {
        "model": model,
        "keep_rate": keep_rate,
        "max_abs_logit_difference": float((a.logits - b.logits).abs().max()),
        "max_abs_logit": float(a.logits.abs().max()),
        "same_kept_tokens": same_tokens,
    }


OUTPUT_FILES = ("benchmark.json", "benchmark.md", "benchmark.png")


def output_dir_problem(output_dir: str) -> str | None:
    """Why the benchmark could not write its files into `output_dir` once it has run, or None if it can."""
    if not output_dir:
        return "give a folder name (an empty one writes nowhere)"
    problem = writable_folder_problem(output_dir)
    if problem:
        return f"cannot write into {output_dir}: {problem}"
    for name in OUTPUT_FILES:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) or (os.path.exists(path) and not os.access(path, os.W_OK)):
            return f"cannot write {path}: it is a folder or not writable"
    if importlib.util.find_spec("matplotlib") is None:
        return "drawing benchmark.png needs matplotlib: pip install matplotlib (or leave out --output-dir)"
    return None


NOT_REACHED = "not reached"
# The settings that make one small-batch entry: every row setting but the batch size.
_SMALL_BATCH_KEYS = ("model", "mode", "device", "dtype", "compiled", "image_size", "attn_implementation", "keep_rate")


def smallest_batches_at_bound(rows: list[dict], share: float = BOUND_SHARE) -> list[dict]:
    """Per model and keep rate (and each other setting but the batch size): the smallest measured batch size at which
    EViT's speed-up reaches `share` of its MACs ratio, or `NOT_REACHED` where no measured batch size does."""
    entries = {}
    for row in rows:
        if row["variant"] != "evit":
            continue
        key = tuple(_key(row[name]) for name in _SMALL_BATCH_KEYS)
        entry = entries.setdefault(
            key,
            {**{name: row[name] for name in _SMALL_BATCH_KEYS}, "macs_ratio": row["macs_ratio"],
             "speedup_over_macs_ratio": {}},
        )  # fmt: skip
        entry["speedup_over_macs_ratio"][row["batch_size"]] = row["speedup_over_macs_ratio"]
    for entry in entries.values():
        reached = sorted(size for size, ratio in entry["speedup_over_macs_ratio"].items() if ratio >= share)
        entry["smallest_batch_size"] = reached[0] if reached else NOT_REACHED
        entry["bound_share"] = share
    return list(entries.values())


def small_batch_markdown(entries: list[dict]) -> str:
    """The small-batch report as a markdown table: one line per model and keep rate (and other setting)."""
    share = f"{entries[0]['bound_share']:.0%}" if entries else f"{BOUND_SHARE:.0%}"
    columns = [*_SMALL_BATCH_KEYS, "macs_ratio", f"smallest batch size at {share} of the MACs ratio"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for entry in entries:
        cells = [
            format_keep_rate(entry[name]) if isinstance(entry[name], list) else str(entry[name])
            for name in _SMALL_BATCH_KEYS
        ]
        cells += [f"{entry['macs_ratio']:.3f}", str(entry["smallest_batch_size"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_markdown(results: dict) -> str:
    """The rows' table and the small-batch report, as `evit-hf benchmark` prints them and writes benchmark.md."""
    return markdown_table(results["rows"]) + "\n\n" + small_batch_markdown(results["small_batches"])


def write_benchmark_files(results: dict, output_dir: str) -> None:
    """benchmark.json (everything), benchmark.md (`results_markdown`) and benchmark.png (`plot_speedups`)."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "benchmark.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    with open(os.path.join(output_dir, "benchmark.md"), "w") as handle:
        handle.write(results_markdown(results) + "\n")
    plot_speedups(results["rows"], os.path.join(output_dir, "benchmark.png"))


def is_out_of_memory(error: BaseException) -> bool:
    """Whether a run failed for memory: torch's `OutOfMemoryError`, or a CPU allocation failure (a `RuntimeError`)."""
    import torch

    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )


def layer_profiles_supported(model: str) -> bool:
    """Whether the overhead profile and the backend comparison, which read the layers of the first family's models
    (ViT), can run on `model`."""
    return model_family(model) == next(iter(_tables()["FAMILY_CLASSES"]))


__all__ = [
    "BOUND_SHARE",
    "DTYPE_NAMES",
    "NOT_REACHED",
    "BenchmarkSettings",
    "FolderModel",
    "InvalidBenchmarkSetting",
    "build_models",
    "check_image_sizes",
    "is_out_of_memory",
    "layer_profiles_supported",
    "macs_config",
    "markdown_table",
    "max_logit_difference_between_backends",
    "model_patch_size",
    "output_dir_problem",
    "reorganization_overhead",
    "resolution_comparison",
    "results_markdown",
    "run_benchmark",
    "shape_names",
    "small_batch_markdown",
    "smallest_batches_at_bound",
    "write_benchmark_files",
]
