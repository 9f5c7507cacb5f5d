"""`evit-hf benchmark`: the speed of EViT against the stock transformers model with the same weights, in one process.
Its options are parsed here, without torch; `evit_hf.benchmark` runs it."""

import argparse
import json

from ..messages import one_line
from .arguments import image_size_argument, per_layer_keep_rate_argument, whole_number_at_least, yes_no_argument
from .output_checks import check_output_apart_from_inputs, take_output_folder


SUMMARY = "time EViT against the stock model"
DESCRIPTION = """Speed of EViT against the stock transformers model with the same weights, in one process.

    evit-hf benchmark --model deit-small --batch-sizes 32 --keep-rates 0.9 0.8 0.7 0.6 0.5 --output-dir outputs/bench

Models run in alternation (one call of each per round, after a warm-up), so that drifts of the machine hit every model
alike; each row reports the median and the spread of its rounds, images/s, latency, peak memory, and its speed-up over
the stock model next to the MACs ratio (the bound for a speed-up that comes from doing less arithmetic). The
small-batch report gives, per model and keep rate, the smallest batch size measured at which EViT reaches 95% of its
MACs ratio.
--model is a named shape (deit-small, clip-vit-b16, dinov2-small, ...) or a checkpoint folder of any supported family.
"""
# The description holds a command line and its own line breaks: shown as written.
FORMATTER = argparse.RawDescriptionHelpFormatter


def add_arguments(parser) -> None:
    """The options of `evit-hf benchmark`; every type and choice is checked here, without torch."""
    from ..benchmark import DTYPE_NAMES, BenchmarkSettings

    defaults = BenchmarkSettings.__dataclass_fields__

    def default(name):
        return defaults[name].default_factory() if callable(defaults[name].default_factory) else defaults[name].default

    parser.add_argument("--model", default=default("model"), help="a named shape, or a checkpoint folder")
    parser.add_argument(
        "--keep-rates",
        type=per_layer_keep_rate_argument,
        nargs="+",
        default=default("keep_rates"),
        help='keep rates in (0, 1]; "0.9/0.7/0.5" is one rate per reduction layer',
    )
    parser.add_argument(
        "--batch-sizes", type=whole_number_at_least(1, "a batch size"), nargs="+", default=default("batch_sizes")
    )
    parser.add_argument("--image-sizes", type=image_size_argument, nargs="+", default=default("image_sizes"))
    parser.add_argument("--attn-implementations", nargs="+", default=default("attn_implementations"))
    parser.add_argument("--dtypes", nargs="+", default=default("dtypes"), choices=DTYPE_NAMES)
    parser.add_argument("--devices", nargs="+", default=default("devices"))
    parser.add_argument(
        "--compile", type=yes_no_argument, nargs="+", default=default("compiled"), help="no and/or yes"
    )
    parser.add_argument("--modes", nargs="+", default=default("modes"), choices=["inference", "train"])
    parser.add_argument(
        "--warmup", type=whole_number_at_least(0, "the number of warm-up rounds"), default=default("warmup")
    )
    parser.add_argument(
        "--rounds", type=whole_number_at_least(1, "the number of timed rounds"), default=default("rounds")
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--resolutions", type=image_size_argument, nargs="*", default=None,
                        help="also compare EViT at these sizes with the stock model at 224 px")  # fmt: skip
    parser.add_argument("--overhead", action="store_true", help="also profile the reorganization's share")
    parser.add_argument("--backend-difference", action="store_true", help="also compare eager and SDPA logits")
    parser.add_argument("--output-dir", default=None, help="write benchmark.json, benchmark.md and benchmark.png")
    parser.add_argument("--no-progress", action="store_true")


def run(parser, args, argv) -> dict:
    """`evit-hf benchmark` once argparse has checked the flags, types and choices (before torch loads)."""
    if args.output_dir is not None and not args.output_dir:
        parser.error("argument --output-dir: give a folder name (an empty one writes nowhere)")

    from .. import benchmark as benchmark_library
    from .. import vision_language_benchmark

    vision_language = vision_language_benchmark.is_vision_language_shape(args.model)
    settings = None
    if vision_language:
        vision_language_benchmark.check_options(parser, args, argv)
    else:
        settings = _checked_settings(parser, args)
    output_folder = None
    if args.output_dir is not None:
        problem = benchmark_library.output_dir_problem(args.output_dir)
        if problem:
            parser.error(f"argument --output-dir: {problem}")
        check_output_apart_from_inputs(parser, "--output-dir", args.output_dir, [("--model", args.model)])
        # Its files, in a folder that may hold others: each must be new or an earlier benchmark's.
        output_folder = take_output_folder(
            parser, "--output-dir", args.output_dir, benchmark_library.OUTPUT_FILES, shared=True
        )
    try:
        if vision_language:
            return vision_language_benchmark.run_command(args)
        return _run_benchmark(parser, args, settings)
    finally:
        if output_folder is not None:
            output_folder.release()


def _checked_settings(parser, args):
    """The `BenchmarkSettings` of the flags: the checks that need torch or the model's configuration, before any
    model is built."""
    from .. import benchmark as benchmark_library

    try:
        settings = benchmark_library.BenchmarkSettings(
            model=args.model,
            keep_rates=args.keep_rates,
            batch_sizes=args.batch_sizes,
            image_sizes=args.image_sizes,
            attn_implementations=args.attn_implementations,
            dtypes=args.dtypes,
            devices=args.devices,
            compiled=args.compile,
            modes=args.modes,
            warmup=args.warmup,
            rounds=args.rounds,
            measure_memory=not args.no_memory,
        )
        if args.resolutions:
            benchmark_library.check_image_sizes(
                args.resolutions, benchmark_library.model_patch_size(args.model), args.model, "resolutions"
            )
        for option, asked in (("overhead", args.overhead), ("backend_difference", args.backend_difference)):
            if asked and not benchmark_library.layer_profiles_supported(args.model):
                raise benchmark_library.InvalidBenchmarkSetting(
                    option, f"measures ViT shapes only; {args.model} is not one"
                )
    except benchmark_library.InvalidBenchmarkSetting as error:
        parser.error(f"argument {error.option}: {error.problem}")
    return settings


def _run_benchmark(parser, args, settings) -> dict:
    """`evit-hf benchmark` once its settings are checked and its output folder is held."""
    from .. import benchmark as benchmark_library

    try:
        results = benchmark_library.run_benchmark(settings, progress=not args.no_progress)
        if args.resolutions:
            results["resolutions"] = benchmark_library.resolution_comparison(
                args.model, image_sizes=args.resolutions, rounds=args.rounds
            )
        if args.overhead:
            results["overhead"] = benchmark_library.reorganization_overhead(args.model, batch_size=args.batch_sizes[0])
        if args.backend_difference:
            results["backend_difference"] = benchmark_library.max_logit_difference_between_backends(args.model)
    except RuntimeError as error:  # torch.OutOfMemoryError is one; CPU allocation failures are plain RuntimeErrors
        if not benchmark_library.is_out_of_memory(error):
            raise
        parser.error(
            f"out of memory with batch sizes {', '.join(map(str, args.batch_sizes))} and image sizes "
            f"{', '.join(map(str, args.image_sizes))}: give smaller --batch-sizes or --image-sizes ({one_line(error)})"
        )
    print(benchmark_library.results_markdown(results))
    for key in ("resolutions", "overhead", "backend_difference"):
        if key in results:
            print(json.dumps({key: results[key]}, indent=1))
    if args.output_dir:
        benchmark_library.write_benchmark_files(results, args.output_dir)
    return results
