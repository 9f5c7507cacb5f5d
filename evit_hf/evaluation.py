"""Accuracy and speed of one model at several keep rates: the shape of the paper's Table 1."""

import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .macs import count_macs
from .metrics import Accuracy, TopKAccuracy


def evaluate_keep_rates(
    model,
    dataset,
    keep_rates=(1.0, 0.9, 0.8, 0.7, 0.6, 0.5),
    batch_size: int = 64,
    collate_fn=None,
    progress: bool = True,
) -> list[dict]:
    """Runs `model` over `dataset` (items with "pixel_values" and "labels" after `collate_fn`) once per keep rate.

    Returns one row per keep rate: `keep_rate`, `accuracy`, `top5_accuracy` (more than 5 classes), `images_per_s`
    (the forward passes only) and `macs` (one image, from the configuration).
    """
    from .data import collate_images

    collate_fn = collate_fn or collate_images
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn)
    model.eval()
    device = next(model.parameters()).device
    num_labels = model.config.num_labels
    accuracy, top5 = Accuracy(), TopKAccuracy(k=5) if num_labels > 5 else None
    image_size = tuple(dataset[0]["pixel_values"].shape[-2:])  # one transformed example, for the MAC count
    rows = []
    for keep_rate in keep_rates:
        logits, labels, seconds = [], [], 0.0
        iterator = tqdm(loader, desc=f"keep rate {keep_rate}", leave=False, disable=not progress)
        with torch.inference_mode():
            for batch in iterator:
                pixel_values = batch["pixel_values"].to(device)
                start = time.perf_counter()
                output = model(pixel_values, keep_rate=keep_rate)
                seconds += time.perf_counter() - start
                logits.append(output.logits.float().cpu())
                labels.append(batch["labels"])
        logits, labels = torch.cat(logits).numpy(), torch.cat(labels).numpy()
        row = {"keep_rate": keep_rate}
        row.update(accuracy.compute(predictions=np.argmax(logits, axis=1), references=labels))
        if top5 is not None:
            row.update(top5.compute(predictions=logits, references=labels))
        row["images_per_s"] = len(labels) / seconds
        row["macs"] = count_macs(model.config, image_size=image_size, keep_rate=keep_rate)
        rows.append(row)
    return rows


def results_markdown(rows: list[dict], title_column: str = "keep rate") -> str:
    """A markdown table of `evaluate_keep_rates` rows."""
    has_top5 = any("top5_accuracy" in row for row in rows)
    header = f"| {title_column} | accuracy |" + (" top-5 |" if has_top5 else "") + " images/s | MACs |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        cells = [f"{row['keep_rate']:g}", f"{100 * row['accuracy']:.2f}"]
        if has_top5:
            cells.append(f"{100 * row.get('top5_accuracy', float('nan')):.2f}")
        cells += [f"{row['images_per_s']:.1f}", f"{row['macs'] / 1e6:.2f} M"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["evaluate_keep_rates", "results_markdown"]
