"""The `evit-hf` command: `evit-hf visualize`, `evit-hf benchmark` and `evit-hf convert`.

Every argument is checked before a model is built, and a bad one ends the command with argparse's one-line
`evit-hf COMMAND: error: ...` (exit status 2), never a traceback.
"""

import argparse
import math
import os
import sys


def one_line(error: BaseException) -> str:
    """An exception's message on one line (transformers and huggingface_hub messages span several)."""
    return " ".join(str(error).split()) or type(error).__name__


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


def writable_folder_problem(folder: str) -> str | None:
    """Why files cannot be written into `folder` (created if missing), or None if they can."""
    folder = os.path.abspath(folder or ".")
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"no permission to write in {existing}"
    return None


def visualize(argv) -> str:
    parser = argparse.ArgumentParser(
        prog="evit-hf visualize",
        description="Draw an image and, per reduction layer, the patches an EViT model keeps (the others greyed).",
    )
    parser.add_argument("--model", required=True, help="Hub id or folder of a ViT, DeiT or EViT checkpoint.")
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
    Image.init()
    extension = os.path.splitext(args.output)[1].lower()
    if Image.registered_extensions().get(extension) not in Image.SAVE:
        parser.error(f"argument --output: cannot write a picture named {args.output!r}: give it a .png or .jpg name")
    if os.path.isdir(args.output):
        parser.error(f"argument --output: {args.output} is a folder; give a file name such as kept_tokens.png")
    problem = writable_folder_problem(os.path.dirname(args.output))
    if problem:
        parser.error(f"argument --output: cannot write {args.output}: {problem}")

    config = _load_config(parser, args.model)
    if config.model_type not in ("vit", "evit", "deit", "evit_deit"):
        parser.error(
            f"argument --model: {args.model} is a {config.model_type!r} model; ViT, DeiT and EViT checkpoints "
            "(model_type 'vit', 'deit', 'evit' or 'evit_deit') are supported"
        )

    from transformers import AutoImageProcessor

    from .modeling_evit import EViTDeiTForImageClassificationWithTeacher, EViTForImageClassification
    from .visualization import load_image_processor_or_default, visualize_kept_tokens

    if args.image_processor:
        if looks_like_path(args.image_processor) and not os.path.isdir(args.image_processor):
            parser.error(f"argument --image-processor: {args.image_processor} is not a folder")
        try:
            processor = AutoImageProcessor.from_pretrained(args.image_processor)
        except (OSError, ValueError) as error:
            parser.error(f"argument --image-processor: cannot load an image processor: {one_line(error)}")
    else:
        processor = load_image_processor_or_default(args.model, config)

    model_class = (
        EViTForImageClassification
        if config.model_type in ("vit", "evit")
        else EViTDeiTForImageClassificationWithTeacher
    )
    try:
        model = model_class.from_pretrained(args.model)
    except (OSError, ValueError) as error:
        parser.error(f"argument --model: cannot load the model from {args.model}: {one_line(error)}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    visualize_kept_tokens(model, image, image_processor=processor, keep_rate=args.keep_rate, output_path=args.output)
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


def benchmark(argv) -> dict:
    from .benchmark import main as benchmark_main

    return benchmark_main(argv)


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
    config = model.config
    print(
        f"wrote {args.output_dir}: {type(model).__name__}, {config.num_hidden_layers} layers of width "
        f"{config.hidden_size}, keep rate {config.keep_rate}, reduction layers {config.reduction_layers}, "
        f"{'fused' if config.fuse_inattentive_tokens else 'dropped'} inattentive tokens, {config.num_labels} classes"
    )
    return model


COMMANDS = {"visualize": visualize, "benchmark": benchmark, "convert": convert}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="evit-hf",
        usage="evit-hf {visualize,benchmark,convert} [options]",
        description="EViT for transformers. `evit-hf COMMAND --help` lists a command's options.",
        epilog="visualize: draw the patches an EViT model keeps. benchmark: time EViT against the stock model. "
        "convert: turn a timm-layout ViT/DeiT checkpoint into an evit_hf folder.",
    )
    if argv and argv[0] in ("-h", "--help"):
        parser.print_help()
        raise SystemExit(0)
    if not argv:
        parser.error("give a command: visualize, benchmark or convert (evit-hf COMMAND --help for its options)")
    if argv[0] not in COMMANDS:
        parser.error(f"unknown command {argv[0]!r}; the commands are {', '.join(COMMANDS)}")
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
