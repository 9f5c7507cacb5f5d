"""The `evit-hf` command: `evit-hf visualize` and `evit-hf benchmark`.

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

    # Cheap local checks first: a typo in --image or --output should not wait for a model to load.
    if not os.path.isfile(args.image):
        parser.error(f"argument --image: {args.image} does not exist or is not a file")
    try:
        with Image.open(args.image) as opened:
            opened.load()  # decodes every byte: a truncated file fails here, not after the model is built
            image = opened.convert("RGB")
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


COMMANDS = {"visualize": visualize, "benchmark": benchmark}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="evit-hf",
        usage="evit-hf {visualize,benchmark} [options]",
        description="EViT for transformers. `evit-hf COMMAND --help` lists a command's options.",
        epilog="visualize: draw the patches an EViT model keeps. benchmark: time EViT against the stock model.",
    )
    if argv and argv[0] in ("-h", "--help"):
        parser.print_help()
        raise SystemExit(0)
    if not argv:
        parser.error("give a command: visualize or benchmark (evit-hf COMMAND --help for its options)")
    if argv[0] not in COMMANDS:
        parser.error(f"unknown command {argv[0]!r}; the commands are visualize and benchmark")
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
