"""The `evit-hf` command: `evit-hf visualize`, `evit-hf benchmark` and `evit-hf convert`.

Every argument is checked before a model is built, and a bad one ends the command with argparse's one-line
`evit-hf COMMAND: error: ...` (exit status 2), never a traceback.
"""

import argparse
import json
import math
import os
import sys

from .configuration_evit_base import vision_config_of
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


def keep_rate_argument(text: str) -> float:
    """argparse type of a keep rate: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a keep rate in (0, 1], got {text!r}") from None
    if not math.isfinite(value) or not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"a keep rate is the share of tokens each reduction layer keeps, in (0, 1]; got {text}"
        )
    return value


def benchmark_keep_rate_argument(text: str) -> float | list[float]:
    """argparse type of a benchmarked keep rate: one number in (0, 1], or one per reduction layer joined by "/"
    ("0.9/0.7/0.5")."""
    if "/" not in text:
        return keep_rate_argument(text)
    return [keep_rate_argument(part.strip()) for part in text.split("/")]


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

    from PIL import Image

    from .images import load_rgb_image

    # Cheap local checks first: a typo in --image or --output should not wait for a model to load.
    if not os.path.isfile(args.image):
        parser.error(f"argument --image: {args.image} does not exist or is not a file")
    try:
        # Decodes every byte (a truncated file fails here, not after the model is built); upright and 8-bit RGB as
        # in training and evaluation.
        image = load_rgb_image(args.image)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        parser.error(f"argument --image: cannot read {args.image} as an image ({one_line(error)})")
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

    from transformers import AutoImageProcessor

    from .visualization import load_image_processor_or_default, visualize_kept_tokens

    if args.image_processor:
        if looks_like_path(args.image_processor) and not os.path.isdir(args.image_processor):
            parser.error(f"argument --image-processor: {args.image_processor} is not a folder")
        try:
            processor = AutoImageProcessor.from_pretrained(args.image_processor)
        except (OSError, ValueError) as error:
            parser.error(f"argument --image-processor: cannot load an image processor: {one_line(error)}")
    elif os.path.isfile(os.path.join(args.model, "preprocessor_config.json")):
        # The checkpoint's own processor: a damaged one is an error, not a reason to fall back to the default.
        try:
            processor = AutoImageProcessor.from_pretrained(args.model)
        except (OSError, ValueError) as error:
            parser.error(
                f"argument --model: cannot load the image processor in {args.model}: "
                f"{one_line(error).rstrip('.')}; repair its preprocessor_config.json or pass --image-processor"
            )
    else:
        processor = load_image_processor_or_default(args.model, config)
    try:
        pixel_values = processor(images=image, return_tensors="pt").pixel_values
    except (OSError, ValueError, TypeError) as error:
        parser.error(f"argument --image-processor: the image processor fails on {args.image}: {one_line(error)}")
    num_channels = vision_config_of(config).num_channels  # a two-tower model keeps it in its tower's
    if pixel_values.shape[1] != num_channels:
        parser.error(
            f"argument --image-processor: the image processor makes {pixel_values.shape[1]}-channel pixels, but "
            f"{args.model} takes {num_channels}; pass an --image-processor made for this model"
        )

    try:
        model = family.kept_token_picture_model.from_pretrained(args.model)
    except Exception as error:  # damaged weights raise safetensors', torch's or transformers' own errors
        parser.error(f"argument --model: cannot load the model from {args.model}: {one_line(error)}")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        visualize_kept_tokens(model, pixel_values, keep_rate=args.keep_rate, output_path=args.output)
    except OSError as error:  # the folder was writable when checked; a full disk or a lost mount fails here
        parser.error(f"argument --output: cannot write {args.output}: {one_line(error)}")
    except (RuntimeError, ValueError) as error:  # pixels the model cannot take, e.g. smaller than one patch
        parser.error(
            f"argument --image-processor: {args.model} cannot run on the processed image of shape "
            f"{list(pixel_values.shape)}: {one_line(error)}"
        )
    print(f"wrote {args.output}")
    return args.output


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
    if args.output_dir is not None:
        problem = benchmark_library.output_dir_problem(args.output_dir)
        if problem:
            parser.error(f"argument --output-dir: {problem}")
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
    parser.add_argument("--overwrite", action="store_true", help="Write into an output folder that is not empty.")
    args = parser.parse_args(argv)

    # Cheap checks first: a typo should not wait for a large checkpoint to load.
    if not os.path.isfile(args.checkpoint):
        parser.error(f"argument checkpoint: {args.checkpoint} does not exist or is not a file")
    if args.id2label is not None and not os.path.isfile(args.id2label):
        parser.error(f"argument --id2label: {args.id2label} does not exist or is not a file")
    problem = writable_folder_problem(args.output_dir)
    if problem:
        parser.error(f"argument output_dir: cannot write {args.output_dir}: {problem}")

    from .conversion import CheckpointConversionError, convert_timm_checkpoint

    try:
        model = convert_timm_checkpoint(
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
    config = model.config
    print(
        f"wrote {args.output_dir}: {type(model).__name__}, {config.num_hidden_layers} layers of width "
        f"{config.hidden_size}, keep rate {config.keep_rate}, reduction layers {config.reduction_layers}, "
        f"{'fused' if config.fuse_inattentive_tokens else 'dropped'} inattentive tokens, {config.num_labels} classes"
    )
    return model


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


# Files `evit-hf calibrate` reads as images (upper or lower case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


def image_files(folder: str) -> list[str]:
    """The image files of `folder` and its sub-folders (a flat folder or one sub-folder per class), sorted."""
    found = []
    for root, folders, names in os.walk(folder, followlinks=True):
        folders.sort()
        found += [os.path.join(root, name) for name in sorted(names) if name.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def calibrate(argv) -> dict:
    parser = argparse.ArgumentParser(
        prog="evit-hf calibrate",
        description="Choose reduction layers and per-layer keep rates for a MACs budget on unlabeled images, without "
        "training, and write the model folder with that schedule and a report of every schedule tried.",
    )
    parser.add_argument("--model", required=True, help="Folder or Hub id of a checkpoint of any supported family.")
    parser.add_argument("--images", required=True, help="Folder of images, flat or one sub-folder per class.")
    parser.add_argument("--macs", required=True, type=macs_argument, help="MACs per image, such as 3.03G.")
    parser.add_argument("--output-dir", required=True, help="New folder for the calibrated model and report.")
    parser.add_argument("--max-images", type=whole_number_argument, default=256, help="Images used (default 256).")
    parser.add_argument(
        "--search-images", type=whole_number_argument, default=32, help="Images the search scores on (default 32)."
    )
    parser.add_argument("--batch-size", type=whole_number_argument, default=32, help="Images per forward pass.")
    args = parser.parse_args(argv)

    if not os.path.isdir(args.images):
        parser.error(f"argument --images: {args.images} is not a folder")
    paths = image_files(args.images)[: args.max_images]
    if not paths:
        parser.error(
            f"argument --images: {args.images} holds no images ({', '.join(IMAGE_EXTENSIONS)}, in it or in its "
            "sub-folders)"
        )
    problem = writable_folder_problem(args.output_dir)
    if problem:
        parser.error(f"argument --output-dir: cannot write into {args.output_dir}: {problem}")
    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir):
        parser.error(
            f"argument --output-dir: {args.output_dir} is not empty; give a new folder (nothing is overwritten)"
        )
    config = _load_config(parser, args.model)

    import torch

    from .calibration import calibrate_schedule, cheapest_schedule_macs
    from .images import load_rgb_image
    from .patch import apply_evit
    from .visualization import load_image_processor_or_default

    try:
        cheapest = cheapest_schedule_macs(config)
    except ValueError as error:
        parser.error(f"argument --model: {args.model}: {one_line(error)}")
    if cheapest > args.macs:
        parser.error(
            f"argument --macs: no schedule of {args.model} reaches {args.macs:,.0f} MACs: keep rate 0.1 in every "
            f"layer but the first costs {cheapest:,}; give a larger budget"
        )
    images = []
    for path in paths:
        try:
            images.append(load_rgb_image(path))  # upright (EXIF) and 8-bit RGB, as in training
        except (OSError, ValueError) as error:
            parser.error(f"argument --images: cannot read {path} as an image ({one_line(error)})")

    from transformers import AutoModel, AutoModelForImageClassification

    classifier = any(name.endswith("ForImageClassification") for name in config.architectures or [])
    auto_class = AutoModelForImageClassification if classifier else AutoModel
    try:
        model = apply_evit(auto_class.from_pretrained(args.model)).eval()
    except (OSError, ValueError, TypeError) as error:
        parser.error(f"argument --model: cannot load {args.model} as EViT: {one_line(error)}")
    processor = load_image_processor_or_default(args.model, model.config)
    batches = [
        processor(images=images[start : start + args.batch_size], return_tensors="pt").pixel_values
        for start in range(0, len(images), args.batch_size)
    ]
    try:
        with torch.no_grad():
            result = calibrate_schedule(model, batches, args.macs, search_images=args.search_images)
    except ValueError as error:
        parser.error(f"argument --macs: {one_line(error)}")
    model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    report = {"model": args.model, "images": args.images, **result.to_dict()}
    with open(os.path.join(args.output_dir, "calibration.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    print(
        f"wrote {args.output_dir}: reduction layers {result.reduction_layers}, keep rates {result.keep_rate}, "
        f"{result.macs:,} MACs (budget {result.target_macs:,}), {result.objective_name} {result.objective:.4g} on "
        f"{result.num_images} images; every schedule tried is in calibration.json"
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
