"""`evit-hf visualize`: an image and, per reduction layer, the patches an EViT model keeps (the others greyed)."""

import os

from ..messages import one_line, writable_folder_problem
from .arguments import keep_rate_argument
from .inputs import image_processor_argument, load_config, load_model_argument, processed_pixels, read_image_argument
from .output_checks import check_output_apart_from_inputs, take_output_folder


SUMMARY = "draw the patches an EViT model keeps"
DESCRIPTION = "Draw an image and, per reduction layer, the patches an EViT model keeps (the others greyed)."
DEFAULT_OUTPUT = "kept_tokens.png"


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="Hub id or folder of a checkpoint of any supported family.")
    parser.add_argument("--image", required=True, help="Image file.")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="Picture to write (PNG, JPEG, ...).")
    parser.add_argument(
        "--keep-rate", type=keep_rate_argument, default=None, help="Keep rate in (0, 1] (default: the checkpoint's)."
    )
    parser.add_argument(
        "--image-processor",
        default=None,
        help="Image processor, if not the checkpoint's (default: the checkpoint's; a ViTImageProcessor at the "
        "model's image size, mean/std 0.5, where the checkpoint has none).",
    )


def run(parser, args, argv) -> str:
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
        parser.error(f"argument --output: {args.output!r} is a folder; give a file name such as {DEFAULT_OUTPUT}")
    from ..images import picture_extensions

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
    config = load_config(parser, args.model)
    from ..families import FAMILIES, family_for_model_type

    family = family_for_model_type(config.model_type)
    if family is None or family.kept_token_picture_model is None:
        drawn = [each for each in FAMILIES if each.kept_token_picture_model]
        names = ", ".join(each.display_name for each in drawn)
        model_types = ", ".join(repr(model_type) for each in drawn for model_type in each.model_types)
        parser.error(
            f"argument --model: {args.model} is a {config.model_type!r} model; {names} and EViT checkpoints "
            f"(model_type {model_types}) are supported"
        )

    from ..visualization import visualize_kept_tokens

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
