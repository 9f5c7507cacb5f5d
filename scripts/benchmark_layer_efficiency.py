"""How fast the stock ViT layer itself runs at the token counts EViT leaves, per multiply-accumulate.

The MACs ratio is a bound for EViT's speed-up only if a layer's time is proportional to its MACs. At small batches it
is not: a [tokens, dim] x [dim, 4 dim] product with fewer rows runs slower per MAC, and each layer reads all of its
weights whatever its token count. This script runs the layers of a full-depth stock transformers DeiT/ViT model in
order (attention block at the tokens a layer starts with, MLP block at the tokens it ends with), once at the full token
count and once along EViT's token schedule, in alternating rounds, and prints the speed-up a perfect EViT (stock
blocks, zero-cost reorganization) would reach, next to the MACs ratio. `--one-layer` reuses one layer's weights for
every layer instead (weights stay in cache: the per-row cost alone). Compare it with `evit-hf benchmark --overhead` at
the same batch and threads.

    OMP_NUM_THREADS=1 python scripts/benchmark_layer_efficiency.py --model deit-small --batch-sizes 1 4 --keep-rate 0.7
"""

import argparse
import json
import statistics
import sys
import time


def main(argv=None):
    from evit_hf.commands.arguments import (
        keep_rate_argument,  # the configurations' own check, `check_keep_rate`; no torch
    )

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deit-small", help="a ViT/DeiT shape of `evit-hf benchmark`")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--keep-rate", type=keep_rate_argument, default=0.7)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument(
        "--one-layer", action="store_true", help="time one layer's weights at every depth (weights stay in cache)"
    )
    args = parser.parse_args(argv)

    import torch
    from transformers import ViTConfig, ViTModel

    from evit_hf import EViTConfig, count_macs
    from evit_hf.benchmark import macs_config
    from evit_hf.configuration_evit_base import keep_rates_by_layer
    from evit_hf.families import benchmark_shapes
    from evit_hf.token_reorganization import num_kept_tokens

    shapes = benchmark_shapes()
    # The blocks timed are the stock ViT layer's: shapes of the families with one class token and a GELU MLP.
    plain = [name for name, (family, _) in shapes.items() if family.name in ("vit", "deit")]
    if args.model not in plain:
        parser.error(f"--model must be one of {', '.join(plain)}, not {args.model!r}")
    _, shape = shapes[args.model]
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = {key: value for key, value in shape.items() if key in ViTConfig().to_dict()}
    evit_config = EViTConfig(**shape, keep_rate=args.keep_rate)
    depth = 1 if args.one_layer else evit_config.num_hidden_layers
    config = ViTConfig(**{**shape, "num_hidden_layers": depth}, attn_implementation="sdpa")
    layers = ViTModel(config, add_pooling_layer=False).eval().layers
    layers = [layers[index % depth] for index in range(evit_config.num_hidden_layers)]
    distinct_layers = len({id(layer) for layer in layers})

    # The token counts along EViT's schedule, as count_macs walks it: (tokens the attention block sees, tokens the MLP
    # block sees) per layer. One class token; the fused token of a reduction layer is a candidate of the next one.
    tokens = (config.image_size // config.patch_size) ** 2 + 1
    layer_keep_rates = keep_rates_by_layer(evit_config.keep_rate, evit_config.reduction_layers)
    schedule = []
    for index in range(evit_config.num_hidden_layers):
        before = tokens
        if index in evit_config.reduction_layers:
            kept = num_kept_tokens(tokens - 1, layer_keep_rates[index])
            if kept < tokens - 1:
                tokens = 1 + kept + int(evit_config.fuse_inattentive_tokens)
        schedule.append((before, tokens))

    def run_layers(inputs, token_counts):
        # Each layer's blocks on fresh inputs of its token counts: the time of the blocks, not of a reorganization.
        for layer, (before, after) in zip(layers, token_counts, strict=True):
            inputs[before] + layer.attention(layer.layernorm_before(inputs[before]))[0]
            inputs[after] + layer.mlp(layer.layernorm_after(inputs[after]))

    full = schedule[0][0]
    # As `evit-hf benchmark` counts it for this model, head included.
    counted = macs_config(args.model, config.image_size)
    macs_ratio = count_macs(counted, keep_rate=1.0) / count_macs(counted, keep_rate=args.keep_rate)
    passes = {"stock": [(full, full)] * len(schedule), "evit": schedule}
    results = []
    with torch.inference_mode():
        for batch_size in args.batch_sizes:
            inputs = {n: torch.randn(batch_size, n, config.hidden_size) for pair in schedule for n in pair}
            timings = {name: [] for name in passes}
            for round_index in range(args.rounds + 3):  # alternating rounds; the first 3 warm up
                for name, token_counts in passes.items():
                    start = time.perf_counter()
                    run_layers(inputs, token_counts)
                    if round_index >= 3:
                        timings[name].append(time.perf_counter() - start)
            stock_s, evit_s = (statistics.median(timings[name]) for name in ("stock", "evit"))
            results.append(
                {
                    "model": args.model,
                    "batch_size": batch_size,
                    "threads": torch.get_num_threads(),
                    "distinct_layers": distinct_layers,
                    "keep_rate": args.keep_rate,
                    "token_schedule": schedule,
                    "macs_ratio": round(macs_ratio, 4),
                    "stock_blocks_speedup": round(stock_s / evit_s, 4),
                    "stock_blocks_speedup_over_macs_ratio": round(stock_s / evit_s / macs_ratio, 4),
                }
            )
            print(
                f"{args.model} batch {batch_size}, {torch.get_num_threads()} thread(s), keep {args.keep_rate}, "
                f"{distinct_layers} distinct layer(s): "
                f"stock blocks along EViT's token schedule give {stock_s / evit_s:.3f}x, MACs ratio {macs_ratio:.3f} "
                f"({stock_s / evit_s / macs_ratio:.3f} of it)",
                file=sys.stderr,
            )
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
