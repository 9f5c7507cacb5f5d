"""The `evit-hf` command: `evit-hf visualize` and `evit-hf benchmark`."""

import argparse
import sys


def visualize(argv) -> str:
    parser = argparse.ArgumentParser(
        prog="evit-hf visualize",
        description="Draw an image and, per reduction layer, the patches an EViT model keeps (the others greyed).",
    )
    parser.add_argument("--model", required=True, help="Hub id or folder of a ViT, DeiT or EViT checkpoint.")
    parser.add_argument("--image", required=True, help="Image file.")
    parser.add_argument("--output", default="kept_tokens.png", help="PNG to write.")
    parser.add_argument("--keep-rate", type=float, default=None, help="Keep rate (default: the checkpoint's, 0.7).")
    parser.add_argument("--image-processor", default=None, help="Image processor, if not the checkpoint's.")
    args = parser.parse_args(argv)

    from PIL import Image
    from transformers import AutoConfig, AutoImageProcessor

    from .modeling_evit import EViTDeiTForImageClassificationWithTeacher, EViTForImageClassification
    from .visualization import visualize_kept_tokens

    model_type = AutoConfig.from_pretrained(args.model).model_type
    if model_type in ("vit", "evit"):
        model_class = EViTForImageClassification
    elif model_type in ("deit", "evit_deit"):
        model_class = EViTDeiTForImageClassificationWithTeacher
    else:
        parser.error(f"{args.model} is a {model_type!r} model; ViT, DeiT and EViT checkpoints are supported.")
    model = model_class.from_pretrained(args.model)
    processor = AutoImageProcessor.from_pretrained(args.image_processor or args.model)
    visualize_kept_tokens(
        model, Image.open(args.image), image_processor=processor, keep_rate=args.keep_rate, output_path=args.output
    )
    print(f"wrote {args.output}")
    return args.output


def benchmark(argv) -> dict:
    from .benchmark import main as benchmark_main

    return benchmark_main(argv)


COMMANDS = {"visualize": visualize, "benchmark": benchmark}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        print("usage: evit-hf {visualize,benchmark} [options]   (evit-hf COMMAND --help for its options)")
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
