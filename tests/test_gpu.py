"""The CUDA paths: half precision (autocast and cast models), SDPA and flash kernels, torch.compile, pinned-memory
evaluation, CUDA timing and peak memory, gradient checkpointing, several processes with NCCL, and the GPU benchmark
table. Tests marked `gpu` are skipped without CUDA (`bash scripts/gpu_check.sh` runs them); the parts whose logic runs
on CPU as well are tested here on CPU too.

Half precision moves the class-attention scores a little, so it may swap two candidates whose scores are close.
Kept tokens are compared with float32 on the images whose float32 scores are separated by a margin at every reduction
layer (`separated_images`): there, a swap would be a bug, not rounding.
"""

import copy
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import ViTConfig

import evit_hf
from evit_hf import benchmark
from evit_hf.benchmark import BenchmarkSettings, run_benchmark

from .model_builders import TINY, TWO_LAYERS, stock_and_evit
from .run_helpers import free_port
from .script_modules import ROOT, load_script


CUDA = "cuda"
gpu = pytest.mark.gpu
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
# 8 px patches of a 32 px image: 16 candidates, so that the scores at each boundary are often far apart; the first
# reduction layers keep 12, 10 and 8 of them at keep 0.7.
SEPARATED = dict(TINY, patch_size=8)
# The smallest relative gap, (s[k-1] - s[k]) / s[k-1], between the last kept and the first other candidate that an
# image must have at every reduction layer. bf16 autocast on CPU swaps candidates up to gaps of 0.04 on this shape.
MARGIN = 0.2
HALF_PRECISIONS = [torch.bfloat16, torch.float16]


DRIVER = load_script("gpu_benchmark")  # the table of scripts/gpu_check.sh


def random_images(count: int, shape=SEPARATED, seed: int = 0) -> torch.Tensor:
    size = shape["image_size"]
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def separated_images(evit, pixel_values, keep_rate, margin=MARGIN, minimum=4):
    """The images (a boolean mask) whose float32 class-attention scores, from the eager softmax of each reduction
    layer, have a relative gap of at least `margin` between the last kept candidate and the first other one."""
    reference = copy.deepcopy(evit).float().eval()
    reference.set_attn_implementation("eager")
    with torch.no_grad():
        output = reference(pixel_values.float(), keep_rate=keep_rate, output_attentions=True)
    separated = torch.ones(len(pixel_values), dtype=torch.bool, device=pixel_values.device)
    for kept, layer in zip(output.kept_token_indices, reference.config.reduction_layers, strict=True):
        scores = output.attentions[layer][:, :, 0, 1:].mean(dim=1)  # [batch, candidates]
        ranked = scores.sort(dim=1, descending=True).values
        k = kept.shape[1]
        if k < ranked.shape[1]:
            separated &= (ranked[:, k - 1] - ranked[:, k]) >= margin * ranked[:, k - 1]
    assert separated.sum() >= minimum, f"only {int(separated.sum())} images are separated by the margin"
    return separated


def kept_sets(output, mask):
    """Per reduction layer, the sorted patch indices each selected image kept."""
    return [indices[mask].sort(dim=1).values.tolist() for indices in output.kept_token_indices]


def assert_same_kept_tokens(output, expected, mask):
    assert kept_sets(output, mask) == kept_sets(expected, mask)


def close_logits(actual, expected, share: float):
    """Logits within `share` of the largest expected logit."""
    torch.testing.assert_close(actual.float(), expected.float(), atol=share * float(expected.abs().max()), rtol=0)


# Half precision: autocast, training under autocast, cast models.


@pytest.mark.parametrize(
    "device, dtype",
    [("cpu", torch.bfloat16)] + [pytest.param(CUDA, dtype, marks=gpu) for dtype in HALF_PRECISIONS],
    ids=["cpu-bfloat16", "cuda-bfloat16", "cuda-float16"],
)
def test_autocast_forward_keeps_the_float32_tokens(device, dtype):
    _, evit = stock_and_evit("vit-classifier", shape=SEPARATED)
    evit.to(device)
    pixel_values = random_images(512).to(device)
    mask = separated_images(evit, pixel_values, 0.7)
    with torch.no_grad():
        expected = evit(pixel_values, keep_rate=0.7)
        with torch.autocast(device, dtype=dtype):
            output = evit(pixel_values, keep_rate=0.7)
    assert output.logits.dtype == dtype  # the head ran in half precision
    assert_same_kept_tokens(output, expected, mask)
    close_logits(output.logits[mask], expected.logits[mask], 0.05)


@gpu
@pytest.mark.parametrize("dtype", HALF_PRECISIONS, ids=["bfloat16", "float16"])
def test_autocast_training_step(dtype):
    _, evit = stock_and_evit("vit-classifier", shape=SEPARATED)
    evit.to(CUDA).train()
    # A batch of separated images only: every image keeps the float32 tokens, so the gradients can be compared.
    pixel_values = random_images(512).to(CUDA)
    pixel_values = pixel_values[separated_images(evit, pixel_values, 0.7)]
    mask = torch.ones(len(pixel_values), dtype=torch.bool, device=CUDA)
    labels = torch.arange(len(pixel_values), device=CUDA) % evit.config.num_labels
    reference = copy.deepcopy(evit)
    expected = reference(pixel_values, labels=labels, keep_rate=0.7)
    expected.loss.backward()

    optimizer = torch.optim.AdamW(evit.parameters(), lr=1e-3)
    # A scale the tiny model's float16 gradients hold without overflow, so that the step is taken, not skipped.
    scaler = torch.amp.GradScaler(CUDA, init_scale=2.0**10, enabled=dtype == torch.float16)
    before = [parameter.detach().clone() for parameter in evit.parameters()]
    with torch.autocast(CUDA, dtype=dtype):
        output = evit(pixel_values, labels=labels, keep_rate=0.7)
    scaler.scale(output.loss).backward()
    scaler.unscale_(optimizer)
    gradients, expected_gradients = (flat_gradients(model) for model in (evit, reference))
    scaler.step(optimizer)
    scaler.update()

    assert torch.isfinite(output.loss) and torch.isfinite(gradients).all()
    assert_same_kept_tokens(output, expected, mask)
    assert float(output.loss) == pytest.approx(float(expected.loss), rel=0.05)
    assert torch.nn.functional.cosine_similarity(gradients, expected_gradients, dim=0) > 0.99
    # The step was taken: every parameter with a gradient well above AdamW's epsilon moved.
    for old, parameter in zip(before, evit.parameters(), strict=True):
        if parameter.grad is not None and parameter.grad.abs().max() > 1e-6:
            assert not torch.equal(old, parameter)


def flat_gradients(model) -> torch.Tensor:
    return torch.cat([parameter.grad.flatten() for parameter in model.parameters() if parameter.grad is not None])


@gpu
@pytest.mark.parametrize("dtype", HALF_PRECISIONS, ids=["bfloat16", "float16"])
def test_cast_model(dtype):
    _, evit = stock_and_evit("vit-classifier", shape=SEPARATED)
    evit.to(CUDA)
    pixel_values = random_images(512).to(CUDA)
    mask = separated_images(evit, pixel_values, 0.7)
    with torch.no_grad():
        expected = evit(pixel_values, keep_rate=0.7)
        half = copy.deepcopy(evit).to(dtype)
        output = half(pixel_values.to(dtype), keep_rate=0.7)
    assert output.logits.dtype == dtype
    assert_same_kept_tokens(output, expected, mask)
    close_logits(output.logits[mask], expected.logits[mask], 0.05)


@gpu
def test_cuda_bf16_forward_matches_fp32(pixel_values):
    _, evit = stock_and_evit("vit-classifier")
    with torch.no_grad():
        reference = evit(pixel_values).logits
        half = evit.to("cuda", torch.bfloat16)(pixel_values.to("cuda", torch.bfloat16)).logits
    torch.testing.assert_close(half.float().cpu(), reference, atol=0.15, rtol=0.05)


# Attention kernels.


@gpu
@pytest.mark.parametrize(
    "backend, dtype",
    [("EFFICIENT_ATTENTION", torch.float32), ("FLASH_ATTENTION", torch.bfloat16), ("MATH", torch.float32)],
    ids=["efficient-float32", "flash-bfloat16", "math-float32"],
)
def test_sdpa_kernels_on_cuda_match_eager(backend, dtype):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _, sdpa = stock_and_evit("vit-classifier", shape=SEPARATED, attn_implementation="sdpa")
    sdpa.to(CUDA, dtype)
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    pixel_values = random_images(512).to(CUDA)
    # float32 kernels differ from eager attention by rounding only: a gap of 1e-3 is far beyond it.
    mask = separated_images(sdpa, pixel_values, 0.7, margin=1e-3 if dtype == torch.float32 else MARGIN)
    with torch.no_grad(), sdpa_kernel([getattr(SDPBackend, backend)]):  # only this kernel: it runs or the test fails
        output = sdpa(pixel_values.to(dtype), keep_rate=0.7)
    with torch.no_grad():
        expected = eager(pixel_values.to(dtype), keep_rate=0.7)
    assert_same_kept_tokens(output, expected, mask)
    close_logits(output.logits[mask], expected.logits[mask], 1e-4 if dtype == torch.float32 else 0.03)


@gpu
@pytest.mark.parametrize("implementation", list(DRIVER.FLASH_IMPLEMENTATIONS))
def test_flash_attention_matches_sdpa(implementation):
    package = DRIVER.FLASH_IMPLEMENTATIONS[implementation]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{implementation} needs the {package} package, which is not installed")
    # Head dimension 64: flash kernels support it on every GPU generation they run on.
    shape = dict(SEPARATED, hidden_size=128, intermediate_size=256)
    _, sdpa = stock_and_evit("vit-classifier", shape=shape)
    sdpa.to(CUDA, torch.bfloat16)
    flash = copy.deepcopy(sdpa)
    flash.set_attn_implementation(implementation)
    pixel_values = random_images(512, shape).to(CUDA)
    mask = separated_images(sdpa, pixel_values, 0.7, margin=0.5)
    with torch.no_grad():
        expected = sdpa(pixel_values.to(torch.bfloat16), keep_rate=0.7)
        output = flash(pixel_values.to(torch.bfloat16), keep_rate=0.7)
    assert_same_kept_tokens(output, expected, mask)
    close_logits(output.logits[mask], expected.logits[mask], 0.03)


# torch.compile


@pytest.mark.parametrize(
    "device, backend",
    # On CPU, tracing takes seconds per keep rate: slow (test_training compiles one keep rate in the default suite).
    [pytest.param("cpu", "eager", marks=pytest.mark.slow), pytest.param(CUDA, "inductor", marks=gpu)],
    ids=["cpu-eager", "cuda-inductor"],
)
def test_compile_fullgraph_does_not_recompile_across_keep_rates(device, backend):
    # On CPU the eager backend checks what dynamo decides (graphs, guards, recompiles) without compiling kernels.
    torch._dynamo.reset()
    # Two layers, both reduction layers (the second one also tracks the fused token): tracing time is per layer.
    _, evit = stock_and_evit("vit-classifier", shape=dict(TINY, num_hidden_layers=2))
    evit.to(device)
    keep_rates = [0.7, 0.5] if device == "cpu" else [0.9, 0.7, 0.5]
    pixel_values = random_images(4, TINY).to(device)
    graphs = counters["stats"]["unique_graphs"]
    compiled = torch.compile(evit, fullgraph=True, dynamic=False, backend=backend)  # fullgraph: no graph break
    with torch.no_grad():
        expected = {rate: evit(pixel_values, keep_rate=rate) for rate in keep_rates}
        for rate in keep_rates:  # one static graph per keep rate (each has its own token counts)
            compiled(pixel_values, keep_rate=rate)
        assert counters["stats"]["unique_graphs"] - graphs == len(keep_rates)
        with torch._dynamo.config.patch(error_on_recompile=True):  # alternating keep rates reuses the graphs
            for rate in keep_rates[::-1] + keep_rates:
                output = compiled(pixel_values, keep_rate=rate)
                assert_same_kept_tokens(output, expected[rate], torch.ones(len(pixel_values), dtype=torch.bool))
                close_logits(output.logits, expected[rate].logits, 1e-4)
    assert counters["stats"]["unique_graphs"] - graphs == len(keep_rates)


# Evaluation: pinned memory, workers, CUDA timing.


def count_calls(monkeypatch, owner, name) -> list:
    """Replaces `owner.name` by a wrapper that records each call in the returned list, then calls it."""
    calls, original = [], getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def small_dataset(count: int = 24, num_labels: int = 10):
    generator = torch.Generator().manual_seed(3)
    size = TINY["image_size"]
    return [
        {"pixel_values": torch.randn(3, size, size, generator=generator), "label": index % num_labels}
        for index in range(count)
    ]


@gpu
def test_evaluation_pins_memory_with_workers_and_times_cuda(monkeypatch):
    shape = dict(TINY, num_labels=10)
    _, evit = stock_and_evit("vit-classifier", shape=shape)
    dataset = small_dataset()
    keep_rates = (1.0, 0.5)
    on_cpu = evit_hf.evaluate_keep_rates(evit, dataset, keep_rates=keep_rates, batch_size=8, progress=False)

    loaders = []

    class RecordingDataLoader(torch.utils.data.DataLoader):
        def __init__(self, *args, **kwargs):
            loaders.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", RecordingDataLoader)
    synchronizations = count_calls(monkeypatch, torch.cuda, "synchronize")
    evit.to(CUDA)
    rows = evit_hf.evaluate_keep_rates(evit, dataset, keep_rates, batch_size=8, progress=False, num_workers=2)
    assert loaders[0]["pin_memory"] is True and loaders[0]["num_workers"] == 2
    batches = 3
    assert len(synchronizations) >= 2 * batches * len(keep_rates)  # before and after every timed forward pass
    for row, expected in zip(rows, on_cpu, strict=True):
        assert row["samples"] == expected["samples"] == len(dataset)
        assert row["macs"] == expected["macs"] and row["images_per_s"] > 0
        assert row["accuracy"] == pytest.approx(expected["accuracy"], abs=1 / len(dataset))  # a near tie may flip
    in_bfloat16 = evit_hf.evaluate_keep_rates(evit, dataset, keep_rates, 8, progress=False, dtype="bfloat16")
    assert [row["samples"] for row in in_bfloat16] == [len(dataset)] * len(keep_rates)


# The benchmark: CUDA timing, peak memory.


def checkpoint_folder(folder, **overrides) -> str:
    """A two-layer ViT configuration for the benchmark (it builds random weights from it)."""
    ViTConfig(**{**TWO_LAYERS, **overrides}).save_pretrained(folder)
    return str(folder)


@gpu
def test_benchmark_synchronizes_cuda_and_reads_its_peak_memory(tmp_path, monkeypatch):
    synchronizations = count_calls(monkeypatch, torch.cuda, "synchronize")
    settings = BenchmarkSettings(
        model=checkpoint_folder(tmp_path), keep_rates=[0.5], batch_sizes=[8], image_sizes=[16], devices=[CUDA],
        dtypes=["float32", "bfloat16", "float16"], modes=["inference", "train"], rounds=2, warmup=1,
    )  # fmt: skip
    results = run_benchmark(settings, progress=False)
    rows = results["rows"]
    assert results["environment"]["cuda"] == torch.cuda.get_device_name(0)
    assert len(rows) == 3 * 2 * 2
    timed_calls = len(rows) * (settings.warmup + settings.rounds)
    assert len(synchronizations) >= 2 * timed_calls
    for row in rows:
        assert row["device"] == CUDA and row["images_per_s"] > 0
        assert row["peak_memory_mb"] is not None and row["peak_memory_mb"] > 0


@gpu
def test_training_peak_memory_shrinks_with_the_keep_rate(tmp_path):
    # Batch 256 at 64 patches: activations, which EViT shrinks, outweigh the weights and optimizer state.
    folder = checkpoint_folder(tmp_path, image_size=32)
    settings = BenchmarkSettings(
        model=folder, keep_rates=[0.5], batch_sizes=[256], image_sizes=[32], devices=[CUDA],
        modes=["inference", "train"], rounds=1, warmup=1,
    )  # fmt: skip
    rows = {(row["mode"], row["variant"]): row["peak_memory_mb"] for row in run_benchmark(settings, False)["rows"]}
    assert rows[("train", "evit")] < rows[("train", "stock")]
    assert rows[("inference", "stock")] < rows[("train", "stock")]


@gpu
def test_compiled_benchmark_builds_one_graph_per_keep_rate(tmp_path):
    torch._dynamo.reset()
    counters.clear()
    settings = BenchmarkSettings(
        model=checkpoint_folder(tmp_path), keep_rates=[0.7, 0.5], batch_sizes=[8], image_sizes=[16], devices=[CUDA],
        dtypes=["bfloat16"], compiled=[True], rounds=2, warmup=1,
    )  # fmt: skip
    rows = run_benchmark(settings, progress=False)["rows"]
    assert [row["keep_rate"] for row in rows] == [None, 0.7, 0.5] and all(row["images_per_s"] > 0 for row in rows)
    assert counters["stats"]["unique_graphs"] == 1 + 2 and not counters["graph_break"]  # stock, then each keep rate


# Gradient checkpointing.


@gpu
def test_gradient_checkpointing_on_cuda():
    _, evit = stock_and_evit("vit-classifier", shape=SEPARATED)
    evit.to(CUDA).train()
    pixel_values = random_images(32).to(CUDA)
    labels = torch.arange(len(pixel_values), device=CUDA) % evit.config.num_labels
    checkpointed = copy.deepcopy(evit)
    checkpointed.activation_checkpointing_enable()
    outputs = []
    for model in (evit, checkpointed):
        output = model(pixel_values, labels=labels, keep_rate=0.5)
        output.loss.backward()
        outputs.append(output)
    assert all(layer.gradient_checkpointing for layer in checkpointed.base_model.layers)
    assert [t.tolist() for t in outputs[0].kept_token_indices] == [t.tolist() for t in outputs[1].kept_token_indices]
    torch.testing.assert_close(flat_gradients(checkpointed), flat_gradients(evit), atol=1e-5, rtol=1e-4)


# Several processes with NCCL.


def _evaluate_in_process(rank, world_size, port, output_path):
    torch.cuda.set_device(rank)
    torch.distributed.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        _, evit = stock_and_evit("vit-classifier", shape=dict(TINY, num_labels=10))
        rows = evit_hf.evaluate_keep_rates(
            evit.to(CUDA), small_dataset(37), keep_rates=(1.0, 0.5), batch_size=8, progress=False, distributed=True
        )
        if rank == 0:
            with open(output_path, "w") as handle:
                json.dump(rows, handle)
    finally:
        torch.distributed.destroy_process_group()


@gpu
@two_gpus
def test_two_processes_evaluate_with_nccl(tmp_path):
    output_path = str(tmp_path / "rows.json")
    torch.multiprocessing.spawn(_evaluate_in_process, args=(2, free_port(), output_path), nprocs=2, join=True)
    rows = json.load(open(output_path))
    _, evit = stock_and_evit("vit-classifier", shape=dict(TINY, num_labels=10))
    expected = evit_hf.evaluate_keep_rates(
        evit.to(CUDA), small_dataset(37), keep_rates=(1.0, 0.5), batch_size=8, progress=False
    )
    for row, one_process in zip(rows, expected, strict=True):
        assert row["samples"] == one_process["samples"] == 37  # an odd count: every image once, none repeated
        for key in ("keep_rate", "accuracy", "top5_accuracy", "macs"):
            assert row[key] == pytest.approx(one_process[key]), key


@gpu
@two_gpus
def test_example_evaluates_on_two_gpus_with_torchrun(tmp_path):
    pytest.importorskip("sklearn")  # the example's default data: scikit-learn's digits
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun is not installed")
    from .run_helpers import save_small_vit

    model = save_small_vit(tmp_path / "vit")
    arguments = ["--model_name_or_path", model, "--keep_rates", "1.0", "0.5", "--max_eval_samples", "37",
                 "--batch_size", "8", "--num_workers", "2", "--dtype", "bfloat16"]  # fmt: skip
    script = os.path.join(ROOT, "examples", "evaluate_keep_rates.py")
    command = [torchrun, "--nproc_per_node", "2", "--master_port", free_port(), script, *arguments]
    command += ["--output_dir", str(tmp_path / "out")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "out" / "keep_rates.json").read_text())
    assert saved["processes"] == 2 and [row["samples"] for row in saved["rows"]] == [37, 37]


@gpu
def test_example_fine_tunes_in_bf16_on_cuda(tmp_path):
    pytest.importorskip("sklearn")  # the example's default data: scikit-learn's digits
    from .example_modules import run_image_classification
    from .run_helpers import save_small_vit, training_args

    output_dir = tmp_path / "run"
    arguments = training_args(save_small_vit(tmp_path / "vit"), output_dir, "--keep_rate", "0.7", "--bf16", "true",
                              "--dataloader_num_workers", "2")  # fmt: skip
    results = run_image_classification.main(arguments)
    all_results = json.loads((output_dir / "all_results.json").read_text())
    assert all_results["eval_accuracy"] == results["eval_accuracy"] and 0 <= results["eval_accuracy"] <= 1
    assert torch.isfinite(torch.tensor(all_results["train_loss"]))
    rows = json.loads((output_dir / "keep_rate_results.json").read_text())
    assert [row["keep_rate"] for row in rows] == [1.0, 0.7, 0.5] and all(row["images_per_s"] > 0 for row in rows)
    assert evit_hf.EViTForImageClassification.from_pretrained(output_dir).config.keep_rate == 0.7


# The GPU benchmark table (scripts/gpu_benchmark.py) and scripts/gpu_check.sh.


@pytest.mark.parametrize("device", ["cpu", pytest.param(CUDA, marks=gpu)])
def test_benchmark_table(tmp_path, device):
    folder = checkpoint_folder(tmp_path / "vit")
    output_dir = tmp_path / "table"
    arguments = ["--device", device, "--models", folder, "--image-size", "16", "--batch-sizes", "2",
                 "--keep-rates", "0.7", "0.5", "--precisions", "bf16-autocast", "--eager-max-batch-size", "2",
                 "--train-batch-size", "2", "--compile-batch-size", "2", "--compile-backend", "eager",
                 "--rounds", "1", "--warmup", "1", "--output-dir", str(output_dir)]  # fmt: skip
    # The compile group asks for more time than the budget has: it is listed as not run.
    status = DRIVER.main([*arguments, "--compile-seconds-per-graph", "1000"])
    results = json.loads((output_dir / "gpu_benchmark.json").read_text())
    assert status == 0 and results["failures"] == []
    groups = [(r["mode"], r["precision"], r["attention"]) for r in results["rows"] if r["variant"] == "stock"]
    flash = [("inference", "bf16-cast", name) for name in DRIVER.installed_flash_implementations()]
    assert groups == [("inference", "bf16-autocast", "sdpa"), ("inference", "bf16-autocast", "eager"), *flash,
                      ("train", "bf16-autocast", "sdpa")]  # fmt: skip
    assert [group["compiled"] for group in results["not_run"]] == [True]
    for row in results["rows"]:
        assert row["images_per_s"] > 0 and row["macs_ratio"] >= 1
        assert (row["peak_memory_mb"] is not None) == (device == CUDA)
        if row["variant"] == "stock":
            assert row["speedup"] == 1.0 and row["macs_ratio"] == 1.0
    macs_ratios = [row["macs_ratio"] for row in results["rows"][:3]]
    assert macs_ratios[0] < macs_ratios[1] < macs_ratios[2]  # stock, keep 0.7, keep 0.5
    table = (output_dir / "gpu_benchmark.md").read_text()
    assert table.startswith("| model | mode |") and "Not run:" in table and "compiled: time budget" in table


def test_benchmark_table_groups_follow_the_benchmark_shapes():
    models = [name for name in benchmark.SHAPES if name not in DRIVER.LEFT_OUT_SHAPES]
    assert {"deit-small", "deit-base", "clip-vit-b16", "dinov2-small"} <= set(models)
    groups = DRIVER.plan_groups(models, [1, 64, 256], ["bf16-autocast", "bf16-cast"], ["sdpa", "eager",
                                "flash_attention_2"], 64, 64, 64)  # fmt: skip
    assert {group["model"] for group in groups} == set(models)
    assert all(group["batch_size"] <= 64 for group in groups if group["attention"] == "eager")
    assert all(group["precision"] == "bf16-cast" for group in groups if group["attention"].startswith("flash"))
    compiled = [group["compiled"] for group in groups]
    assert compiled == sorted(compiled) and sum(compiled) == len(models)  # compile groups last, one per model
    per_model = len(groups) // len(models)
    assert per_model == 3 * 2 + 2 + 3 + 1 + 1  # sdpa x 2 precisions, eager up to 64, flash, training, compiled


def test_benchmark_table_reports_a_failing_group(tmp_path):
    args, _ = DRIVER.parse_arguments(["--device", "cpu", "--image-size", "16", "--keep-rates", "0.5", "--rounds", "1",
                                      "--warmup", "1", "--output-dir", str(tmp_path)])  # fmt: skip
    model = checkpoint_folder(tmp_path / "vit")
    group = dict(model=model, mode="inference", precision="float32", compiled=False, batch_size=2)
    results = DRIVER.run_table(
        args, [dict(group, attention="no-such-attention"), dict(group, attention="sdpa")], torch.device("cpu"),
        log=lambda line: None,
    )  # fmt: skip
    assert [failure["attention"] for failure in results["failures"]] == ["no-such-attention"]
    assert "no-such-attention" in results["failures"][0]["error"]
    assert [row["attention"] for row in results["rows"]] == ["sdpa", "sdpa"]  # the next group still ran


@pytest.mark.slow  # a real run in a subprocess, or a fresh interpreter: seconds on 2 cores
def test_gpu_check_without_cuda_says_so_in_one_line(tmp_path):
    output_dir = tmp_path / "results"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), str(output_dir)], env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and "no CUDA device" in result.stdout and result.stderr == ""
    assert not output_dir.exists()


@pytest.mark.parametrize(
    "arguments, message",
    [(["a", "b"], "expected at most one argument (the output folder), got 2"),
     (["--fast"], "unknown option --fast"), (["/dev/null/results"], "/dev/null is a file, not a folder")],
    ids=["two-arguments", "option", "file"],
)  # fmt: skip
def test_gpu_check_refuses_bad_arguments(arguments, message):
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), *arguments],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2 and message in result.stderr and result.stdout == ""
