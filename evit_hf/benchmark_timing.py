"""The measurements of the benchmark: building a stock model and its EViT model with the same weights
(`build_models`), timing them in alternation with their peak memory (`measure_group`, one combination of settings),
and the side measurements (`resolution_comparison`, `reorganization_overhead`,
`max_logit_difference_between_backends`). torch loads on first use, not at import.
"""

import copy
import ctypes
import gc
import multiprocessing
import statistics
import time

from .benchmark_settings import (
    BenchmarkSettings,
    folder_config,
    is_shape_name,
    macs_config,
    model_config_settings,
    read_folder_model,
    shape_classes,
    torch_dtype,
)


def build_models(
    model: str = "deit-small",
    image_size: int = 224,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    dtype="float32",
    device: str = "cpu",
):
    """A stock model and its EViT model of the same shape and weights, in eval mode. A named shape builds its
    family's benchmark model (`ViTForImageClassification`, `CLIPVisionModelWithProjection`, ...); a checkpoint folder
    of any family builds the model its configuration names, with random weights, and its EViT conversion. `dtype` is
    a name of `DTYPE_NAMES` or a torch dtype."""
    import torch

    from .patch import apply_evit

    dtype = torch_dtype(dtype)
    torch.manual_seed(seed)
    if is_shape_name(model):
        settings = model_config_settings(model, image_size)
        stock_config_class, stock_class, evit_config_class, evit_class = shape_classes(model)
        stock = stock_class(stock_config_class(**settings, attn_implementation=attn_implementation))
        evit = evit_class(evit_config_class(**settings, attn_implementation=attn_implementation))
        evit.load_state_dict(stock.state_dict())
    else:
        stock_class = read_folder_model(model).stock_class
        stock = stock_class._from_config(folder_config(model, image_size), attn_implementation=attn_implementation)
        # The conversion the EViT constructors run, on a copy: the same weights by construction.
        evit = apply_evit(copy.deepcopy(stock))
    return stock.to(device, dtype).eval(), evit.to(device, dtype).eval()


def _takes_text(model) -> bool:
    """Whether the model has a text tower too (CLIP-style): the benchmark then times its image features only."""
    return hasattr(model, "get_image_features") and hasattr(model, "get_text_features")


def _synchronize(device: str) -> None:
    """Waits for the device's queued work, so that a timing covers the computation and not just its launch."""
    import torch

    device_type = torch.device(device).type
    if device_type != "cpu":
        getattr(torch, device_type).synchronize()


def _step_function(model, pixel_values, labels, mode: str, keep_rate):
    """One inference call, or one training step (forward, backward, optimizer step), of `model`. A model with a text
    tower too runs its image features: the text tower runs once per text, not per image."""
    import torch

    arguments = {} if keep_rate is None else {"keep_rate": keep_rate}
    if mode == "inference":
        forward = model.get_image_features if _takes_text(model) else model

        def step():
            with torch.inference_mode():
                return forward(pixel_values, **arguments)

        return step
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(pixel_values, labels=labels, **arguments).loss.backward()
        optimizer.step()

    return step


def _resident_memory() -> tuple[int, int]:
    """(current, peak) resident memory of this process in bytes, from /proc (Linux)."""
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, amount, _ = line.split()
                values[name] = int(amount) * 1024
    return values["VmRSS:"], values["VmHWM:"]


def _measure_cpu_peak_memories(queue, model, image_size, attn_implementation, dtype, mode, batch_size, keep_rates):
    """In a fresh process: for each keep rate (None: the stock model), how far one step raises the resident memory."""
    import torch

    stock, evit = build_models(model, image_size, attn_implementation, 0, dtype)
    pixel_values = torch.randn(batch_size, 3, image_size, image_size, dtype=torch_dtype(dtype))
    labels = torch.zeros(batch_size, dtype=torch.long)
    peaks = []
    for keep_rate in keep_rates:
        chosen = stock if keep_rate is None else evit
        chosen.train(mode == "train")
        step = _step_function(chosen, pixel_values, labels, mode, keep_rate)
        step()  # the optimizer's state exists from here on
        del step  # ...and goes with it, before the next model is measured
        step = _step_function(chosen, pixel_values, labels, mode, keep_rate)
        step()
        gc.collect()
        try:  # hand freed memory back to the system, so that the measured step has to take it again
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets the peak (VmHWM) to the current resident memory
        before, _ = _resident_memory()
        step()
        peaks.append(_resident_memory()[1] - before)
        del step
    queue.put(peaks)


def _cpu_peak_memories(group: dict, keep_rates: list, settings) -> list[int]:
    """Peak memory one step of each model adds on CPU, measured in one fresh process (nothing else allocated)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(
        target=_measure_cpu_peak_memories,
        args=(queue, settings.model, group["image_size"], group["attn_implementation"], group["dtype"],
              group["mode"], group["batch_size"], keep_rates),
    )  # fmt: skip
    process.start()
    peaks = queue.get(timeout=1800)
    process.join()
    return peaks


def cuda_peak_memory(step) -> int:
    """Peak memory one step adds, from CUDA's allocator statistics."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - baseline


def measure_group(settings: BenchmarkSettings, group: dict, progress_bar) -> list[dict]:
    """One row per variant (the stock model, then EViT at each keep rate) in one combination of settings, `group`
    (batch size, image size, attention, dtype, device, compiled, mode): the models run in alternation, one step of each
    per round; `progress_bar` advances once per round."""
    import torch

    from .macs import count_macs

    device, dtype, mode = group["device"], torch_dtype(group["dtype"]), group["mode"]
    batch_size, image_size = group["batch_size"], group["image_size"]
    stock, evit = build_models(settings.model, image_size, group["attn_implementation"], settings.seed, dtype, device)
    if mode == "train":
        stock.train()
        evit.train()
    if group["compiled"]:
        # One static graph per keep rate: by default a second keep rate would make dynamo trace it as a symbolic
        # float, which breaks the graph at the keep-rate check.
        stock, evit = torch.compile(stock, dynamic=False), torch.compile(evit, dynamic=False)
    generator = torch.Generator().manual_seed(settings.seed)
    pixel_values = torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(device, dtype)
    # Labels within the head (a checkpoint folder may have any number of classes): the loss of a training step.
    labels = torch.randint(0, stock.config.num_labels, (batch_size,), generator=generator).to(device)

    variants = [("stock", None, stock)] + [("evit", keep_rate, evit) for keep_rate in settings.keep_rates]
    steps = [_step_function(model, pixel_values, labels, mode, keep_rate) for _, keep_rate, model in variants]
    timings = [[] for _ in variants]
    for round_index in range(settings.warmup + settings.rounds):
        for index, step in enumerate(steps):
            _synchronize(device)
            start = time.perf_counter()
            step()
            _synchronize(device)
            if round_index >= settings.warmup:
                timings[index].append(time.perf_counter() - start)
        progress_bar.update(1)

    config = macs_config(settings.model, image_size)
    stock_macs = count_macs(config, image_size=image_size, keep_rate=1.0)
    stock_median = statistics.median(timings[0])
    peaks = [None] * len(variants)
    device_type = torch.device(device).type
    # Peak memory is read from CUDA's allocator or from the resident memory of a CPU process; other devices have none.
    if settings.measure_memory and not group["compiled"]:
        if device_type == "cuda":
            peaks = [cuda_peak_memory(step) for step in steps]
        elif device_type == "cpu":
            peaks = _cpu_peak_memories(group, [keep_rate for _, keep_rate, _ in variants], settings)
    rows = []
    for (variant, keep_rate, _), seconds, peak in zip(variants, timings, peaks, strict=True):
        median = statistics.median(seconds)
        macs = count_macs(config, image_size=image_size, keep_rate=keep_rate or 1.0)
        speedup = stock_median / median
        rows.append(
            dict(
                group,
                model=settings.model,
                variant=variant,
                keep_rate=keep_rate,
                images_per_s=batch_size / median,
                images_per_s_min=batch_size / max(seconds),
                images_per_s_max=batch_size / min(seconds),
                latency_ms=1000 * median,
                peak_memory_mb=None if peak is None else peak / 2**20,
                speedup=speedup,
                macs=macs,
                macs_ratio=stock_macs / macs,
                speedup_over_macs_ratio=speedup / (stock_macs / macs),
            )
        )
    return rows


def resolution_comparison(
    model: str = "deit-small",
    keep_rate: float = 0.7,
    image_sizes=(256, 288),
    reference_image_size: int = 224,
    batch_size: int = 32,
    attn_implementation: str = "sdpa",
    rounds: int = 10,
    warmup: int = 3,
) -> list[dict]:
    """EViT at larger inputs against the stock model at `reference_image_size` (the paper's "more tokens for the same
    cost"): images/s and MACs of each, alternating in one process."""
    import torch

    from .macs import count_macs

    stock, _ = build_models(model, reference_image_size, attn_implementation)
    runners = {("stock", reference_image_size): (stock, reference_image_size, None)}
    for size in image_sizes:
        _, evit = build_models(model, size, attn_implementation)
        runners[("evit", size)] = (evit, size, keep_rate)
    inputs = {size: torch.randn(batch_size, 3, size, size) for _, size, _ in runners.values()}
    timings = {key: [] for key in runners}
    with torch.inference_mode():
        for round_index in range(warmup + rounds):
            for key, (net, size, rate) in runners.items():
                start = time.perf_counter()
                net(inputs[size]) if rate is None else net(inputs[size], keep_rate=rate)
                if round_index >= warmup:
                    timings[key].append(time.perf_counter() - start)
    reference = statistics.median(timings[("stock", reference_image_size)])
    reference_macs = count_macs(macs_config(model, reference_image_size), keep_rate=1.0)
    rows = []
    for (variant, size), seconds in timings.items():
        net, _, rate = runners[(variant, size)]
        macs = count_macs(macs_config(model, size), keep_rate=rate or 1.0)
        rows.append(
            dict(
                variant=variant,
                image_size=size,
                keep_rate=rate,
                images_per_s=batch_size / statistics.median(seconds),
                speed_relative_to_stock_at_reference=reference / statistics.median(seconds),
                macs=macs,
                macs_relative_to_stock_at_reference=macs / reference_macs,
            )
        )
    return rows


def reorganization_overhead(
    model: str = "deit-small", keep_rate: float = 0.7, batch_size: int = 32, image_size: int = 224, rounds: int = 10
) -> dict:
    """The share of an EViT forward spent reorganizing tokens: class-token attention row, scoring, top-k, gathering,
    fusion and position tracking, timed on the real tensors of each reduction layer, against the whole forward."""
    import torch

    from .token_reorganization import class_token_attention, reorganize_tokens, track_token_positions

    _, evit = build_models(model, image_size)
    pixel_values = torch.randn(batch_size, 3, image_size, image_size)
    captured = {}

    def capture(layer_index):
        def hook(module, args, kwargs, output):
            if kwargs.get("num_keep") is not None:
                captured[layer_index] = (args[0], kwargs["num_keep"])

        return hook

    handles = [
        layer.register_forward_hook(capture(index), with_kwargs=True) for index, layer in enumerate(evit.vit.layers)
    ]
    with torch.inference_mode():
        evit(pixel_values, keep_rate=keep_rate)
    for handle in handles:
        handle.remove()

    # Inputs of the reorganization in each reduction layer: queries, keys and the post-attention tokens.
    cases = []
    with torch.inference_mode():
        for index, (layer_input, num_keep) in sorted(captured.items()):
            attention = evit.vit.layers[index].attention
            hidden = evit.vit.layers[index].layernorm_before(layer_input)
            shape = (*hidden.shape[:-1], -1, attention.head_dim)
            query = attention.q_proj(hidden).view(shape).transpose(1, 2)
            key = attention.k_proj(hidden).view(shape).transpose(1, 2)
            positions = torch.arange(layer_input.shape[1] - 1).expand(batch_size, -1)
            cases.append((query, key, layer_input, num_keep, positions, attention.scaling))

    def reorganize_all():
        for query, key, tokens, num_keep, positions, scaling in cases:
            class_attention = class_token_attention(query, key, scaling)
            _, kept = reorganize_tokens(tokens, class_attention, 1, num_keep, fuse=True)
            track_token_positions(positions, kept, fused=True)

    forward_times, reorganize_times = [], []
    with torch.inference_mode():
        for round_index in range(rounds + 2):
            start = time.perf_counter()
            evit(pixel_values, keep_rate=keep_rate)
            middle = time.perf_counter()
            reorganize_all()
            end = time.perf_counter()
            if round_index >= 2:
                forward_times.append(middle - start)
                reorganize_times.append(end - middle)
    forward, reorganization = statistics.median(forward_times), statistics.median(reorganize_times)
    return {
        "model": model,
        "keep_rate": keep_rate,
        "batch_size": batch_size,
        "forward_ms": 1000 * forward,
        "reorganization_ms": 1000 * reorganization,
        "share": reorganization / forward,
    }


def max_logit_difference_between_backends(
    model: str = "deit-small", keep_rate: float = 0.7, batch_size: int = 8, seed: int = 0
) -> dict:
    """Largest |logit difference| of EViT with eager against SDPA attention, same weights and inputs."""
    import torch

    _, eager = build_models(model, attn_implementation="eager", seed=seed)
    _, sdpa = build_models(model, attn_implementation="sdpa", seed=seed)
    pixel_values = torch.randn(batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        a, b = eager(pixel_values, keep_rate=keep_rate), sdpa(pixel_values, keep_rate=keep_rate)
    same_tokens = all(torch.equal(x, y) for x, y in zip(a.kept_token_indices, b.kept_token_indices, strict=True))
    return {
        "model": model,
        "keep_rate": keep_rate,
        "max_abs_logit_difference": float((a.logits - b.logits).abs().max()),
        "max_abs_logit": float(a.logits.abs().max()),
        "same_kept_tokens": same_tokens,
    }


def is_out_of_memory(error: BaseException) -> bool:
    """Whether a run failed for memory: torch's `OutOfMemoryError`, or a CPU allocation failure (a `RuntimeError`)."""
    import torch

    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )


__all__ = [
    "build_models",
    "cuda_peak_memory",
    "is_out_of_memory",
    "max_logit_difference_between_backends",
    "measure_group",
    "reorganization_overhead",
    "resolution_comparison",
]
