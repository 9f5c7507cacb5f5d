#!/usr/bin/env python
"""How long the check of an image folder takes (`evit_hf.data.scan_image_folder`): the first check, which decodes
every image, and a cached one (a rerun, a resume or an evaluation of the same folder), on generated 400 x 300 JPEGs.

    python scripts/benchmark_folder_check.py --folder /tmp/folder-check-jpegs --images 8000

The images are written once into --folder (FOLDER/CLASS/IMAGE, photo-like: smooth colour fields with grain, about
35 kB each at quality 90) and reused by later runs. Each round checks the folder with a fresh, empty cache, then again
with the cache the first check wrote; --full-decode also times the decode of every full-size image that a check
without reduced-size JPEG decoding would cost. Prints a JSON line per round and a markdown summary with the
extrapolation to ImageNet-train (1,281,167 images).
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image


IMAGENET_TRAIN_IMAGES = 1_281_167


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def write_jpegs(folder: str, count: int, classes: int, size=(400, 300), seed: int = 0) -> None:
    """`count` photo-like JPEGs in `classes` class sub-folders of `folder` (kept where they already are)."""
    rng = np.random.default_rng(seed)
    per_class = -(-count // classes)
    for index in range(count):
        label, number = divmod(index, per_class)
        path = os.path.join(folder, f"class_{label:03d}", f"{number:06d}.jpg")
        if os.path.exists(path):
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        coarse = rng.integers(0, 256, (size[1] // 20, size[0] // 20, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize(size, Image.BICUBIC), dtype=np.float32)
        grain = rng.normal(0, 12, smooth.shape)
        Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(path, format="JPEG", quality=90)


def cpu_seconds() -> float:
    """User and system CPU time of this process, all threads."""
    times = os.times()
    return times.user + times.system


def full_decode_seconds(paths: list[str], threads: int) -> float:
    def decode(path):
        with Image.open(path) as image:
            image.load()

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(decode, paths, chunksize=64))
    return time.perf_counter() - started


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "folder-check-jpegs"))
    parser.add_argument("--images", type=positive_int, default=8000, help="JPEGs in the folder (default 8000).")
    parser.add_argument("--classes", type=positive_int, default=10, help="Class sub-folders (default 10).")
    parser.add_argument("--rounds", type=positive_int, default=3, help="First and cached checks, each (default 3).")
    parser.add_argument("--threads", type=positive_int, default=None, help="Checking threads (default: the check's).")
    parser.add_argument("--full-decode", action="store_true", help="Also time full-size decoding of every image.")
    args = parser.parse_args(argv)
    if os.path.exists(args.folder) and not os.path.isdir(args.folder):
        parser.error(f"argument --folder: {args.folder} is a file, not a folder")

    from evit_hf.data import scan_image_folder

    write_jpegs(args.folder, args.images, args.classes)
    first, first_cpu, cached, full = [], [], [], []
    for _ in range(args.rounds):
        cache_dir = tempfile.mkdtemp(prefix="folder-check-cache-")
        try:
            started, cpu_started = time.perf_counter(), cpu_seconds()
            contents = scan_image_folder(args.folder, num_threads=args.threads, cache_dir=cache_dir)
            first.append(time.perf_counter() - started)
            first_cpu.append(cpu_seconds() - cpu_started)
            started = time.perf_counter()
            again = scan_image_folder(args.folder, num_threads=args.threads, cache_dir=cache_dir)
            cached.append(time.perf_counter() - started)
        finally:
            shutil.rmtree(cache_dir)
        if contents.decoded != len(contents.images) or again.decoded != 0:
            raise RuntimeError(f"expected {len(contents.images)} decodes then none, got {contents.decoded}, "
                               f"{again.decoded}")  # fmt: skip
        if args.full_decode:
            threads = args.threads or min(32, (os.cpu_count() or 1) + 4)
            full.append(full_decode_seconds(contents.images, threads))
        row = {
            "images": len(contents.images),
            "first_check_s": first[-1],
            "first_check_cpu_s": first_cpu[-1],
            "cached_check_s": cached[-1],
            "load_average": os.getloadavg()[0],
        }
        print(json.dumps({**row, **({"full_decode_s": full[-1]} if full else {})}), flush=True)

    images = len(contents.images)
    first_s, cached_s = statistics.median(first), statistics.median(cached)
    summary = {
        "images": images,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "first_check_images_per_s": images / first_s,
        "first_check_images_per_s_best": images / min(first),  # the round least slowed by other work
        # CPU time (user + system, all threads) per image: what the check costs whatever else the machine runs.
        "first_check_cpu_ms_per_image": 1000 * statistics.median(first_cpu) / images,
        "cached_check_s": cached_s,
        "cached_share_of_first": cached_s / first_s,
        "imagenet_train_first_check_min": IMAGENET_TRAIN_IMAGES / (images / first_s) / 60,
        "imagenet_train_cached_check_s": cached_s * IMAGENET_TRAIN_IMAGES / images,
    }
    if full:
        summary["full_decode_images_per_s"] = images / statistics.median(full)
    print(f"\n| {images} JPEGs, 400 x 300 | median of {args.rounds} |\n|---|---|")
    print(f"| first check | {first_s:.2f} s, {summary['first_check_images_per_s']:.0f} images/s "
          f"(best round {summary['first_check_images_per_s_best']:.0f}) |")  # fmt: skip
    print(f"| CPU time of the first check | {summary['first_check_cpu_ms_per_image']:.2f} ms per image |")
    print(f"| cached check | {cached_s:.3f} s ({100 * summary['cached_share_of_first']:.1f}% of the first) |")
    if full:
        print(f"| full-size decode, for comparison | {summary['full_decode_images_per_s']:.0f} images/s |")
    print(f"| ImageNet-train, first check | {summary['imagenet_train_first_check_min']:.0f} min |")
    print(f"| ImageNet-train, cached check | {summary['imagenet_train_cached_check_s']:.0f} s |")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
