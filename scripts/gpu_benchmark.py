"""The benchmark table of `scripts/gpu_check.sh`: EViT against the stock model on one GPU, row by row.

    python scripts/gpu_benchmark.py --output-dir gpu_check_results --time-budget 300

For every shape of `evit-hf benchmark` (DeiT-S, DeiT-B, CLIP ViT-B/16, DINOv2-S/B, and any shape added there later;
`deit-tiny` and `vit-base` are left out, see `LEFT_OUT_SHAPES`), each group of the grid times the stock model and EViT
at each keep rate, with the same weights and inputs, in alternation (one call of each per round, after warm-up
rounds), each call between two CUDA events. A group is one setting: inference or a training step, bf16 autocast or a
bf16-cast model, an attention implementation, compiled or not, a batch size. Each row reports images/s, latency, peak
memory, and the speed-up over the stock model next to the MACs ratio (`evit_hf.count_macs`), the bound for a speed-up
that comes from doing less arithmetic.

The grid is cut to fit a time budget (`--time-budget`): eager attention up to `--eager-max-batch-size`, the training
step and torch.compile at one batch size, compile groups last and only while the time left covers their estimated
compile time. Groups that did not fit are listed as not run, never dropped silently. A group fails when it raises, an
output is not finite, or EViT keeps other token counts than `evit_hf.num_kept_tokens` says; the command then exits
with status 1 after writing every other row.

`--device cpu` runs the same code on CPU (perf_counter instead of CUDA events), for tiny settings.
"""

import argparse
import copy
import importlib.util
import json
import math
import os
import re
import statistics
import sys
import time


DEFAULT_KEEP_RATES = [0.9, 0.7, 0.5]
DEFAULT_BATCH_SIZES = [1, 64, 256]
# Shapes of `evit-hf benchmark` that the table leaves out, with the reason.
LEFT_OUT_SHAPES = {
    "deit-tiny": "too small to load a GPU: its speed-ups measure kernel launches",
    "vit-base": "the shape of deit-base",
    "llava-1.5-tower-small-lm": "a vision-language model: `evit-hf benchmark --model llava-1.5-tower-small-lm` times "
    "its prefill and decoding",
}
# transformers' flash attention implementations and the package each needs; used only where it is installed.
FLASH_IMPLEMENTATIONS = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
PRECISIONS = ("bf16-autocast", "bf16-cast", "float32")


def whole_number(minimum: int):
    """argparse type of a whole number >= `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text}")
        return value

    return parse


def seconds_argument(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text}")
    return value


def parse_arguments(argv=None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    from evit_hf.commands.arguments import keep_rate_argument
    from evit_hf.messages import writable_folder_problem

    parser = argparse.ArgumentParser(
        prog="gpu_benchmark.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", default="gpu_check_results", help="writes gpu_benchmark.json and .md here")
    parser.add_argument("--models", nargs="+", default=None,
                        help="shapes of evit-hf benchmark or ViT checkpoint folders (default: every shape but "
                        f"{', '.join(LEFT_OUT_SHAPES)})")  # fmt: skip
    parser.add_argument("--keep-rates", type=keep_rate_argument, nargs="+", default=DEFAULT_KEEP_RATES)
    parser.add_argument("--batch-sizes", type=whole_number(1), nargs="+", default=DEFAULT_BATCH_SIZES)
    parser.add_argument("--image-size", type=whole_number(1), default=224)
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=["bf16-autocast", "bf16-cast"])
    parser.add_argument("--eager-max-batch-size", type=whole_number(0), default=64,
                        help="eager attention only up to this batch size (0: no eager groups)")  # fmt: skip
    parser.add_argument("--train-batch-size", type=whole_number(0), default=64,
                        help="batch of the training step (0: none)")  # fmt: skip
    parser.add_argument("--compile-batch-size", type=whole_number(0), default=64,
                        help="batch of the compiled groups (0: none)")  # fmt: skip
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--compile-seconds-per-graph", type=seconds_argument, default=40.0,
                        help="estimated compile time of one graph: a compile group starts only if its graphs fit "
                        "in the time left")  # fmt: skip
    parser.add_argument("--warmup", type=whole_number(1), default=3)
    parser.add_argument("--rounds", type=whole_number(1), default=8)
    parser.add_argument("--time-budget", type=seconds_argument, default=300.0, help="seconds for the whole table")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    args = parser.parse_args(argv)
    if args.device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", args.device):
        parser.error(f"argument --device: expected cuda, cuda:N or cpu, got {args.device!r}")
    problem = writable_folder_problem(args.output_dir)
    if problem:
        parser.error(f"argument --output-dir: cannot write into {args.output_dir}: {problem}")
    return args, parser


def installed_flash_implementations() -> list[str]:
    """The flash attention implementations whose package is installed (nothing is installed or compiled here)."""
    return [name for name, package in FLASH_IMPLEMENTATIONS.items() if importlib.util.find_spec(package) is not None]


def plan_groups(models, batch_sizes, precisions, attention_implementations, eager_max_batch_size, train_batch_size,
                compile_batch_size) -> list[dict]:  # fmt: skip
    """The groups of the table, cheap ones first and compiled ones last (the time budget cuts from the end)."""
    groups = []

    def add(model, mode, precision, attention, compiled, batch_size):
        groups.append(dict(model=model, mode=mode, precision=precision, attention=attention, compiled=compiled,
                           batch_size=batch_size))  # fmt: skip

    for model in models:
        for batch_size in batch_sizes:
            for precision in precisions:
                add(model, "inference", precision, "sdpa", False, batch_size)
            if "eager" in attention_implementations and batch_size <= eager_max_batch_size:
                add(model, "inference", precisions[0], "eager", False, batch_size)
            for attention in attention_implementations:
                if attention.startswith("flash"):  # flash kernels take half-precision tensors: the cast model
                    add(model, "inference", "bf16-cast" if "bf16-cast" in precisions else precisions[0], attention,
                        False, batch_size)  # fmt: skip
        if train_batch_size:
            add(model, "train", "bf16-autocast" if "bf16-autocast" in precisions else precisions[0], "sdpa", False,
                train_batch_size)  # fmt: skip
    if compile_batch_size:
        for model in models:
            add(model, "inference", precisions[0], "sdpa", True, compile_batch_size)
    return groups


def expected_kept_counts(num_patches: int, keep_rate: float, num_reduction_layers: int, fused: bool) -> list[int]:
    """Candidates each reduction layer keeps, by the spec's rule (the fused token is a candidate of the next one)."""
    import evit_hf

    counts, candidates = [], num_patches
    for _ in range(num_reduction_layers):
        kept = evit_hf.num_kept_tokens(candidates, keep_rate)
        counts.append(kept)
        candidates = kept + (1 if fused and kept < candidates else 0)
    return counts


class Timer:
    """Times calls: between CUDA events on CUDA (read after one synchronization at the end), perf_counter on CPU."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"
        self.pending = []

    def time(self, function):
        if self.cuda:
            start, end = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            result = function()
            end.record()
            self.pending.append((start, end))
            return result
        start = time.perf_counter()
        result = function()
        self.pending.append(time.perf_counter() - start)
        return result

    def seconds(self) -> list[float]:
        """The times of the calls since the last read, in seconds."""
        if self.cuda:
            self.torch.cuda.synchronize()
            times = [start.elapsed_time(end) / 1000 for start, end in self.pending]
        else:
            times = list(self.pending)
        self.pending = []
        return times


def main_tensor(output):
    """The first tensor of a model output: logits, or image embeddings for a CLIP tower with projection."""
    return output[0]


def run_group(group, models, settings, device, timer) -> list[dict]:
    """Times the stock model and EViT at each keep rate in one setting; returns one row per variant."""
    import torch

    import evit_hf
    from evit_hf import benchmark
    from evit_hf.benchmark_timing import cuda_peak_memory

    name, batch_size = group["model"], group["batch_size"]
    dtype = torch.bfloat16 if group["precision"] == "bf16-cast" else torch.float32
    autocast = group["precision"] == "bf16-autocast"
    # The float32 models stay as they are for the next groups: a cast group times cast copies.
    stock, evit = (copy.deepcopy(model).to(dtype) if dtype != torch.float32 else model for model in models)
    for model in (stock, evit):
        model.set_attn_implementation(group["attention"])
        model.train(group["mode"] == "train")
    optimizers = {}
    if group["mode"] == "train":  # one optimizer per model, whatever the keep rate
        optimizers = {id(model): torch.optim.AdamW(model.parameters(), lr=1e-6) for model in (stock, evit)}
    if group["compiled"]:
        torch._dynamo.reset()
        # One static graph per keep rate (its token counts), never a dynamic one: the timed rounds forbid recompiles.
        stock, evit = (
            torch.compile(model, fullgraph=True, dynamic=False, backend=settings.compile_backend)
            for model in (stock, evit)
        )
    generator = torch.Generator().manual_seed(0)
    size = settings.image_size
    pixel_values = torch.randn(batch_size, 3, size, size, generator=generator).to(device, dtype)
    num_labels = getattr(evit.config, "num_labels", 0)
    labels = torch.randint(0, max(num_labels, 1), (batch_size,), generator=generator).to(device)

    def precision():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast)

    variants = [("stock", None, stock)] + [("evit", rate, evit) for rate in settings.keep_rates]
    steps = [
        step_function(
            model, pixel_values, labels, rate, precision, optimizers.get(id(getattr(model, "_orig_mod", model)))
        )
        for _, rate, model in variants
    ]
    config = benchmark.macs_config(name, size)
    # The EViT model's own settings: a folder of a stock model has none in its configuration.
    from evit_hf.configuration_evit_base import vision_config_of

    evit_settings = vision_config_of(evit.config)
    patch_size = benchmark.model_patch_size(name)
    checks = [
        None if rate is None else expected_kept_counts(
            (size // patch_size) ** 2, rate, len(evit_settings.reduction_layers), evit_settings.fuse_inattentive_tokens
        )
        for _, rate, _ in variants
    ]  # fmt: skip

    for index, step in enumerate(steps):  # warm-up (and compilation), each output checked once
        for _ in range(settings.warmup):
            output = step()
        check_output(output, checks[index], group["mode"])
    timer.seconds()
    recompiles = torch._dynamo.config.error_on_recompile
    torch._dynamo.config.error_on_recompile = group["compiled"]
    try:
        for _ in range(settings.rounds):
            for step in steps:
                timer.time(step)
        times = timer.seconds()
    finally:
        torch._dynamo.config.error_on_recompile = recompiles
    timings = [times[index :: len(steps)] for index in range(len(steps))]
    peaks = [None] * len(steps)
    if device.type == "cuda" and not group["compiled"]:
        peaks = [cuda_peak_memory(step) for step in steps]

    stock_macs = evit_hf.count_macs(config, image_size=size, keep_rate=1.0)
    stock_median = statistics.median(timings[0])
    rows = []
    for (variant, rate, _), seconds, peak in zip(variants, timings, peaks, strict=True):
        median = statistics.median(seconds)
        macs = evit_hf.count_macs(config, image_size=size, keep_rate=rate or 1.0)
        rows.append(
            dict(
                group,
                variant=variant,
                keep_rate=rate,
                images_per_s=batch_size / median,
                latency_ms=1000 * median,
                latency_spread_ms=1000 * (max(seconds) - min(seconds)),
                peak_memory_mb=None if peak is None else peak / 2**20,
                speedup=stock_median / median,
                macs_ratio=stock_macs / macs,
                speedup_over_macs_ratio=(stock_median / median) / (stock_macs / macs),
            )
        )
    return rows


def step_function(model, pixel_values, labels, rate, precision, optimizer=None):
    """One inference call, or with an optimizer one training step (forward, backward, optimizer step), under
    `precision()`."""
    import torch

    arguments = {} if rate is None else {"keep_rate": rate}
    if optimizer is None:

        def step():
            with torch.inference_mode(), precision():
                return model(pixel_values, **arguments)

        return step
    # Classifiers take labels and return their loss; a tower with a projection (CLIP) gets a loss on its embeddings.
    takes_labels = "labels" in _forward_parameters(model)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with precision():
            if takes_labels:
                loss = model(pixel_values, labels=labels, **arguments).loss
            else:
                loss = main_tensor(model(pixel_values, **arguments)).float().pow(2).mean()
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def _forward_parameters(model):
    import inspect

    return inspect.signature(getattr(model, "_orig_mod", model).forward).parameters


def check_output(output, kept_counts, mode) -> None:
    """Raises if an output is not finite or EViT kept other token counts than the rule gives."""
    import torch

    tensor = output if mode == "train" else main_tensor(output)
    if not bool(torch.isfinite(tensor).all()):
        raise FloatingPointError(f"the {mode} output is not finite")
    if kept_counts is not None and mode == "inference":
        kept = [indices.shape[1] for indices in output.kept_token_indices]
        if kept != kept_counts:
            raise AssertionError(f"kept {kept} tokens per reduction layer, the rule gives {kept_counts}")


def build_model_pair(name: str, settings, device):
    """The stock model and EViT of a shape, same random weights, float32, on `device` (cast per group)."""
    from evit_hf import benchmark

    return benchmark.build_models(name, settings.image_size, "sdpa", 0, device=str(device))


def failure_line(error: BaseException) -> str:
    from evit_hf.messages import one_line

    return f"{type(error).__name__}: {one_line(error)}"


def group_label(group: dict) -> str:
    label = f"{group['model']} {group['mode']} {group['precision']} {group['attention']} bs{group['batch_size']}"
    return label + (" compiled" if group["compiled"] else "")


def run_table(settings, groups, device, log=print, save=lambda results: None) -> dict:
    """Runs `groups` within `settings.time_budget`; returns rows, failures and the groups not run. `save` gets the
    results so far after every group, so that a run stopped from outside keeps what it measured."""
    import torch

    deadline = time.monotonic() + settings.time_budget
    timer = Timer(device)
    rows, failures, not_run = [], [], []
    results = {"rows": rows, "failures": failures, "not_run": not_run}
    models, models_name = None, None
    for index, group in enumerate(groups):
        pending = {"pending": groups[index + 1 :]}  # saved with the rows: what a stop from outside would leave out
        left = deadline - time.monotonic()
        graphs = 1 + len(settings.keep_rates)
        needed = graphs * settings.compile_seconds_per_graph if group["compiled"] else 0.0
        if left <= needed:
            not_run.append(dict(group, reason=f"time budget: {left:.0f} s left, needs about {needed:.0f} s"))
            continue
        if models_name != group["model"]:
            models = None  # the previous shape's models go before the next ones are built
            if device.type == "cuda":
                torch.cuda.empty_cache()
            models, models_name = build_model_pair(group["model"], settings, device), group["model"]
        started = time.monotonic()
        try:
            group_rows = run_group(group, models, settings, device, timer)
        except Exception as error:  # one failing group must not hide the others: recorded, and the exit status is 1
            failures.append(dict(group, error=failure_line(error)))
            log(f"FAILED {group_label(group)}: {failure_line(error)}")
            timer.seconds()
            models_name = None  # rebuilt for the next group: a failure may leave them half-updated
            if device.type == "cuda":
                torch.cuda.empty_cache()
            save({**results, **pending})
            continue
        for row in group_rows:
            log(format_row(row))
        log(f"  ({time.monotonic() - started:.1f} s)")
        rows += group_rows
        save({**results, **pending})
    return results


def format_row(row: dict) -> str:
    variant = "stock" if row["variant"] == "stock" else f"keep {row['keep_rate']:g}"
    return (
        f"{group_label(row):60s} {variant:9s} {row['images_per_s']:10.1f} img/s  speed-up {row['speedup']:.3f}x  "
        f"MACs ratio {row['macs_ratio']:.3f}  ({row['speedup_over_macs_ratio']:.3f} of it)"
    )


def markdown(results: dict) -> str:
    from evit_hf.benchmark_report import markdown_table

    columns = ["model", "mode", "precision", "attention", "compiled", "batch_size", "variant", "keep_rate"]
    columns += ["images_per_s", "latency_ms", "peak_memory_mb", "speedup", "macs_ratio", "speedup_over_macs_ratio"]
    lines = markdown_table(results["rows"], columns).split("\n")
    lists = {"Failed": "failures", "Not run": "not_run", "Not reached (the run was stopped)": "pending"}
    for title, key in lists.items():
        if results.get(key):
            lines += ["", f"{title}:", ""]
            for group in results[key]:
                lines.append(f"- {group_label(group)}: {group.get('error', group.get('reason', 'not reached'))}")
    return "\n".join(lines) + "\n"


def environment(device) -> dict:
    import torch
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "device": str(device),
            "cuda": torch.version.cuda, "flash_packages": installed_flash_implementations()}  # fmt: skip
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv=None) -> int:
    args, parser = parse_arguments(argv)
    import torch

    from evit_hf import benchmark

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(
            f"argument --device: {args.device} asked for, but CUDA is not available to torch {torch.__version__}"
        )
    if device.type == "cuda":
        if (device.index or 0) >= torch.cuda.device_count():
            parser.error(f"argument --device: {args.device} asked for, but there are {torch.cuda.device_count()} GPUs")
        torch.cuda.set_device(device)  # CUDA events record on the current device's stream
    models = args.models or [name for name in benchmark.SHAPES if name not in LEFT_OUT_SHAPES]
    for name in models:
        try:
            benchmark.check_image_sizes([args.image_size], benchmark.model_patch_size(name), name, "image_size")
        except benchmark.InvalidBenchmarkSetting as error:
            parser.error(f"argument --{'models' if error.field == 'model' else 'image-size'}: {error.problem}")
    attention = ["sdpa", "eager"] + installed_flash_implementations()
    groups = plan_groups(models, args.batch_sizes, args.precisions, attention, args.eager_max_batch_size,
                         args.train_batch_size, args.compile_batch_size)  # fmt: skip
    print(f"{len(groups)} groups ({len(models)} models: {', '.join(models)}; attention: {', '.join(attention)}) "
          f"within {args.time_budget:.0f} s")  # fmt: skip
    header = {"environment": environment(device), "settings": vars(args)}
    os.makedirs(args.output_dir, exist_ok=True)

    def save(results):
        with open(os.path.join(args.output_dir, "gpu_benchmark.json"), "w") as handle:
            json.dump({**header, **results}, handle, indent=2)
        with open(os.path.join(args.output_dir, "gpu_benchmark.md"), "w") as handle:
            handle.write(markdown(results))

    results = run_table(args, groups, device, save=save)
    save(results)
    failed, skipped = len(results["failures"]), len(results["not_run"])
    print(f"{len(results['rows'])} rows, {failed} groups failed, {skipped} not run (time budget); "
          f"table in {os.path.join(args.output_dir, 'gpu_benchmark.md')}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
