"""How fast the stock ViT layer itself runs at the token counts EViT leaves, per multiply-accumulate.

The MACs ratio is a bound for EViT's speed-up only if a layer's time is proportional to its MACs. At small batches it
is not: a [tokens, dim] x [dim, 4 dim] product with fewer rows runs slower per MAC. This script times the stock
transformers DeiT/ViT blocks (attention block at the tokens a layer starts with, MLP block at the tokens it ends with),
sums them along EViT's token schedule, and prints the speed-up a perfect EViT (stock blocks, zero-cost reorganization)
would reach, next to the MACs ratio. Compare it with `evit-hf benchmark --overhead` at the same batch and threads.

    OMP_NUM_THREADS=1 python scripts/benchmark_layer_efficiency.py --model deit-small --batch-sizes 1 4 --keep-rate 0.7
"""

import argparse
import json
import statistics
import sys
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deit-small", help="a ViT/DeiT shape of `evit-hf benchmark`")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--keep-rate", type=float, default=0.7)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args(argv)
    if not 0 < args.keep_rate <= 1:
        parser.error(f"--keep-rate must be in (0, 1], not {args.keep_rate}")

    import torch
    from transformers import ViTConfig, ViTModel

    from evit_hf import EViTConfig, count_macs
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
    config = ViTConfig(**{**shape, "num_hidden_layers": 1}, attn_implementation="sdpa")
    layer = ViTModel(config, add_pooling_layer=False).eval().layers[0]
    evit_config = EViTConfig(**shape, keep_rate=args.keep_rate)

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

    def attention_block(x):
        return x + layer.attention(layer.layernorm_before(x))[0]

    def mlp_block(x):
        return x + layer.mlp(layer.layernorm_after(x))

    results = []
    with torch.inference_mode():
        for batch_size in args.batch_sizes:
            counts = sorted({n for pair in schedule for n in pair})
            inputs = {n: torch.randn(batch_size, n, config.hidden_size) for n in counts}
            timings = {(block, n): [] for block in ("attention", "mlp") for n in counts}
            for round_index in range(args.rounds + 3):  # alternating rounds; the first 3 warm up
                for n in counts:
                    for block, function in (("attention", attention_block), ("mlp", mlp_block)):
                        start = time.perf_counter()
                        function(inputs[n])
                        if round_index >= 3:
                            timings[block, n].append(time.perf_counter() - start)
            median = {key: statistics.median(values) for key, values in timings.items()}
            full = schedule[0][0]
            stock_s = evit_config.num_hidden_layers * (median["attention", full] + median["mlp", full])
            evit_s = sum(median["attention", before] + median["mlp", after] for before, after in schedule)
            macs_ratio = count_macs(evit_config, keep_rate=1.0) / count_macs(evit_config)
            results.append(
                {
                    "model": args.model,
                    "batch_size": batch_size,
                    "threads": torch.get_num_threads(),
                    "keep_rate": args.keep_rate,
                    "token_schedule": schedule,
                    "macs_ratio": round(macs_ratio, 4),
                    "stock_blocks_speedup": round(stock_s / evit_s, 4),
                    "stock_blocks_speedup_over_macs_ratio": round(stock_s / evit_s / macs_ratio, 4),
                }
            )
            print(
                f"{args.model} batch {batch_size}, {torch.get_num_threads()} thread(s), keep {args.keep_rate}: "
                f"stock blocks along EViT's token schedule give {stock_s / evit_s:.3f}x, MACs ratio {macs_ratio:.3f} "
                f"({stock_s / evit_s / macs_ratio:.3f} of it)",
                file=sys.stderr,
            )
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
