"""Throughput of EViT against the stock transformers model with the same weights, measured in one process.

python -m evit_hf.benchmark --shape deit-small --batch-size 32 --keep-rates 0.7 0.5
"""

import argparse
import json
import statistics
import time

import torch
from transformers import ViTConfig, ViTForImageClassification

from .configuration_evit import EViTConfig
from .modeling_evit import EViTForImageClassification


# Model shapes by name (random weights: speed does not depend on them).
SHAPES = {
    "deit-tiny": dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768),
    "deit-small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    "deit-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


def build_models(shape: str, image_size: int = 224, attn_implementation: str = "sdpa", seed: int = 0):
    """A stock `ViTForImageClassification` of `shape` and an EViT classifier with the same weights, in eval mode."""
    settings = dict(SHAPES[shape], image_size=image_size, patch_size=16, num_labels=1000)
    torch.manual_seed(seed)
    stock = ViTForImageClassification(ViTConfig(**settings, attn_implementation=attn_implementation)).eval()
    evit = EViTForImageClassification(EViTConfig(**settings, attn_implementation=attn_implementation)).eval()
    evit.load_state_dict(stock.state_dict())
    return stock, evit


def max_logit_difference_between_backends(
    shape: str = "deit-small", keep_rate: float = 0.7, batch_size: int = 8, seed: int = 0
) -> dict:
    """Largest |logit difference| of EViT with eager against SDPA attention, same weights and inputs."""
    _, eager = build_models(shape, attn_implementation="eager", seed=seed)
    _, sdpa = build_models(shape, attn_implementation="sdpa", seed=seed)
    pixel_values = torch.randn(batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        a, b = eager(pixel_values, keep_rate=keep_rate), sdpa(pixel_values, keep_rate=keep_rate)
    same_tokens = all(torch.equal(x, y) for x, y in zip(a.kept_token_indices, b.kept_token_indices, strict=True))
    return {
        "shape": shape,
        "keep_rate": keep_rate,
        "max_abs_logit_difference": float((a.logits - b.logits).abs().max()),
        "max_abs_logit": float(a.logits.abs().max()),
        "same_kept_tokens": same_tokens,
    }


def throughput_comparison(
    shape: str = "deit-small",
    keep_rates: tuple[float, ...] = (0.7, 0.5),
    batch_size: int = 32,
    image_size: int = 224,
    attn_implementation: str = "sdpa",
    rounds: int = 10,
    warmup: int = 2,
) -> list[dict]:
    """Images/s of the stock model and of EViT at each keep rate, timed in alternation (one forward each per round),
    so that drifts of the machine hit every model alike. Returns one row per model with the median, the spread
    (min, max) and the ratio to the stock model's median."""
    stock, evit = build_models(shape, image_size, attn_implementation)
    pixel_values = torch.randn(batch_size, 3, image_size, image_size)
    runners = {"stock": lambda: stock(pixel_values)}
    for keep_rate in keep_rates:
        runners[f"evit-{keep_rate}"] = lambda keep_rate=keep_rate: evit(pixel_values, keep_rate=keep_rate)
    timings = {name: [] for name in runners}
    with torch.inference_mode():
        for round_index in range(warmup + rounds):
            for name, run in runners.items():
                start = time.perf_counter()
                run()
                elapsed = time.perf_counter() - start
                if round_index >= warmup:
                    timings[name].append(elapsed)
    stock_median = statistics.median(timings["stock"])
    rows = []
    for name, seconds in timings.items():
        median = statistics.median(seconds)
        rows.append(
            {
                "model": name,
                "images_per_s": batch_size / median,
                "images_per_s_min": batch_size / max(seconds),
                "images_per_s_max": batch_size / min(seconds),
                "latency_ms": 1000 * median,
                "speedup": stock_median / median,
            }
        )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="deit-small", choices=sorted(SHAPES))
    parser.add_argument("--keep-rates", type=float, nargs="+", default=[0.7, 0.5])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--attn-implementation", default="sdpa")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--backend-difference", action="store_true", help="also compare eager and SDPA logits")
    parser.add_argument("--output", help="write the results to this JSON file")
    args = parser.parse_args(argv)

    results = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "throughput": throughput_comparison(
            args.shape,
            tuple(args.keep_rates),
            args.batch_size,
            args.image_size,
            args.attn_implementation,
            args.rounds,
            args.warmup,
        ),
    }
    if args.backend_difference:
        results["backend_difference"] = max_logit_difference_between_backends(args.shape)
    print("| model | images/s (median) | min-max | latency ms | speed-up |")
    print("|---|---|---|---|---|")
    for row in results["throughput"]:
        print(
            f"| {row['model']} | {row['images_per_s']:.1f} | {row['images_per_s_min']:.1f}-"
            f"{row['images_per_s_max']:.1f} | {row['latency_ms']:.1f} | {row['speedup']:.3f}x |"
        )
    if "backend_difference" in results:
        print(json.dumps(results["backend_difference"]))
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
