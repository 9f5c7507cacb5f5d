"""`evit-hf calibrate`: reduction layers and per-layer keep rates for a MACs budget, chosen on unlabeled images
without training; writes the model folder with that schedule and a report of every schedule tried."""

import json
import os

from ..messages import one_line, writable_folder_problem
from .arguments import macs_argument, whole_number_argument
from .inputs import image_processor_argument, load_config, load_model_argument, processed_pixels, read_image_argument
from .output_checks import CALIBRATED_FILES, check_output_apart_from_inputs, take_output_folder


SUMMARY = "choose reduction layers and keep rates for a MACs budget"
DESCRIPTION = (
    "Choose reduction layers and per-layer keep rates for a MACs budget on unlabeled images, without training, and "
    "write the model folder with that schedule and a report of every schedule tried."
)


def add_arguments(parser) -> None:
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


def run(parser, args, argv) -> dict:
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
    from ..families import family_for_model_type

    family = family_for_model_type(config.model_type)
    named = set(getattr(config, "architectures", None) or [])
    if family is None or not named:
        return None
    return next((evit for stock, evit in family.models.items() if named & {stock.__name__, evit.__name__}), None)


def _calibrate_into(parser, args) -> dict:
    """`evit-hf calibrate` once its output folder is held: the images and the model's settings are checked (each
    refused in one line), then the images are read, the model loaded, the schedule searched and the folder written."""
    from ..data import unlabeled_image_files

    try:
        paths = unlabeled_image_files(args.images)[: args.max_images]
    except ValueError as error:  # link loops, folders that cannot be listed: as the image-folder check says
        parser.error(f"argument --images: {one_line(error)}")
    if not paths:
        parser.error(f"argument --images: {args.images} holds no images (in it or in its sub-folders)")
    config = load_config(parser, args.model)

    from ..calibration import cheapest_schedule_macs

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

    from ..calibration import calibrate_schedule
    from ..macs import count_macs
    from ..patch import apply_evit

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
