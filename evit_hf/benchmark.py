"""Speed of EViT against the stock transformers model with the same weights, measured in one process: the library
behind `evit-hf benchmark` (whose options `evit_hf/commands/benchmark.py` parses), taking plain values.

    settings = BenchmarkSettings(model="deit-small", batch_sizes=[1, 4, 32], keep_rates=[0.7, 0.5])
    results = run_benchmark(settings)  # {"environment", "settings", "rows", "small_batches"}
    write_benchmark_files(results, "outputs/bench")

Models run in alternation (one call of each per round, after a warm-up), so that drifts of the machine hit every model
alike; each row reports the median and the spread of its rounds, images/s, latency, peak memory, and its speed-up over
the stock model next to the MACs ratio (the bound for a speed-up that comes from doing less arithmetic). The
small-batch report (`smallest_batches_at_bound`) gives, per model and keep rate, the smallest batch size measured at
which EViT reaches `BOUND_SHARE` (95%) of its MACs ratio.

This module runs the benchmark (`run_benchmark`) and gathers the names of its three parts, so that one import serves:
`benchmark_settings.py` (what is measured, checked before any model is built), `benchmark_timing.py` (building the
models and timing them) and `benchmark_report.py` (tables, picture, small-batch report, files).
"""

import itertools
import os
from dataclasses import asdict

from . import benchmark_settings
from .benchmark_report import (
    BOUND_SHARE,
    NOT_REACHED,
    OUTPUT_FILES,
    markdown_table,
    output_dir_problem,
    plot_speedups,
    results_markdown,
    small_batch_markdown,
    smallest_batches_at_bound,
    write_benchmark_files,
)
from .benchmark_settings import (
    DTYPE_NAMES,
    TABLE_NAMES,
    BenchmarkSettings,
    FolderModel,
    InvalidBenchmarkSetting,
    attn_implementation_problem,
    benchmarked_reduction_layers,
    check_image_sizes,
    device_problem,
    layer_profiles_supported,
    macs_config,
    model_patch_size,
    shape_names,
)
from .benchmark_timing import (
    build_models,
    is_out_of_memory,
    max_logit_difference_between_backends,
    measure_group,
    reorganization_overhead,
    resolution_comparison,
)


def __getattr__(name: str):
    # SHAPES, FAMILY_CLASSES, SHAPE_FAMILIES, DTYPES: built on first use (they load torch and the family table).
    if name in TABLE_NAMES:
        return getattr(benchmark_settings, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    rounds_in_all = len(groups) * (settings.warmup + settings.rounds)
    progress_bar = tqdm(total=rounds_in_all, disable=not progress, desc="benchmark")
    for group in groups:
        rows += measure_group(settings, group, progress_bar)
    progress_bar.close()
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


__all__ = [
    "BOUND_SHARE",
    "DTYPE_NAMES",
    "NOT_REACHED",
    "OUTPUT_FILES",
    "BenchmarkSettings",
    "FolderModel",
    "InvalidBenchmarkSetting",
    "attn_implementation_problem",
    "benchmarked_reduction_layers",
    "build_models",
    "check_image_sizes",
    "device_problem",
    "is_out_of_memory",
    "layer_profiles_supported",
    "macs_config",
    "markdown_table",
    "max_logit_difference_between_backends",
    "model_patch_size",
    "output_dir_problem",
    "plot_speedups",
    "reorganization_overhead",
    "resolution_comparison",
    "results_markdown",
    "run_benchmark",
    "shape_names",
    "small_batch_markdown",
    "smallest_batches_at_bound",
    "write_benchmark_files",
]
