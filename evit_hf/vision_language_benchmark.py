"""`evit-hf benchmark` for vision-language models (LLaVA): stock against EViT in one process, batch 1, one image and a
prompt of text tokens. Prefill time, decoding tokens/s and the language model's KV-cache bytes, each EViT row with its
speed-up and MACs ratio against the stock model (the bound), for the default schedule and for one reduction at the
feature layer, at each keep rate."""

import copy
import inspect
import statistics
import time

from .configuration_evit_base import format_keep_rate
from .vision_language import DEFAULT_PROMPT_LENGTH


# Options of `evit-hf benchmark` that the vision-language preset does not vary: it measures batch 1 at the tower's
# image size, in inference, uncompiled.
FIXED_OPTIONS = ("--batch-sizes", "--image-sizes", "--compile", "--modes", "--resolutions", "--overhead",
                 "--backend-difference")  # fmt: skip
DECODE_TOKENS = 16


def is_vision_language_shape(model: str) -> bool:
    from .families import benchmark_shapes

    shape = benchmark_shapes().get(model)
    return shape is not None and shape[0].count_macs is not None


def _schedules(config, keep_rates) -> list[tuple[str, list[int], object]]:
    """(schedule name, reduction layers, keep rate) of each EViT row: the default layers, and one reduction at the
    (first) feature layer, at each keep rate (per-layer rates only with the default layers)."""
    from .configuration_evit_base import default_reduction_layers

    vision = config.vision_config
    feature_output = min(config.feature_hidden_states) - 1  # the 0-based layer whose output is read
    rows = []
    for keep_rate in keep_rates:
        rows.append(("default layers", default_reduction_layers(vision.num_hidden_layers), keep_rate))
    for keep_rate in keep_rates:
        if not isinstance(keep_rate, list):
            rows.append((f"layer {feature_output} only", [feature_output], keep_rate))
    return rows


def _inputs(model, image_tokens: int, prompt_length: int, image_size: int, dtype, device):
    import torch

    generator = torch.Generator().manual_seed(0)
    vocab = model.config.text_config.vocab_size
    text = torch.randint(3, min(vocab, model.config.image_token_id), (1, prompt_length), generator=generator)
    input_ids = torch.cat([torch.full((1, image_tokens), model.config.image_token_id), text], dim=1).to(device)
    pixel_values = torch.randn(1, 3, image_size, image_size, generator=generator).to(device, dtype)
    return {"input_ids": input_ids, "pixel_values": pixel_values, "attention_mask": torch.ones_like(input_ids)}


def _synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _cache_of(output):
    """The key/value cache a forward returned (`cache` in newer transformers, `past_key_values` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _cache_argument(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_bytes(cache) -> int:
    """Bytes of the keys and values a prefill left in the language model's cache."""
    layers = getattr(cache, "layers", None) or []
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in layers if getattr(layer, "keys", None) is not None)


def _prefill(model, inputs):
    return model(**inputs, use_cache=True, logits_to_keep=1)


def _timed_prefill(model, inputs, device: str):
    """(seconds, output) of one prefill."""
    _synchronize(device)
    start = time.perf_counter()
    output = _prefill(model, inputs)
    _synchronize(device)
    return time.perf_counter() - start, output


def _decode_seconds(model, output, device: str) -> float:
    """Seconds of `DECODE_TOKENS` greedy steps, one token each over the cache that the prefill `output` left: the
    decoding alone (a difference of two `generate` times would be a small difference of two large, noisy numbers)."""
    cache, cache_argument = _cache_of(output), _cache_argument(model)
    token = output.logits[:, -1:].argmax(-1)  # [batch, 1]
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(DECODE_TOKENS):
        output = model(input_ids=token, use_cache=True, logits_to_keep=1, **{cache_argument: cache})
        cache, token = _cache_of(output), output.logits[:, -1:].argmax(-1)
    _synchronize(device)
    return time.perf_counter() - start


def _measure_in_alternation(variants, warmup: int, rounds: int, device: str) -> list[dict]:
    """Prefill and decoding times of each `(model, settings, inputs)` variant, the variants run in turn within each
    round (so that a drift of the machine hits them alike); medians over the rounds, after `warmup` rounds."""
    import torch

    prefill_times = [[] for _ in variants]
    decode_times = [[] for _ in variants]
    with torch.inference_mode():
        for round_index in range(warmup + rounds):
            for index, (model, settings, inputs) in enumerate(variants):
                settings()
                prefill_seconds, output = _timed_prefill(model, inputs, device)
                decode_seconds = _decode_seconds(model, output, device)
                if round_index >= warmup:
                    prefill_times[index].append(prefill_seconds)
                    decode_times[index].append(decode_seconds)
        measured = []
        for index, (model, settings, inputs) in enumerate(variants):
            settings()
            measured.append({
                "prefill_ms": 1000 * statistics.median(prefill_times[index]),
                "decode_tokens_per_s": DECODE_TOKENS / statistics.median(decode_times[index]),
                "kv_cache_bytes": _cache_bytes(_cache_of(_prefill(model, inputs))),
                "prompt_tokens": int(inputs["input_ids"].shape[1]),
            })  # fmt: skip
    return measured


def run_vision_language_benchmark(
    shape_name: str,
    keep_rates,
    prompt_length: int = DEFAULT_PROMPT_LENGTH,
    warmup: int = 1,
    rounds: int = 3,
    attn_implementation: str = "sdpa",
    dtype: str = "float32",
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Builds the stock model of `shape_name` (random weights) and, converted in place for each row, its EViT
    schedules; measures each on one image and `prompt_length` text tokens. Returns `{"rows": [...], ...}`."""
    import torch
    from transformers import LlavaConfig

    from .families import benchmark_shapes
    from .macs import count_macs
    from .patch import apply_evit

    family, shape = benchmark_shapes()[shape_name]
    stock_class, _ = family.benchmark_models
    torch_dtype = getattr(torch, dtype)
    config = LlavaConfig(**shape)
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    model = stock_class(config).to(device, torch_dtype).eval()
    image_size = config.vision_config.image_size
    stock_tokens = (image_size // config.vision_config.patch_size) ** 2
    stock_macs = count_macs(config, prompt_length=prompt_length)

    def report(text):
        if progress:
            print(text, flush=True)

    report(f"stock: {stock_tokens} image tokens + {prompt_length} text tokens")
    stock_inputs = _inputs(model, stock_tokens, prompt_length, image_size, torch_dtype, device)
    evit_model = apply_evit(copy.deepcopy(model), keep_rate=1.0)  # the same weights; settings per variant
    evit_config = evit_model.config

    def use_schedule(layers, keep_rate):
        def settings():
            evit_config.keep_rate = 1.0  # a number first: it fits any layers
            evit_config.reduction_layers = layers
            evit_config.keep_rate = keep_rate

        return settings

    variants, rows = [(model, lambda: None, stock_inputs)], []
    for schedule, layers, keep_rate in _schedules(evit_config, keep_rates):
        use_schedule(layers, keep_rate)()
        tokens = evit_config.image_feature_count()
        report(f"EViT {schedule}, keep rate {format_keep_rate(keep_rate)}: {tokens} image tokens")
        variants.append(
            (evit_model, use_schedule(layers, keep_rate), _inputs(model, tokens, prompt_length, image_size,
                                                                 torch_dtype, device))
        )  # fmt: skip
        rows.append({
            "model": "EViT", "schedule": schedule, "keep_rate": keep_rate, "reduction_layers": list(layers),
            "image_tokens": tokens, "macs": count_macs(evit_config, prompt_length=prompt_length),
        })  # fmt: skip
    stock, *measured = _measure_in_alternation(variants, warmup, rounds, device)
    for row, times in zip(rows, measured, strict=True):
        speedup = stock["prefill_ms"] / times["prefill_ms"]
        row.update(times, prefill_speedup=speedup, macs_ratio=stock_macs / row["macs"],
                   share_of_bound=speedup * row["macs"] / stock_macs,
                   kv_cache_ratio=stock["kv_cache_bytes"] / max(times["kv_cache_bytes"], 1))  # fmt: skip
    rows.insert(0, {"model": "stock", "schedule": "-", "keep_rate": 1.0, "image_tokens": stock_tokens,
                    "macs": stock_macs, **stock})  # fmt: skip
    return {
        "model": shape_name,
        "device": device,
        "threads": torch.get_num_threads(),
        "attn_implementation": attn_implementation,
        "dtype": dtype,
        "prompt_length": prompt_length,
        "decode_tokens": DECODE_TOKENS,
        "rows": rows,
    }


def vision_language_markdown(results: dict) -> str:
    """The rows as a Markdown table."""
    header = (
        f"{results['model']} on {results['device']} ({results['threads']} threads, {results['dtype']}, "
        f"{results['attn_implementation']}), batch 1, 1 image + {results['prompt_length']} text tokens\n\n"
        "| model | schedule | keep rate | image tokens | prefill ms | decode tok/s | KV cache MiB | GMACs | "
        "prefill speed-up | MACs ratio | share of bound |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for row in results["rows"]:
        speed = (
            f"{row['prefill_speedup']:.2f} | {row['macs_ratio']:.2f} | {row['share_of_bound']:.2f}"
            if "prefill_speedup" in row
            else "1.00 | 1.00 | -"
        )
        lines.append(
            f"| {row['model']} | {row['schedule']} | {format_keep_rate(row['keep_rate'])} | {row['image_tokens']} | "
            f"{row['prefill_ms']:.0f} | {row['decode_tokens_per_s']:.1f} | {row['kv_cache_bytes'] / 2**20:.2f} | "
            f"{row['macs'] / 1e9:.1f} | {speed} |"
        )
    return header + "\n".join(lines)


def check_options(parser, args, argv) -> None:
    """Refuses, with argparse's one line, the options the vision-language preset does not take and devices or
    attention implementations that cannot run."""
    from .benchmark import attn_implementation_problem, device_problem

    given = [option for option in FIXED_OPTIONS if any(arg.split("=")[0] == option for arg in argv)]
    if given:
        parser.error(
            f"argument {given[0]}: the vision-language preset {args.model} measures batch 1 at its tower's image "
            "size, in inference; leave out " + ", ".join(given)
        )
    for option, values, check in (
        ("--devices", args.devices, device_problem),
        ("--attn-implementations", args.attn_implementations, attn_implementation_problem),
    ):
        problem = next((check(value) for value in values if check(value)), None)
        if problem:
            parser.error(f"argument {option}: {problem}")


def run_command(args) -> dict:
    """`evit-hf benchmark` on a vision-language shape, once `check_options` passed and the output folder is held:
    runs each device, attention implementation and dtype, prints the tables, and writes benchmark.json and
    benchmark.md into `--output-dir`."""
    import json
    import os

    runs = []
    for device in args.devices:
        for attn_implementation in args.attn_implementations:
            for dtype in args.dtypes:
                runs.append(
                    run_vision_language_benchmark(
                        args.model,
                        args.keep_rates,
                        warmup=args.warmup,
                        rounds=args.rounds,
                        attn_implementation=attn_implementation,
                        dtype=dtype,
                        device=device,
                        progress=not args.no_progress,
                    )
                )
    text = "\n\n".join(vision_language_markdown(run) for run in runs)
    print(text)
    results = {"vision_language": runs}
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "benchmark.json"), "w") as file:
            json.dump(results, file, indent=1)
        with open(os.path.join(args.output_dir, "benchmark.md"), "w") as file:
            file.write(text + "\n")
    return results


__all__ = [
    "FIXED_OPTIONS",
    "check_options",
    "is_vision_language_shape",
    "run_command",
    "run_vision_language_benchmark",
    "vision_language_markdown",
]
