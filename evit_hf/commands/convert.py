"""`evit-hf convert`: a timm-layout ViT/DeiT checkpoint (an EViT reference training checkpoint, a timm or DeiT
release) into an evit_hf folder. Its options are spelled with dashes; the underscore spellings of earlier versions
(`--keep_rate`, `--no_fuse`, ...) still work, hidden from --help."""

import os

from ..messages import one_line, writable_folder_problem
from .arguments import add_option_with_hidden_alias, heads_argument, keep_rate_argument, layer_index_argument
from .output_checks import CONVERTED_FILES, check_output_apart_from_inputs, take_output_folder


SUMMARY = "turn a timm-layout ViT/DeiT checkpoint into an evit_hf folder"
DESCRIPTION = (
    "Convert a timm-layout ViT/DeiT checkpoint (an EViT reference training checkpoint, a timm or DeiT release) into "
    "an evit_hf folder: model.safetensors, config.json with auto_map and the model code, the reference's evaluation "
    "image processor and a model card."
)


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="A .pth/.bin (read without running code from it) or .safetensors file.")
    parser.add_argument("output_dir", help="Folder to write (created once the conversion has succeeded).")
    add_option_with_hidden_alias(
        parser,
        "--keep-rate",
        type=keep_rate_argument,
        default=None,
        help="Overrides the checkpoint's base_keep_rate (0.7).",
    )
    add_option_with_hidden_alias(
        parser,
        "--reduction-layers",
        type=layer_index_argument,
        nargs="+",
        default=None,
        help="0-based reduction layers; override the checkpoint's drop_loc (default: the paper's for the depth).",
    )
    add_option_with_hidden_alias(
        parser,
        "--no-fuse",
        action="store_true",
        help="Drop the inattentive tokens instead of fusing them (fuse_token).",
    )
    add_option_with_hidden_alias(
        parser, "--use-ema", action="store_true", help="Convert the checkpoint's model_ema weights."
    )
    add_option_with_hidden_alias(
        parser,
        "--num-attention-heads",
        type=heads_argument,
        default=None,
        help="Heads per layer (default: width / 64).",
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


def run(parser, args, argv):
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


def _convert_into(parser, args):
    """`evit-hf convert` once its arguments are checked and its output folder is held."""
    from ..conversion import CheckpointConversionError, convert_timm_checkpoint

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
