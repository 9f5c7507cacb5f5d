#!/usr/bin/env python
"""EViT end to end, offline, in a few minutes on a laptop CPU, on real data: scikit-learn's handwritten digits.

1. trains a small ViT from scratch (examples/run_image_classification.py, keep rate 1.0: the stock ViT);
2. turns it into EViT and evaluates it off the shelf at several keep rates;
3. fine-tunes the EViT with the keep-rate warm-up (KeepRateScheduler) and evaluates it again;
4. prints a table (accuracy, images/s, MACs per keep rate), saves the EViT folder (safetensors, remote code, a model
   card with these results) and figures: accuracy and speed against keep rate, and the tokens kept on sample digits;
5. reports the share of kept tokens that cover ink.

    python examples/digits_demo.py --output_dir outputs/digits_demo
"""

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np
import torch
from PIL import Image
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

import evit_hf
from evit_hf.data import collate_images, digits_dataset, image_transforms


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_image_classification  # noqa: E402


KEEP_RATES = [1.0, 0.9, 0.7, 0.5]
IMAGE_SIZE, PATCH_SIZE = 32, 4  # 8 x 8 patches: one per pixel of the 8 x 8 digits
SMALL_VIT = dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, intermediate_size=128)


def build_initial_vit(folder: str, seed: int) -> None:
    """A randomly initialised small ViT with the digits' labels and an image processor, saved to `folder`."""
    torch.manual_seed(seed)
    labels = [str(digit) for digit in range(10)]
    config = ViTConfig(
        **SMALL_VIT,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_labels=10,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)


def train(model_folder: str, output_dir: str, seed: int, epochs: int, learning_rate: float, extra=()) -> dict:
    args = [
        "--model_name_or_path", model_folder,
        "--output_dir", output_dir,
        "--do_train", "--do_eval",
        "--num_train_epochs", str(epochs),
        "--learning_rate", str(learning_rate),
        "--weight_decay", "0.05",
        "--warmup_steps", "0.1",
        "--lr_scheduler_type", "cosine",
        "--per_device_train_batch_size", "64",
        "--per_device_eval_batch_size", "128",
        "--crop_scale_min", "0.75",
        "--no_random_flip",  # a mirrored digit is another digit
        "--logging_steps", "50",
        "--eval_strategy", "no",
        "--save_strategy", "no",
        "--report_to", "none",
        "--seed", str(seed),
        "--card_keep_rates",
        *[str(k) for k in KEEP_RATES],
        "--dataset_display_name", "scikit-learn digits",
        *extra,
    ]  # fmt: skip
    return run_image_classification.main(args)


def ink_share(model, raw, keep_rate: float = 0.7) -> dict:
    """Share of kept tokens whose patch has ink, against the share of ink patches among all patches."""
    processor = ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    kept_ink = kept_total = 0
    ink_patches = np.stack([np.asarray(image) > 64 for image in raw["image"]])  # [images, 8, 8]: ink at > 1/4
    pixel_values = processor([image.convert("RGB") for image in raw["image"]], return_tensors="pt").pixel_values
    with torch.no_grad():
        output = model.eval()(pixel_values, keep_rate=keep_rate)
    for layer_indices in output.kept_token_indices:
        for image_index, row in enumerate(layer_indices):
            patches = row[row >= 0].numpy()
            kept_ink += int(ink_patches[image_index].reshape(-1)[patches].sum())
            kept_total += len(patches)
    return {
        "keep_rate": keep_rate,
        "ink_share_of_kept_tokens": kept_ink / kept_total,
        "ink_share_of_all_patches": float(ink_patches.mean()),
    }


def plot_curves(rows_by_model: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (accuracy_axis, speed_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in rows_by_model.items():
        keep_rates = [row["keep_rate"] for row in rows]
        accuracy_axis.plot(keep_rates, [100 * row["accuracy"] for row in rows], marker="o", label=name)
        speed_axis.plot(keep_rates, [row["images_per_s"] for row in rows], marker="o", label=f"{name} (measured)")
    reference = next(iter(rows_by_model.values()))
    base = reference[0]
    speed_axis.plot(
        [row["keep_rate"] for row in reference],
        [base["images_per_s"] * base["macs"] / row["macs"] for row in reference],
        linestyle="--",
        color="grey",
        label="MACs bound",
    )
    for axis, label in ((accuracy_axis, "accuracy (%)"), (speed_axis, "images / s")):
        axis.set_xlabel("keep rate")
        axis.set_ylabel(label)
        axis.invert_xaxis()
        axis.grid(alpha=0.3)
        axis.legend()
    accuracy_axis.set_title("Digits validation accuracy")
    speed_axis.set_title("Inference speed (CPU)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def draw_kept_tokens(model, raw, path: str, count: int = 6, keep_rate: float = 0.7) -> None:
    """Rows of sample digits: the input, then the patches kept after each reduction layer."""
    processor = ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    rows = [
        evit_hf.visualize_kept_tokens(model, raw[i]["image"], image_processor=processor, keep_rate=keep_rate)
        for i in range(count)
    ]
    canvas = Image.new("RGB", (rows[0].width, sum(row.height for row in rows)), "white")
    top = 0
    for row in rows:
        canvas.paste(row, (0, top))
        top += row.height
    canvas.save(path)


def comparison_table(vit_row: dict, shelf_rows: list[dict], tuned_rows: list[dict]) -> str:
    lines = [
        "| keep rate | ViT | EViT off the shelf | EViT fine-tuned | images/s (fine-tuned) | MACs |",
        "|---|---|---|---|---|---|",
    ]
    for shelf, tuned in zip(shelf_rows, tuned_rows, strict=True):
        vit = f"{100 * vit_row['accuracy']:.2f}" if shelf["keep_rate"] == 1.0 else ""
        lines.append(
            f"| {shelf['keep_rate']:g} | {vit} | {100 * shelf['accuracy']:.2f} | {100 * tuned['accuracy']:.2f} | "
            f"{tuned['images_per_s']:.0f} | {tuned['macs'] / 1e6:.2f} M |"
        )
    return "\n".join(lines)


def run(output_dir: str, seed: int = 0, vit_epochs: int = 30, evit_epochs: int = 10, figures: bool = True) -> dict:
    start = time.perf_counter()
    os.makedirs(output_dir, exist_ok=True)
    initial, vit_dir, evit_dir = (os.path.join(output_dir, name) for name in ("initial_vit", "vit", "evit"))
    for folder in (initial, vit_dir, evit_dir):
        shutil.rmtree(folder, ignore_errors=True)
    build_initial_vit(initial, seed)

    print(f"[1/4] training a small ViT from scratch on digits ({vit_epochs} epochs)")
    train(initial, vit_dir, seed, vit_epochs, 2e-3, extra=["--keep_rate", "1.0", "--card_keep_rates", "1.0"])
    processor = ViTImageProcessorPil.from_pretrained(vit_dir)
    raw_validation = digits_dataset(seed=seed)["validation"]  # the split the example held out (same seed)
    validation = raw_validation.with_transform(image_transforms(processor, "image")[1])

    print("[2/4] the trained ViT as EViT, off the shelf")
    shelf_model = evit_hf.EViTForImageClassification.from_pretrained(vit_dir, keep_rate=0.7)
    vit_row = evit_hf.evaluate_keep_rates(shelf_model, validation, [1.0], 128, collate_images)[0]
    shelf_rows = evit_hf.evaluate_keep_rates(shelf_model, validation, KEEP_RATES, 128, collate_images)

    print(f"[3/4] fine-tuning EViT 0.7 with the keep-rate warm-up ({evit_epochs} epochs)")
    train(
        vit_dir,
        evit_dir,
        seed,
        evit_epochs,
        5e-4,
        extra=["--keep_rate", "0.7", "--keep_rate_warmup", "1", "--keep_rate_shrink", "3"],
    )
    tuned_model = evit_hf.EViTForImageClassification.from_pretrained(evit_dir)
    tuned_rows = evit_hf.evaluate_keep_rates(tuned_model, validation, KEEP_RATES, 128, collate_images)

    print("[4/4] figures, model card, ink share")
    ink = ink_share(tuned_model, raw_validation)
    table = comparison_table(vit_row, shelf_rows, tuned_rows)
    if figures:
        plot_curves(
            {"EViT off the shelf": shelf_rows, "EViT fine-tuned": tuned_rows},
            os.path.join(evit_dir, "accuracy_speed_vs_keep_rate.png"),
        )
        draw_kept_tokens(tuned_model, raw_validation, os.path.join(evit_dir, "kept_tokens.png"))
    note = (
        f"Digits validation split (360 images), seed {seed}. The ViT (keep rate 1.0) scores "
        f"{100 * vit_row['accuracy']:.2f}%. Per keep rate:\n\n{table}\n\nAt keep rate 0.7, "
        f"{100 * ink['ink_share_of_kept_tokens']:.1f}% of the kept tokens cover ink, against "
        f"{100 * ink['ink_share_of_all_patches']:.1f}% of all patches."
    )
    card = evit_hf.create_model_card(
        tuned_model,
        repo_id="evit-digits",
        dataset_name="scikit-learn digits",
        results=tuned_rows,
        results_note=note,
    )
    card.save(os.path.join(evit_dir, "README.md"))
    shutil.rmtree(initial, ignore_errors=True)

    summary = {
        "seed": seed,
        "vit_accuracy": vit_row["accuracy"],
        "off_the_shelf": shelf_rows,
        "fine_tuned": tuned_rows,
        "ink": ink,
        "seconds": time.perf_counter() - start,
        "evit_folder": evit_dir,
    }
    with open(os.path.join(output_dir, "demo_results.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    print()
    print(table)
    print(
        f"\nink share of kept tokens at 0.7: {100 * ink['ink_share_of_kept_tokens']:.1f}% "
        f"(all patches: {100 * ink['ink_share_of_all_patches']:.1f}%)"
    )
    print(f"EViT folder: {evit_dir} | figures: accuracy_speed_vs_keep_rate.png, kept_tokens.png")
    print(f"done in {summary['seconds']:.0f} s")
    return summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/digits_demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vit_epochs", type=int, default=30)
    parser.add_argument("--evit_epochs", type=int, default=10)
    args = parser.parse_args(argv)
    return run(args.output_dir, args.seed, args.vit_epochs, args.evit_epochs)


if __name__ == "__main__":
    main()
