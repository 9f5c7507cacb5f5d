"""The `evit-hf` command: `evit-hf visualize`, `evit-hf benchmark`, `evit-hf convert` and `evit-hf calibrate`.

Every argument is checked before a model is built, and a bad one ends the command with argparse's one-line
`evit-hf COMMAND: error: ...` (exit status 2), never a traceback. Every command that writes follows the output policy
of `evit_hf.outputs`: it holds the lock on its output folder while it runs, writes nowhere near its inputs, and
overwrites only files that a run of this project wrote.
"""

import argparse
import json
import math
import os
import sys

from .configuration_evit_base import check_keep_rate, vision_config_of
from .messages import one_line, writable_folder_problem


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


def benchmark_keep_rate_argument(text: str) -> float | list[float]:
    """argparse type of a benchmarked keep rate: one number in (0, 1], or one per reduction layer joined by "/"
    ("0.9/0.7/0.5"), checked by `check_keep_rate`."""
    if "/" not in text:
        return keep_rate_argument(text)
    try:
        return check_keep_rate([_number(part.strip()) for part in text.split("/")])
    except ValueError as error:
        raise argparse.ArgumentTypeError(one_line(error).rstrip(".")) from None


def check_output_apart_from_inputs(parser, output_flag: str, output: str | None, inputs) -> None:
    """A parser error, naming both paths, when `output` is, lies inside or contains one of `inputs` (`(flag, path)`
    pairs): `evit_hf.outputs`' rule, before any work."""
    from .outputs import check_outputs_apart_from_inputs

    try:
        check_outputs_apart_from_inputs([(output_flag, output)], inputs)
    except ValueError as error:
        parser.error(one_line(error))


def take_output_folder(parser, flag: str, folder: str, files, overwrite: bool | None = None, shared: bool = False):
    """The `evit_hf.outputs.OutputFolder` of a command, acquired: its lock is held until `release()`; a folder that
    holds files no run of this project wrote (with `shared`, among `files`) is refused naming them. With `overwrite`
    False, a folder that holds an earlier run's files is refused too (the command's --overwrite replaces them);
    with None (a picture the command draws again), they are replaced."""
    from .outputs import OutputFolder

    output = OutputFolder(folder, flag, claims=files, shared=shared)
    try:
        output.acquire()
    except ValueError as error:  # in use by another run, files of the user's, an unreadable manifest
        parser.error(one_line(error))
    earlier = output.entries() if not shared else [name for name in output.entries() if name in files]
    if earlier and overwrite is False:
        output.release()
        parser.error(
            f"{flag} {folder} holds the files of an earlier run ({', '.join(earlier[:8])}"
            f"{' ...' if len(earlier) > 8 else ''}): pass --overwrite to replace them, or choose another {flag}"
        )
    return output


def read_image_argument(parser, flag: str, path: str):
    """The image file at `path`, decoded in full (a truncated file fails here, not after the model is built), upright
    and 8-bit RGB as in training and evaluation; a parser error naming `flag` for a file that is no readable image,
    a decompression bomb included."""
    from PIL import Image

    from .images import load_rgb_image

    try:
        return load_rgb_image(path)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        parser.error(f"argument {flag}: cannot read {path} as an image ({one_line(error)})")


def image_processor_argument(parser, model: str, config, image_processor: str | None):
    """The image processor given (`--image-processor`), else the checkpoint's own (a damaged one is an error, not a
    reason to fall back), else the default one for `config`."""
    from transformers import AutoImageProcessor

    from .visualization import load_image_processor_or_default

    if image_processor:
        if looks_like_path(image_processor) and not os.path.isdir(image_processor):
            parser.error(f"argument --image-processor: {image_processor} is not a folder")
        try:
            return AutoImageProcessor.from_pretrained(image_processor)
        except (OSError, ValueError) as error:
            parser.error(f"argument --image-processor: cannot load an image processor: {one_line(error)}")
    if os.path.isfile(os.path.join(model, "preprocessor_config.json")):
        try:
            return AutoImageProcessor.from_pretrained(model)
        except (OSError, ValueError) as error:
            parser.error(
                f"argument --model: cannot load the image processor in {model}: "
                f"{one_line(error).rstrip('.')}; repair its preprocessor_config.json or pass --image-processor"
            )
    return load_image_processor_or_default(model, config)


def processed_pixels(parser, processor, images, source: str, model: str, config):
    """`processor`'s pixel values `[images, channels, height, width]` of `images` (read from `source`); a parser error
    when the processor fails on them or makes pixels of another channel count than `model` takes."""
    try:
        pixel_values = processor(images=images, return_tensors="pt").pixel_values
    except (OSError, ValueError, TypeError) as error:
        parser.error(f"argument --image-processor: the image processor fails on {source}: {one_line(error)}")
    num_channels = vision_config_of(config).num_channels  # a two-tower model keeps it in its tower's
    if pixel_values.shape[1] != num_channels:
        parser.error(
            f"argument --image-processor: the image processor makes {pixel_values.shape[1]}-channel pixels, but "
            f"{model} takes {num_channels}; pass an --image-processor made for this model"
        )
    return pixel_values


def load_model_argument(parser, load, model: str):
    """`load(model)`, or a parser error: damaged weights (truncated, not safetensors) raise safetensors', torch's or
    transformers' own errors, which all become one line."""
    try:
        return load(model)
    except Exception as error:
        parser.error(f"argument --model: cannot load the model from {model}: {one_line(error)}")


# Picture formats that hold the whole RGB canvas as drawn (not icons, not 1-bit or palette-only formats).
PICTURE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".tga", ".pdf")


def picture_extensions() -> list[str]:
    """The `PICTURE_EXTENSIONS` that this PIL can write an RGB image as (WebP needs libwebp, for instance)."""
    import io

    from PIL import Image

    Image.init()
    writable = []
    for extension in PICTURE_EXTENSIONS:
        picture_format = Image.registered_extensions().get(extension)
        if picture_format is None or picture_format not in Image.SAVE:
            continue
        try:
            Image.new("RGB", (2, 2)).save(io.BytesIO(), format=picture_format)
        except (OSError, ValueError, KeyError):
            continue
        writable.append(extension)
    return writable


def visualize(argv) -> str:
    parser = argparse.ArgumentParser(
        prog="evit-hf visualize",
        description="Draw an image and, per reduction layer, the patches an EViT model keeps (the others greyed).",
    )
    parser.add_argument("--model", required=True, help="Hub id or folder of a checkpoint of any supported family.")
    parser.add_argument("--image", required=True, help="Image file.")
    parser.add_argument("--output", default="kept_tokens.png", help="Picture to write (PNG, JPEG, ...).")
    parser.add_argument(
        "--keep-rate", type=keep_rate_argument, default=None, help="Keep rate in (0, 1] (default: the checkpoint's)."
    )
    parser.add_argument(
        "--image-processor",
        default=None,
        help="Image processor, if not the checkpoint's (default: the checkpoint's; a ViTImageProcessor at the "
        "model's image size, mean/std 0.5, where the checkpoint has none).",
    )
    args = parser.parse_args(argv)

    # Cheap local checks first: a typo in --image or --output should not wait for a model to load.
    if not os.path.isfile(args.image):
        parser.error(f"argument --image: {args.image} does not exist or is not a file")
    check_output_apart_from_inputs(
        parser,
        "--output",
        args.output,
        [("--image", args.image), ("--model", args.model), ("--image-processor", args.image_processor)],
    )
    if os.path.isdir(args.output) or not os.path.basename(args.output):
        parser.error(f"argument --output: {args.output!r} is a folder; give a file name such as kept_tokens.png")
    extensions = picture_extensions()
    if os.path.splitext(args.output)[1].lower() not in extensions:
        parser.error(
            f"argument --output: cannot write a picture named {args.output!r}: give it one of the extensions "
            f"{', '.join(extensions)}"
        )
    problem = writable_folder_problem(os.path.dirname(args.output))
    if problem is None and os.path.exists(args.output) and not os.access(args.output, os.W_OK):
        problem = f"no permission to overwrite {args.output}"
    if problem:
        parser.error(f"argument --output: cannot write {args.output}: {problem}")
    # The picture goes into a folder of the user's: only its own name must be new or an earlier picture of ours.
    output_folder = take_output_folder(
        parser, "--output", os.path.dirname(args.output) or ".", [os.path.basename(args.output)], shared=True
    )
    try:
        _draw_kept_tokens(parser, args)
    finally:
        output_folder.release()
    print(f"wrote {args.output}")
    return args.output


def _draw_kept_tokens(parser, args) -> None:
    """`evit-hf visualize` once its output is held: the image, the model's checks, then the picture."""
    image = read_image_argument(parser, "--image", args.image)
    config = _load_config(parser, args.model)
    from .families import FAMILIES, family_for_model_type

    family = family_for_model_type(config.model_type)
    if family is None or family.kept_token_picture_model is None:
        drawn = [each for each in FAMILIES if each.kept_token_picture_model]
        names = ", ".join(each.display_name for each in drawn)
        model_types = ", ".join(repr(model_type) for each in drawn for model_type in each.model_types)
        parser.error(
            f"argument --model: {args.model} is a {config.model_type!r} model; {names} and EViT checkpoints "
            f"(model_type {model_types}) are supported"
        )

    from .visualization import visualize_kept_tokens

    processor = image_processor_argument(parser, args.model, config, args.image_processor)
    pixel_values = processed_pixels(parser, processor, image, args.image, args.model, config)
    model = load_model_argument(parser, family.kept_token_picture_model.from_pretrained, args.model)
    try:
        visualize_kept_tokens(model, pixel_values, keep_rate=args.keep_rate, output_path=args.output)
    except OSError as error:  # the folder was writable when checked; a full disk or a lost mount fails here
        parser.error(f"argument --output: cannot write {args.output}: {one_line(error)}")
    except (RuntimeError, ValueError) as error:  # pixels the model cannot take, e.g. smaller than one patch
        parser.error(
            f"argument --image-processor: {args.model} cannot run on the processed image of shape "
            f"{list(pixel_values.shape)}: {one_line(error)}"
        )


def _load_config(parser, model: str):
    """The configuration of `model` (a folder or a Hub id), or a parser error saying why there is none."""
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            parser.error(f"argument --model: {model} has no config.json; give a folder written by save_pretrained")
    elif looks_like_path(model):
        parser.error(f"argument --model: {model} is not a folder; give a checkpoint folder or a Hub id")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as error:
        parser.error(f"argument --model: cannot load a configuration from {model}: {one_line(error)}")


BENCHMARK_DESCRIPTION = """Speed of EViT against the stock transformers model with the same weights, in one process.

    evit-hf benchmark --model deit-small --batch-sizes 32 --keep-rates 0.9 0.8 0.7 0.6 0.5 --output-dir outputs/bench

Models run in alternation (one call of each per round, after a warm-up), so that drifts of the machine hit every model
alike; each row reports the median and the spread of its rounds, images/s, latency, peak memory, and its speed-up over
the stock model next to the MACs ratio (the bound for a speed-up that comes from doing less arithmetic). The
small-batch report gives, per model and keep rate, the smallest batch size measured at which EViT reaches 95% of its
MACs ratio.
--model is a named shape (deit-small, clip-vit-b16, dinov2-small, ...) or a checkpoint folder of any supported family.
"""


def whole_number_at_least(minimum: int, what: str):
    """argparse type of a whole number >= `minimum`; `what` names it in the error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"{what} is a whole number >= {minimum}, got {text}")
        return value

    return parse


def image_size_argument(text: str) -> int:
    """argparse type of an image size: what no model takes is refused here; the model's patch size, the lower bound,
    is checked once the model is known."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"an image size is a whole number of pixels, at least 1 and at least the model's patch size; got {text}"
        )
    return value


def yes_no_argument(value: str) -> bool:
    """argparse type of a yes/no switch given as a value (`--compile no yes`)."""
    if value.lower() in ("yes", "true", "1", "compiled"):
        return True
    if value.lower() in ("no", "false", "0", "eager"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, got {value!r}")


def benchmark_parser() -> argparse.ArgumentParser:
    """The options of `evit-hf benchmark`; every type and choice is checked here, without torch."""
    from .benchmark import DTYPE_NAMES, BenchmarkSettings

    defaults = BenchmarkSettings.__dataclass_fields__
    parser = argparse.ArgumentParser(
        prog="evit-hf benchmark",
        description=BENCHMARK_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    def default(name):
        return defaults[name].default_factory() if callable(defaults[name].default_factory) else defaults[name].default

    parser.add_argument("--model", default=default("model"), help="a named shape, or a checkpoint folder")
    parser.add_argument(
        "--keep-rates",
        type=benchmark_keep_rate_argument,
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
    return parser


def benchmark(argv) -> dict:
    parser = benchmark_parser()
    args = parser.parse_args(argv)  # flags, types and choices: answered before torch loads
    if args.output_dir is not None and not args.output_dir:
        parser.error("argument --output-dir: give a folder name (an empty one writes nowhere)")

    from . import benchmark as benchmark_library
    from . import vision_language_benchmark

    if vision_language_benchmark.is_vision_language_shape(args.model):
        return vision_language_benchmark.command(parser, args, argv)

    # The settings that need torch or the model's configuration, checked before any model is built.
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
    output_folder = None
    if args.output_dir is not None:
        problem = benchmark_library.output_dir_problem(args.output_dir)
        if problem:
            parser.error(f"argument --output-dir: {problem}")
        check_output_apart_from_inputs(parser, "--output-dir", args.output_dir, [("--model", args.model)])
        # Its three files, in a folder that may hold others: each must be new or an earlier benchmark's.
        output_folder = take_output_folder(
            parser, "--output-dir", args.output_dir, benchmark_library.OUTPUT_FILES, shared=True
        )
    try:
        return _run_benchmark(parser, args, settings)
    finally:
        if output_folder is not None:
            output_folder.release()


def _run_benchmark(parser, args, settings) -> dict:
    """`evit-hf benchmark` once its settings are checked and its output folder is held."""
    from . import benchmark as benchmark_library

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


def heads_argument(text: str) -> int:
    """argparse type of a number of attention heads."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"the number of attention heads is a whole number >= 1, got {text!r}")
    return value


def convert(argv):
    parser = argparse.ArgumentParser(
        prog="evit-hf convert",
        description="Convert a timm-layout ViT/DeiT checkpoint (an EViT reference training checkpoint, a timm or DeiT "
        "release) into an evit_hf folder: model.safetensors, config.json with auto_map and the model code, the "
        "reference's evaluation image processor and a model card.",
    )
    parser.add_argument("checkpoint", help="A .pth/.bin (read without running code from it) or .safetensors file.")
    parser.add_argument("output_dir", help="Folder to write (created once the conversion has succeeded).")
    parser.add_argument(
        "--keep_rate", type=keep_rate_argument, default=None, help="Overrides the checkpoint's base_keep_rate (0.7)."
    )
    parser.add_argument(
        "--reduction_layers",
        type=layer_index_argument,
        nargs="+",
        default=None,
        help="0-based reduction layers; override the checkpoint's drop_loc (default: the paper's for the depth).",
    )
    parser.add_argument(
        "--no_fuse", action="store_true", help="Drop the inattentive tokens instead of fusing them (fuse_token)."
    )
    parser.add_argument("--use_ema", action="store_true", help="Convert the checkpoint's model_ema weights.")
    parser.add_argument(
        "--num_attention_heads", type=heads_argument, default=None, help="Heads per layer (default: width / 64)."
    )
    parser.add_argument(
        "--id2label",
        default=None,
        help='JSON file of class names ({"0": "cat", ...} or a list); default: ImageNet-1k names for 1000 classes.',
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace the files of an earlier conversion in output_dir (files no run of evit_hf wrote are never "
        "touched: a folder holding any is refused).",
    )
    args = parser.parse_args(argv)

    # Cheap checks first: a typo should not wait for a large checkpoint to load.
    if not os.path.isfile(args.checkpoint):
        parser.error(f"argument checkpoint: {args.checkpoint} does not exist or is not a file")
    if args.id2label is not None and not os.path.isfile(args.id2label):
        parser.error(f"argument --id2label: {args.id2label} does not exist or is not a file")
    check_output_apart_from_inputs(
        parser, "output_dir", args.output_dir, [("checkpoint", args.checkpoint), ("--id2label", args.id2label)]
    )
    problem = writable_folder_problem(args.output_dir)
    if problem:
        parser.error(f"argument output_dir: cannot write {args.output_dir}: {problem}")
    output_folder = take_output_folder(
        parser, "output_dir", args.output_dir, CONVERTED_FILES, overwrite=args.overwrite
    )
    try:
        model = _convert_into(parser, args)
    finally:
        output_folder.release()
    config = model.config
    print(
        f"wrote {args.output_dir}: {type(model).__name__}, {config.num_hidden_layers} layers of width "
        f"{config.hidden_size}, keep rate {config.keep_rate}, reduction layers {config.reduction_layers}, "
        f"{'fused' if config.fuse_inattentive_tokens else 'dropped'} inattentive tokens, {config.num_labels} classes"
    )
    return model


# The files `save_pretrained` writes for a model (weights, whole or in shards; its configuration; the model code
# beside it, evit_hf's own files) and for an image processor: exact names and narrow patterns, since the manifest
# keeps them as the names this project writes there.
SAVED_MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "model-[0-9]*-of-[0-9]*.safetensors",
    "model.safetensors.index.json",
    "configuration_evit*.py",
    "modeling_evit*.py",
    "token_reorganization.py",
    "image_processing_evit.py",
    "preprocessor_config.json",
)
CONVERTED_FILES = (*SAVED_MODEL_FILES, "README.md")
CALIBRATED_FILES = (*SAVED_MODEL_FILES, "calibration.json")


def _convert_into(parser, args):
    """`evit-hf convert` once its arguments are checked and its output folder is held."""
    from .conversion import CheckpointConversionError, convert_timm_checkpoint

    try:
        return convert_timm_checkpoint(
            args.checkpoint,
            args.output_dir,
            keep_rate=args.keep_rate,
            reduction_layers=args.reduction_layers,
            fuse_inattentive_tokens=False if args.no_fuse else None,
            use_ema=args.use_ema,
            num_attention_heads=args.num_attention_heads,
            id2label=args.id2label,
            overwrite=args.overwrite,
        )
    except (CheckpointConversionError, FileNotFoundError) as error:
        parser.error(one_line(error))
    except OSError as error:  # the folder was writable when checked; a full disk or a lost mount fails here
        parser.error(f"argument output_dir: cannot write {args.output_dir}: {one_line(error)}")


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


def whole_number_argument(text: str) -> int:
    """argparse type of a count: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def calibrate(argv) -> dict:
    parser = argparse.ArgumentParser(
        prog="evit-hf calibrate",
        description="Choose reduction layers and per-layer keep rates for a MACs budget on unlabeled images, without "
        "training, and write the model folder with that schedule and a report of every schedule tried.",
    )
    parser.add_argument("--model", required=True, help="Folder or Hub id of a checkpoint of any supported family.")
    parser.add_argument(
        "--images", required=True, help="Folder of images, flat or in sub-folders (each image counts once)."
    )
    parser.add_argument("--macs", required=True, type=macs_argument, help="MACs per image, such as 3.03G.")
    parser.add_argument("--output-dir", required=True, help="New folder for the calibrated model and report.")
    parser.add_argument("--max-images", type=whole_number_argument, default=256, help="Images used (default 256).")
    parser.add_argument(
        "--search-images", type=whole_number_argument, default=32, help="Images the search scores on (default 32)."
    )
    parser.add_argument("--batch-size", type=whole_number_argument, default=32, help="Images per forward pass.")
    parser.add_argument(
        "--image-processor",
        default=None,
        help="Image processor, if not the checkpoint's (default: the checkpoint's; a ViTImageProcessor at the "
        "model's image size, mean/std 0.5, where the checkpoint has none). It is saved with the calibrated model.",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace the files of an earlier calibration in --output-dir (files no run of evit_hf wrote are never "
        "touched: a folder holding any is refused).",
    )
    args = parser.parse_args(argv)

    if not os.path.isdir(args.images):
        parser.error(f"argument --images: {args.images} is not a folder")
    check_output_apart_from_inputs(
        parser,
        "--output-dir",
        args.output_dir,
        [("--model", args.model), ("--images", args.images), ("--image-processor", args.image_processor)],
    )
    problem = writable_folder_problem(args.output_dir)
    if problem:
        parser.error(f"argument --output-dir: cannot write into {args.output_dir}: {problem}")
    # Held from here to the end; a refusal below gives it back (and removes the folder if this run created it).
    output_folder = take_output_folder(
        parser, "--output-dir", args.output_dir, CALIBRATED_FILES, overwrite=args.overwrite
    )
    try:
        return _calibrate_into(parser, args)
    finally:
        output_folder.release()


def model_class_named_by(config) -> type | None:
    """The EViT class of the model `config.architectures` names (by its own or its stock name), from the family
    table: a classifier with its heads (DeiT's with the distillation head), a CLIP model with both towers. None where
    it names none of a family's models."""
    from .families import family_for_model_type

    family = family_for_model_type(config.model_type)
    named = set(getattr(config, "architectures", None) or [])
    if family is None or not named:
        return None
    return next((evit for stock, evit in family.models.items() if named & {stock.__name__, evit.__name__}), None)


def _calibrate_into(parser, args) -> dict:
    """`evit-hf calibrate` once its output folder is held: the images and the model's settings are checked (each
    refused in one line), then the images are read, the model loaded, the schedule searched and the folder written."""
    from .data import unlabeled_image_files

    try:
        paths = unlabeled_image_files(args.images)[: args.max_images]
    except ValueError as error:  # link loops, folders that cannot be listed: as the image-folder check says
        parser.error(f"argument --images: {one_line(error)}")
    if not paths:
        parser.error(f"argument --images: {args.images} holds no images (in it or in its sub-folders)")
    config = _load_config(parser, args.model)

    from .calibration import cheapest_schedule_macs

    try:
        cheapest = cheapest_schedule_macs(config)
    except ValueError as error:
        parser.error(f"argument --model: {args.model}: {one_line(error)}")
    if cheapest > args.macs:
        parser.error(
            f"argument --macs: no schedule of {args.model} reaches {args.macs:,.0f} MACs: keep rate 0.1 in every "
            f"layer but the first costs {cheapest:,}; give a larger budget"
        )

    import torch
    from transformers import AutoConfig, AutoModel

    from .calibration import calibrate_schedule
    from .macs import count_macs
    from .patch import apply_evit

    images = [read_image_argument(parser, "--images", path) for path in paths]
    processor = image_processor_argument(parser, args.model, config, args.image_processor)
    batches = [
        processed_pixels(parser, processor, images[start : start + args.batch_size], args.images, args.model, config)
        for start in range(0, len(images), args.batch_size)
    ]
    model_class = model_class_named_by(config)
    if model_class is not None:  # the whole model, heads included
        model = load_model_argument(parser, model_class.from_pretrained, args.model)
    else:
        model = load_model_argument(parser, lambda name: apply_evit(AutoModel.from_pretrained(name)), args.model)
    model.eval()
    try:
        with torch.no_grad():
            result = calibrate_schedule(model, batches, args.macs, search_images=args.search_images)
    except ValueError as error:
        parser.error(f"argument --macs: {one_line(error)}")
    model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    # What the folder itself costs, as anyone who loads it counts it.
    saved_macs = count_macs(AutoConfig.from_pretrained(args.output_dir))
    report = {"model": args.model, "images": args.images, **result.to_dict(), "macs": saved_macs}
    with open(os.path.join(args.output_dir, "calibration.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    print(
        f"wrote {args.output_dir}: {type(model).__name__}, reduction layers {result.reduction_layers}, keep rates "
        f"{result.keep_rate}, {saved_macs:,} MACs (count_macs of the folder; budget {result.target_macs:,}), "
        f"{result.objective_name} {result.objective:.4g} on {result.num_images} images; every schedule tried is in "
        "calibration.json"
    )
    return report


COMMANDS = {"visualize": visualize, "benchmark": benchmark, "convert": convert, "calibrate": calibrate}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="evit-hf",
        usage="evit-hf {visualize,benchmark,convert,calibrate} [options]",
        description="EViT for transformers. `evit-hf COMMAND --help` lists a command's options.",
        epilog="visualize: draw the patches an EViT model keeps. benchmark: time EViT against the stock model. "
        "convert: turn a timm-layout ViT/DeiT checkpoint into an evit_hf folder. calibrate: choose reduction layers "
        "and keep rates for a MACs budget on unlabeled images.",
    )
    if argv and argv[0] in ("-h", "--help"):
        parser.print_help()
        raise SystemExit(0)
    if not argv:
        parser.error(
            "give a command: visualize, benchmark, convert or calibrate (evit-hf COMMAND --help for its options)"
        )
    if argv[0] not in COMMANDS:
        parser.error(f"unknown command {argv[0]!r}; the commands are {', '.join(COMMANDS)}")
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
