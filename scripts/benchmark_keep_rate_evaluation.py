#!/usr/bin/env python
"""Wall time of `evit_hf.evaluate_keep_rates` at one keep rate and at six, on a folder of 800 x 600 JPEGs.

A small random ViT (224 px, patch 32) keeps the model's share small, so that decoding and transforming the images
dominate, as they do for ImageNet evaluation on a GPU. Six keep rates should then cost little more than one: each
image is decoded once and every batch runs at all keep rates.

Each line reports `wall_images_per_s` (all images over the wall time of the call: workers starting, decoding,
transforming and every keep rate's forward passes) and `forward_images_per_s` (per keep rate, what
`evaluate_keep_rates` reports: the images over that keep rate's forward passes alone).

    python scripts/benchmark_keep_rate_evaluation.py --work-dir outputs/evaluation_benchmark --workers 0 2
"""

import argparse
import glob
import json
import os
import time

import numpy as np
import torch
from datasets import load_dataset
from PIL import Image
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

import evit_hf
from evit_hf.data import collate_images, image_transforms


SIX_KEEP_RATES = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]


def make_images(folder: str, count: int, seed: int = 0) -> list[str]:
    """`count` 800 x 600 JPEGs (gradients and noise, quality 90) in 10 class folders; reused when present."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:600, 0:800]
    for index in range(count):
        label = index % 10
        path = os.path.join(folder, f"class{label}", f"{index}.jpg")
        if os.path.exists(path):
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        gradient = np.stack([(x * (label + 1) / 8) % 256, (y * (index % 7 + 1) / 6) % 256, (x + y) / 6 % 256], -1)
        pixels = np.clip(gradient + rng.normal(0, 20, gradient.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
    return sorted(glob.glob(os.path.join(folder, "*", "*.jpg")))[:count]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="outputs/evaluation_benchmark")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args(argv)

    files = make_images(os.path.join(args.work_dir, "images"), args.images)
    labels = [f"class{i}" for i in range(10)]
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=64, num_hidden_layers=12, num_attention_heads=2, intermediate_size=256, image_size=224,
        patch_size=32, num_labels=10, id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )  # fmt: skip
    model = evit_hf.apply_evit(ViTForImageClassification(config).eval())
    processor = ViTImageProcessor(size={"height": 224, "width": 224})
    cache_dir = os.path.join(args.work_dir, "cache")
    dataset = load_dataset("imagefolder", data_files={"validation": files}, cache_dir=cache_dir)["validation"]
    dataset.set_transform(image_transforms(processor, "image")[1])

    results = []
    for workers in args.workers:
        for keep_rates in ([0.7], SIX_KEEP_RATES):
            start = time.perf_counter()
            rows = evit_hf.evaluate_keep_rates(
                model, dataset, keep_rates, args.batch_size, collate_images, num_workers=workers, progress=False
            )
            wall = time.perf_counter() - start
            results.append(
                {"workers": workers, "keep_rates": len(keep_rates), "wall_s": round(wall, 2),
                 "wall_images_per_s": round(len(dataset) / wall, 1),
                 "forward_images_per_s": [round(row["images_per_s"], 1) for row in rows]}
            )  # fmt: skip
            print(json.dumps(results[-1]))
        one, six = results[-2]["wall_s"], results[-1]["wall_s"]
        print(f"workers {workers}: six keep rates take {six / one:.2f}x the wall time of one")
    return results


if __name__ == "__main__":
    main()
