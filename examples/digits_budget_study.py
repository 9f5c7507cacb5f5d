#!/usr/bin/env python
"""The most accuracy for a cost budget, measured offline on scikit-learn's handwritten digits with the example's own
models (the small ViT of examples/digits_demo.py):

1. off the shelf, at the MACs of uniform keep rates 0.7 and 0.5: the default schedule (the paper's layers, one keep
   rate) against `evit_hf.calibration.calibrate_schedule` (layers and per-layer rates chosen on unlabeled training
   images), with the calibration's wall time;
2. fine-tuned at keep rate 0.5, without and with `--distillation_alpha 0.5`, for the same number of steps;
3. a larger `--image_size` with `--match_macs_of_image_size` (the keep rate that costs no more than the unreduced
   model at its own size) against the unreduced model at its own size, fine-tuned for the same number of steps.

Writes budget_study.json and budget_study.md to --output_dir and prints the tables.

    python examples/digits_budget_study.py --output_dir outputs/digits_budget_study
    python examples/digits_budget_study.py --vit_epochs 10 --fine_tune_steps 60   # quicker, rougher
"""

import argparse
import json
import os
import shutil
import sys
import time

import torch
from transformers import AutoImageProcessor

import evit_hf
from evit_hf.calibration import calibrate_schedule
from evit_hf.data import collate_images, digits_dataset, image_transforms
from evit_hf.evaluation import format_keep_rate
from evit_hf.images import to_rgb
from evit_hf.macs import count_macs


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits_demo  # noqa: E402
import run_image_classification  # noqa: E402


OFF_THE_SHELF_KEEP_RATES = (0.7, 0.5)
FINE_TUNED_KEEP_RATE = 0.5
DISTILLATION_ALPHA = 0.5


def validation_split(model_folder: str, seed: int):
    """The digits validation split the example holds out (same seed), transformed by the model's processor."""
    processor = AutoImageProcessor.from_pretrained(model_folder)
    return digits_dataset(seed=seed)["validation"].with_transform(image_transforms(processor, "image")[1])


def calibration_batches(model_folder: str, seed: int, images: int, batch_size: int = 64) -> list[torch.Tensor]:
    """`images` unlabeled training images, as the model's processor makes them, in batches."""
    processor = AutoImageProcessor.from_pretrained(model_folder)
    train = digits_dataset(seed=seed)["train"]
    train = train.select(range(min(images, len(train))))
    pixel_values = processor([to_rgb(image) for image in train["image"]], return_tensors="pt").pixel_values
    return list(pixel_values.split(batch_size))


def accuracy_at(model, validation, keep_rate) -> dict:
    """One row of `evit_hf.evaluate_keep_rates` at `keep_rate` (a number, or one rate per reduction layer)."""
    return evit_hf.evaluate_keep_rates(model, validation, [keep_rate], 128, collate_images)[0]


def off_the_shelf(vit_dir: str, seed: int, calibration_images: int) -> list[dict]:
    validation = validation_split(vit_dir, seed)
    batches = calibration_batches(vit_dir, seed, calibration_images)
    rows = []
    for keep_rate in OFF_THE_SHELF_KEEP_RATES:
        default = evit_hf.EViTForImageClassification.from_pretrained(vit_dir, keep_rate=keep_rate)
        budget = count_macs(default.config)
        default_row = accuracy_at(default, validation, keep_rate)
        calibrated = evit_hf.EViTForImageClassification.from_pretrained(vit_dir, keep_rate=keep_rate).eval()
        started = time.perf_counter()
        result = calibrate_schedule(calibrated, batches, budget, progress=False)
        seconds = time.perf_counter() - started
        calibrated_row = accuracy_at(calibrated, validation, calibrated.config.keep_rate)
        rows.append(
            {
                "budget_of_keep_rate": keep_rate,
                "budget_macs": budget,
                "default": {"reduction_layers": list(default.config.reduction_layers), **default_row},
                "calibrated": {"reduction_layers": list(result.reduction_layers), **calibrated_row},
                "calibration_seconds": seconds,
                "calibration_images": calibration_images,
            }
        )
        print(
            f"  budget of keep {keep_rate:g} ({budget / 1e6:.2f} MMACs): default {100 * default_row['accuracy']:.2f}%"
            f", calibrated {100 * calibrated_row['accuracy']:.2f}% ({seconds:.1f} s)"
        )
    return rows


def fine_tune(start: str, output_dir: str, seed: int, steps: int, extra=()) -> dict:
    """The example's run for `steps` steps from `start`; its evaluation and the saved model's settings."""
    shutil.rmtree(output_dir, ignore_errors=True)
    args = [
        "--model_name_or_path", start,
        "--output_dir", output_dir,
        "--do_train", "--do_eval",
        "--max_steps", str(steps),
        "--learning_rate", "5e-4",
        "--weight_decay", "0.05",
        "--lr_scheduler_type", "cosine",
        "--per_device_train_batch_size", "64",
        "--per_device_eval_batch_size", "128",
        "--crop_scale_min", "0.75",
        "--no_random_flip",  # a mirrored digit is another digit
        "--logging_steps", "50",
        "--save_strategy", "no",
        "--report_to", "none",
        "--disable_tqdm", "true",
        "--seed", str(seed),
        "--card_keep_rates", "1.0",
        *extra,
    ]  # fmt: skip
    results = run_image_classification.main(args)
    config = evit_hf.EViTForImageClassification.config_class.from_pretrained(output_dir)
    return {
        "accuracy": results["eval_accuracy"],
        "keep_rate": config.keep_rate,
        "image_size": config.image_size,
        "macs": count_macs(config),
        "steps": steps,
        "arguments": list(extra),
    }


def markdown(summary: dict) -> str:
    lines = [
        f"Digits validation split (360 images), seed {summary['seed']}; the ViT scores "
        f"{100 * summary['vit_accuracy']:.2f}% at {summary['vit_macs'] / 1e6:.2f} MMACs.",
        "",
        "Off the shelf, at equal MACs:",
        "",
        "| budget | MACs | default schedule | accuracy | calibrated schedule | accuracy | calibration |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summary["off_the_shelf"]:
        default, calibrated = row["default"], row["calibrated"]
        lines.append(
            f"| keep {row['budget_of_keep_rate']:g} | {row['budget_macs'] / 1e6:.2f} M | layers "
            f"{default['reduction_layers']}, keep {format_keep_rate(default['keep_rate'])} | "
            f"{100 * default['accuracy']:.2f} | layers {calibrated['reduction_layers']}, keep "
            f"{format_keep_rate(calibrated['keep_rate'])} ({calibrated['macs'] / 1e6:.2f} M) | "
            f"{100 * calibrated['accuracy']:.2f} | {row['calibration_seconds']:.1f} s, "
            f"{row['calibration_images']} images |"
        )
    lines += ["", "Fine-tuned for the same number of steps:", "", "| run | keep rate | input | MACs | accuracy |"]
    lines.append("|---|---|---|---|---|")
    for name, run in summary["fine_tuned"].items():
        lines.append(
            f"| {name} | {format_keep_rate(run['keep_rate'])} | {run['image_size']} px | {run['macs'] / 1e6:.2f} M | "
            f"{100 * run['accuracy']:.2f} |"
        )
    return "\n".join(lines)


def run(
    output_dir: str,
    seed: int = 0,
    vit_epochs: int = 30,
    fine_tune_steps: int = 200,
    larger_image_size: int = 40,
    calibration_images: int = 256,
) -> dict:
    started = time.perf_counter()
    os.makedirs(output_dir, exist_ok=True)
    initial, vit_dir = os.path.join(output_dir, "initial_vit"), os.path.join(output_dir, "vit")
    for folder in (initial, vit_dir):
        shutil.rmtree(folder, ignore_errors=True)
    digits_demo.build_initial_vit(initial, seed)
    print(f"[1/4] training the small ViT from scratch on digits ({vit_epochs} epochs)")
    vit_results = digits_demo.train(
        initial, vit_dir, seed, vit_epochs, 2e-3, extra=["--keep_rate", "1.0", "--card_keep_rates", "1.0"]
    )

    print("[2/4] off the shelf at the MACs of uniform keep rates: default schedule vs calibrated")
    shelf = off_the_shelf(vit_dir, seed, calibration_images)

    print(f"[3/4] fine-tuning at keep {FINE_TUNED_KEEP_RATE:g} without and with distillation, {fine_tune_steps} steps")
    keep = ["--keep_rate", str(FINE_TUNED_KEEP_RATE)]
    runs_dir = os.path.join(output_dir, "runs")
    fine_tuned = {
        f"keep {FINE_TUNED_KEEP_RATE:g}": fine_tune(
            vit_dir, os.path.join(runs_dir, "keep"), seed, fine_tune_steps, keep
        ),
        f"keep {FINE_TUNED_KEEP_RATE:g}, distillation alpha {DISTILLATION_ALPHA:g}": fine_tune(
            vit_dir,
            os.path.join(runs_dir, "distilled"),
            seed,
            fine_tune_steps,
            [*keep, "--distillation_alpha", str(DISTILLATION_ALPHA)],
        ),
    }
    own_size = digits_demo.IMAGE_SIZE
    print(f"[4/4] {larger_image_size} px at the MACs of {own_size} px vs the unreduced model at {own_size} px")
    fine_tuned[f"unreduced, {own_size} px"] = fine_tune(
        vit_dir, os.path.join(runs_dir, "stock-size"), seed, fine_tune_steps, ["--keep_rate", "1.0"]
    )
    fine_tuned[f"{larger_image_size} px, MACs of {own_size} px"] = fine_tune(
        vit_dir,
        os.path.join(runs_dir, "larger-size"),
        seed,
        fine_tune_steps,
        ["--image_size", str(larger_image_size), "--match_macs_of_image_size", str(own_size)],
    )
    shutil.rmtree(initial, ignore_errors=True)

    summary = {
        "seed": seed,
        "vit_epochs": vit_epochs,
        "vit_accuracy": vit_results["eval_accuracy"],
        "vit_macs": count_macs(evit_hf.EViTConfig.from_pretrained(vit_dir), keep_rate=1.0),
        "off_the_shelf": shelf,
        "fine_tuned": fine_tuned,
        "seconds": time.perf_counter() - started,
    }
    table = markdown(summary)
    with open(os.path.join(output_dir, "budget_study.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    with open(os.path.join(output_dir, "budget_study.md"), "w") as handle:
        handle.write(table + "\n")
    print()
    print(table)
    print(f"\ndone in {summary['seconds']:.0f} s")
    return summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/digits_budget_study")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vit_epochs", type=int, default=30, help="Epochs of the ViT trained from scratch.")
    parser.add_argument("--fine_tune_steps", type=int, default=200, help="Steps of every fine-tuning run.")
    parser.add_argument("--larger_image_size", type=int, default=40, help="Input side of the equal-MACs run (px).")
    parser.add_argument("--calibration_images", type=int, default=256, help="Unlabeled images for calibration.")
    args = parser.parse_args(argv)
    for flag in ("vit_epochs", "fine_tune_steps", "calibration_images"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1; got {getattr(args, flag)}.")
    if args.larger_image_size <= digits_demo.IMAGE_SIZE:
        parser.error(
            f"--larger_image_size must be above the model's own {digits_demo.IMAGE_SIZE} px; got "
            f"{args.larger_image_size}."
        )
    return run(
        args.output_dir,
        args.seed,
        args.vit_epochs,
        args.fine_tune_steps,
        args.larger_image_size,
        args.calibration_images,
    )


if __name__ == "__main__":
    main()
