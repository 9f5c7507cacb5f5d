import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
from transformers import ViTConfig

from evit_hf import benchmark_timing, count_macs
from evit_hf.benchmark import (
    BenchmarkSettings,
    InvalidBenchmarkSetting,
    benchmarked_reduction_layers,
    build_models,
    macs_config,
    max_logit_difference_between_backends,
    model_patch_size,
    reorganization_overhead,
    resolution_comparison,
    run_benchmark,
    smallest_batches_at_bound,
)
from evit_hf.cli import main as cli_main
from evit_hf.cli import run_command
from evit_hf.configuration_evit_base import check_keep_rate
from evit_hf.families import FAMILIES_BY_NAME

from .fake_clock import FakeClock
from .model_builders import (
    FAMILY_TESTERS,
    TWO_LAYERS,
    builder_classes,
    encoder_main_output,
    has_text_tower,
    stock_and_evit,
    tiny_stock_model,
)
from .script_modules import load_script


def benchmark_main(argv):
    """`evit-hf benchmark ARGV`, in this process; returns the results."""
    return run_command(["benchmark", *argv])


@pytest.mark.slow  # 145 s on a loaded 2-core machine
def test_benchmark_rows_and_files(tmp_path):
    results = benchmark_main(
        ["--model", "deit-tiny", "--batch-sizes", "2", "--image-sizes", "64", "--keep-rates", "0.7", "0.5",
         "--modes", "inference", "train", "--rounds", "1", "--warmup", "1", "--output-dir", str(tmp_path),
         "--no-progress"]
    )  # fmt: skip
    rows = results["rows"]
    assert [(row["mode"], row["variant"], row["keep_rate"]) for row in rows] == [
        ("inference", "stock", None), ("inference", "evit", 0.7), ("inference", "evit", 0.5),
        ("train", "stock", None), ("train", "evit", 0.7), ("train", "evit", 0.5),
    ]  # fmt: skip
    for row in rows:
        assert row["images_per_s_min"] <= row["images_per_s"] <= row["images_per_s_max"]
        assert row["peak_memory_mb"] is not None and row["peak_memory_mb"] >= 0
    assert rows[0]["speedup"] == 1.0 and rows[0]["macs_ratio"] == 1.0
    assert rows[1]["macs_ratio"] > 1.0 and rows[2]["macs_ratio"] > rows[1]["macs_ratio"]
    assert json.loads((tmp_path / "benchmark.json").read_text())["rows"] == rows
    assert (tmp_path / "benchmark.md").read_text().startswith("| mode | device |")
    assert (tmp_path / "benchmark.png").stat().st_size > 1000


@pytest.mark.slow  # inductor compiles each keep rate's graph (~5 s); test_training checks compile without recompiles
def test_compiled_benchmark_runs(tmp_path):
    # torch.compile's cost on CPU is mostly compiling C++ kernels, and then tracing each layer: a two-layer shape from
    # a checkpoint folder has the kernels of any depth (both layers reorganize tokens: layer 1 also tracks the fused
    # token of layer 0) at a fraction of deit-tiny's twelve layers.
    ViTConfig(**TWO_LAYERS).save_pretrained(tmp_path)
    settings = BenchmarkSettings(
        model=str(tmp_path), keep_rates=[0.5], batch_sizes=[2], image_sizes=[16], compiled=[True], rounds=1, warmup=1
    )
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    rows = run_benchmark(settings, progress=False)["rows"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before >= 2  # stock and EViT compiled
    assert [(row["compiled"], row["variant"], row["keep_rate"]) for row in rows] == [
        (True, "stock", None), (True, "evit", 0.5)
    ]  # fmt: skip
    assert all(row["images_per_s"] > 0 for row in rows) and rows[1]["macs_ratio"] > 1


def test_reorganization_overhead_is_a_share():
    overhead = reorganization_overhead("deit-tiny", keep_rate=0.7, batch_size=2, image_size=64, rounds=2)
    assert 0 < overhead["share"] < 1
    assert overhead["reorganization_ms"] < overhead["forward_ms"]


def test_resolution_comparison_sets_evit_at_larger_inputs_against_the_stock_model_at_the_reference_size(tmp_path):
    ViTConfig(**TWO_LAYERS).save_pretrained(tmp_path)
    model = str(tmp_path)
    rows = resolution_comparison(
        model, keep_rate=0.5, image_sizes=(24,), reference_image_size=16, batch_size=1, rounds=1, warmup=0
    )
    stock, evit = rows
    assert (stock["variant"], stock["image_size"], stock["keep_rate"]) == ("stock", 16, None)
    assert (evit["variant"], evit["image_size"], evit["keep_rate"]) == ("evit", 24, 0.5)
    reference_macs = count_macs(macs_config(model, 16), keep_rate=1.0)
    assert stock["macs"] == reference_macs and stock["macs_relative_to_stock_at_reference"] == 1.0
    assert evit["macs"] == count_macs(macs_config(model, 24), keep_rate=0.5)
    assert evit["macs_relative_to_stock_at_reference"] == pytest.approx(evit["macs"] / reference_macs)
    assert stock["speed_relative_to_stock_at_reference"] == 1.0
    for row in rows:
        assert row["images_per_s"] > 0 and row["speed_relative_to_stock_at_reference"] > 0


def test_eager_and_sdpa_attention_give_evit_the_same_logits_and_tokens(tmp_path):
    # 16 px patches at the function's 224 px: DeiT's 196 candidates (far more would make near-tied scores likely, which
    # the two backends' rounding may order differently).
    ViTConfig(**dict(TWO_LAYERS, patch_size=16)).save_pretrained(tmp_path)
    difference = max_logit_difference_between_backends(str(tmp_path), keep_rate=0.5, batch_size=1)
    assert difference["same_kept_tokens"] and difference["max_abs_logit"] > 0
    assert 0 <= difference["max_abs_logit_difference"] < 1e-4 * difference["max_abs_logit"]


@pytest.mark.parametrize(
    "settings, field, message",
    [({"model": "resnet"}, "model", "must be one of deit-tiny"), ({"dtypes": ["int8"]}, "dtypes", "must be among"),
     ({"keep_rates": [0.0]}, "keep_rates", "keep_rate must be in (0, 1] (the share of candidate tokens each "
      "reduction layer keeps), got 0.0"),
     ({"keep_rates": [float("nan")]}, "keep_rates", "keep_rate must be a number in (0, 1], such as 0.7; got nan"),
     ({"batch_sizes": [0]}, "batch_sizes", "a batch size is a whole number >= 1"),
     ({"image_sizes": [8]}, "image_sizes", "at least the patch size (16 px for deit-small); got 8"),
     ({"rounds": 0}, "rounds", "whole number >= 1"), ({"warmup": -1}, "warmup", "whole number >= 0"),
     ({"devices": ["tpu"]}, "devices", "unknown device 'tpu'"),
     ({"attn_implementations": ["fast"]}, "attn_implementations", "cannot use 'fast'"),
     ({"modes": []}, "modes", "needs at least one value")],
    ids=["model", "dtype", "keep-rate", "keep-rate-nan", "batch-size", "image-size", "rounds", "warmup", "device",
         "attention", "empty"],
)  # fmt: skip
def test_benchmark_settings_are_validated(settings, field, message):
    with pytest.raises(InvalidBenchmarkSetting, match=re.escape(message)) as error:
        BenchmarkSettings(**settings)
    assert isinstance(error.value, ValueError) and error.value.field == field


def test_the_smallest_image_size_is_one_patch():
    assert BenchmarkSettings(model="deit-tiny", image_sizes=[16, 17]).image_sizes == [16, 17]  # 16 px patches
    with pytest.raises(InvalidBenchmarkSetting, match=r"at least the patch size \(16 px for deit-tiny\); got 15"):
        BenchmarkSettings(model="deit-tiny", image_sizes=[16, 15])


# Keep rates the settings refuse: each with the configurations' own check, `check_keep_rate`, and its message.
REFUSED_KEEP_RATES = {
    "zero": (0.0, None),
    "above-one": (1.5, None),
    "infinite": (float("inf"), None),
    "a-yes": (True, None),
    "a-word": ("0.7", None),
    "empty-list": ([], None),
    "per-layer-with-a-zero": ([0.9, 0.0, 0.5], None),
    "per-layer-too-short": ([0.9, 0.7], [3, 6, 9]),
}


@pytest.mark.parametrize("keep_rate, layers", REFUSED_KEEP_RATES.values(), ids=REFUSED_KEEP_RATES.keys())
def test_benchmark_settings_refuse_keep_rates_with_the_configurations_check(keep_rate, layers):
    with pytest.raises(ValueError) as expected:
        check_keep_rate(keep_rate, layers)
    with pytest.raises(InvalidBenchmarkSetting) as refused:
        BenchmarkSettings(model="deit-tiny", keep_rates=[0.7, keep_rate])  # deit-tiny: reduction layers 3, 6 and 9
    assert refused.value.field == "keep_rates"
    assert str(refused.value) == "keep_rates: " + str(expected.value).rstrip(".")


def test_every_benchmark_builds_its_models_with_the_timing_modules_build_models(monkeypatch):
    # The refusal tests (test_cli.py, test_command_outputs.py) replace `benchmark_timing.build_models` to prove that no
    # model is built before the arguments are checked: every measurement must look the name up there.
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a model was built")

    monkeypatch.setattr(benchmark_timing, "build_models", refuse)
    settings = BenchmarkSettings(model="deit-tiny", keep_rates=[0.5], batch_sizes=[1], rounds=1, warmup=0)
    measurements = {
        "run_benchmark": lambda: run_benchmark(settings, progress=False),
        "resolution_comparison": lambda: resolution_comparison("deit-tiny", image_sizes=(32,), batch_size=1),
        "reorganization_overhead": lambda: reorganization_overhead("deit-tiny", batch_size=1, image_size=32),
        "max_logit_difference_between_backends": lambda: max_logit_difference_between_backends("deit-tiny"),
    }
    for name, measure in measurements.items():
        with pytest.raises(AssertionError, match="a model was built"):
            measure()
        assert calls and calls.pop()[0] == "deit-tiny", name


@pytest.mark.parametrize(
    "model, image_size, tokens",
    # CLIP ViT-B/16's shape builds 86 M random weights (~6 s): opt-in; saved CLIP folders are benchmarked by default.
    [
        pytest.param("clip-vit-b16", 64, 17, marks=pytest.mark.slow),
        pytest.param("dinov2-small", 56, 17, marks=pytest.mark.slow),
    ],
)
def test_benchmark_knows_clip_and_dinov2_shapes(model, image_size, tokens):
    settings = BenchmarkSettings(
        model=model, keep_rates=[0.5], batch_sizes=[1], image_sizes=[image_size], rounds=1, warmup=0,
        measure_memory=False,
    )  # fmt: skip
    stock, evit = build_models(model, image_size)
    assert type(evit).__name__ == "EViT" + type(stock).__name__
    assert stock.config.patch_size == model_patch_size(model)
    with torch.no_grad():
        assert (
            evit(torch.zeros(1, 3, image_size, image_size), output_hidden_states=True).hidden_states[0].shape[1]
            == tokens
        )
    rows = run_benchmark(settings, progress=False)["rows"]
    config = macs_config(model, image_size)
    assert rows[1]["macs_ratio"] == count_macs(config, keep_rate=1.0) / count_macs(config, keep_rate=0.5) > 1


def test_benchmark_refuses_what_a_family_cannot_run(capsys):
    with pytest.raises(InvalidBenchmarkSetting, match="train needs a classification loss; clip-vit-b16"):
        BenchmarkSettings(model="clip-vit-b16", modes=["train"])
    with pytest.raises(SystemExit):
        benchmark_main(["--model", "dinov2-small", "--overhead"])
    assert "argument --overhead: measures ViT shapes only; dinov2-small" in capsys.readouterr().err


def test_train_mode_draws_labels_from_the_models_classes(tmp_path, capsys):
    # A checkpoint folder with 3 classes: labels drawn up to 1000 would fail the loss ("Target 625 is out of bounds").
    ViTConfig(**TWO_LAYERS, num_labels=3).save_pretrained(tmp_path / "three_classes")
    cli_main(
        ["benchmark", "--model", str(tmp_path / "three_classes"), "--modes", "train", "--keep-rates", "0.5",
         "--batch-sizes", "8", "--image-sizes", "16", "--rounds", "1", "--warmup", "0", "--no-memory", "--no-progress"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "| train | cpu | float32 | False | 8 | 16 | stock |  |" in out
    assert "| train | cpu | float32 | False | 8 | 16 | evit | 0.5 |" in out


def test_images_per_s_is_each_variants_own_step_time(tmp_path, monkeypatch):
    # Each step costs a known time, and building the models a long one: images/s must be the batch over the step's
    # own time, neither the time of all variants' steps nor the wall time with the loading.
    ViTConfig(**TWO_LAYERS).save_pretrained(tmp_path)
    clock = FakeClock()
    monkeypatch.setattr(benchmark_timing, "time", SimpleNamespace(perf_counter=clock))
    step_seconds = {None: 0.4, 0.7: 0.25, 0.5: 0.125}
    build = benchmark_timing.build_models

    def slow_build(*args, **kwargs):
        clock.advance(1000.0)
        return build(*args, **kwargs)

    def timed_step(model, pixel_values, labels, mode, keep_rate):
        return lambda: clock.advance(step_seconds[keep_rate])

    monkeypatch.setattr(benchmark_timing, "build_models", slow_build)
    monkeypatch.setattr(benchmark_timing, "_step_function", timed_step)
    settings = BenchmarkSettings(
        model=str(tmp_path), keep_rates=[0.7, 0.5], batch_sizes=[4], image_sizes=[16], rounds=3, warmup=1,
        measure_memory=False,
    )  # fmt: skip
    rows = run_benchmark(settings, progress=False)["rows"]
    assert [row["keep_rate"] for row in rows] == [None, 0.7, 0.5]
    for row in rows:
        seconds = step_seconds[row["keep_rate"]]
        assert row["images_per_s"] == row["images_per_s_min"] == row["images_per_s_max"] == pytest.approx(4 / seconds)
        assert row["latency_ms"] == pytest.approx(1000 * seconds)
        assert row["speedup"] == pytest.approx(0.4 / seconds)


@pytest.mark.parametrize(
    "field, value", [("hidden_size", 0), ("num_attention_heads", 0), ("intermediate_size", -4), ("num_labels", 0)]
)
def test_checkpoint_folders_describing_no_classifier_are_refused(field, value, tmp_path, capsys):
    config = ViTConfig(**TWO_LAYERS).to_dict()
    (tmp_path / "config.json").write_text(json.dumps({**config, field: value, "id2label": {}, "label2id": {}}))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["benchmark", "--model", str(tmp_path), "--image-sizes", "16", "--no-progress"])
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    needs = "a classifier needs" if field == "num_labels" else "the model needs"
    assert line == (
        f"evit-hf benchmark: error: argument --model: {tmp_path}/config.json has {field}={value}, where {needs} a "
        "whole number >= 1; give a folder written by save_pretrained"
    )


# Every builder of every family in the table: a saved stock folder, and one EViT folder (written by evit_hf).
FOLDER_BUILDERS = [(family, builder) for family, builders in FAMILY_TESTERS.items() for builder in builders]


@pytest.mark.parametrize("family_name, builder", FOLDER_BUILDERS, ids=[builder for _, builder in FOLDER_BUILDERS])
def test_benchmark_runs_a_saved_folder_of_every_family(family_name, builder, tmp_path, capsys):
    stock_class, evit_class = builder_classes(builder)
    tiny_stock_model(builder).save_pretrained(tmp_path)
    stock, evit = build_models(str(tmp_path), image_size=32)
    assert (type(stock), type(evit)) == (stock_class, evit_class)
    assert evit_class in FAMILIES_BY_NAME[family_name].models.values()
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    image_output = (
        (lambda model, **kw: model.get_image_features(pixel_values, **kw).pooler_output)
        if has_text_tower(builder)
        else (lambda model, **kw: encoder_main_output(model(pixel_values, **kw)))
    )
    with torch.no_grad():  # the same weights: keeping every token, EViT computes what the stock model does
        torch.testing.assert_close(image_output(evit, keep_rate=1.0), image_output(stock), rtol=1e-4, atol=1e-5)

    cli_main(
        ["benchmark", "--model", str(tmp_path), "--batch-sizes", "1", "--rounds", "1", "--warmup", "0",
         "--keep-rates", "0.5", "--image-sizes", "32", "--no-memory", "--no-progress"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "| inference | cpu | float32 | False | 1 | 32 | stock |  |" in out
    assert "| inference | cpu | float32 | False | 1 | 32 | evit | 0.5 |" in out
    ratio = count_macs(macs_config(str(tmp_path), 32), keep_rate=1.0) / count_macs(
        macs_config(str(tmp_path), 32), keep_rate=0.5
    )
    assert ratio > 1 and f"| {ratio:.3f} |" in out


def test_benchmark_runs_a_saved_evit_folder(tmp_path):
    _, evit = stock_and_evit("deit-classifier")
    evit.save_pretrained(tmp_path)
    stock, rebuilt = build_models(str(tmp_path), image_size=32)
    # A DeiT classifier and its EViT conversion, with the folder's EViT settings.
    assert (type(stock).__name__, type(rebuilt)) == ("DeiTForImageClassification", type(evit))
    assert rebuilt.config.reduction_layers == evit.config.reduction_layers


def test_a_rows_spread_is_its_fastest_and_slowest_timed_round_without_the_warm_up(tmp_path, monkeypatch):
    # Step times from a fake clock that change from round to round: a slow warm-up round, then 0.2, 0.4 and 0.3 s for
    # the stock model and half as long for EViT.
    ViTConfig(**TWO_LAYERS).save_pretrained(tmp_path)
    clock = FakeClock()
    monkeypatch.setattr(benchmark_timing, "time", SimpleNamespace(perf_counter=clock))
    round_seconds = iter([5.0, 2.5, 0.2, 0.1, 0.4, 0.2, 0.3, 0.15])  # stock, EViT, per round

    def timed_step(model, pixel_values, labels, mode, keep_rate):
        return lambda: clock.advance(next(round_seconds))

    monkeypatch.setattr(benchmark_timing, "_step_function", timed_step)
    settings = BenchmarkSettings(
        model=str(tmp_path), keep_rates=[0.5], batch_sizes=[4], image_sizes=[16], rounds=3, warmup=1,
        measure_memory=False,
    )  # fmt: skip
    stock, evit = run_benchmark(settings, progress=False)["rows"]
    assert (stock["images_per_s_min"], stock["images_per_s"], stock["images_per_s_max"]) == pytest.approx(
        (4 / 0.4, 4 / 0.3, 4 / 0.2)
    )
    assert (evit["images_per_s_min"], evit["images_per_s"], evit["images_per_s_max"]) == pytest.approx(
        (4 / 0.2, 4 / 0.15, 4 / 0.1)
    )
    assert stock["latency_ms"] == pytest.approx(300) and evit["speedup"] == pytest.approx(2)


def test_a_named_shapes_stock_and_evit_models_share_their_weights():
    stock, evit = build_models("deit-tiny", image_size=32)
    assert stock.state_dict().keys() == evit.state_dict().keys()
    for name, tensor in stock.state_dict().items():
        assert torch.equal(tensor, evit.state_dict()[name]), name
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # keeping every token, EViT computes what the stock model does
        torch.testing.assert_close(evit(pixel_values, keep_rate=1.0).logits, stock(pixel_values).logits)


def test_small_batch_report_names_the_smallest_batch_at_95_percent_of_the_macs_ratio(tmp_path, monkeypatch, capsys):
    # Step times from a fake clock: the stock model takes 1 s per image; EViT at keep 0.7 reaches 0.90, 0.96 and 0.99
    # of its MACs ratio at batch 1, 2 and 4 (first at the bound at batch 2); at keep 0.5 never more than 0.94.
    ViTConfig(**TWO_LAYERS).save_pretrained(tmp_path / "model")
    config = macs_config(str(tmp_path / "model"), 16)
    macs_ratio = {rate: count_macs(config, keep_rate=1.0) / count_macs(config, keep_rate=rate) for rate in (0.7, 0.5)}
    share_of_bound = {(0.7, 1): 0.90, (0.7, 2): 0.96, (0.7, 4): 0.99, (0.5, 1): 0.80, (0.5, 2): 0.90, (0.5, 4): 0.94}
    clock = FakeClock()
    monkeypatch.setattr(benchmark_timing, "time", SimpleNamespace(perf_counter=clock))

    def timed_step(model, pixel_values, labels, mode, keep_rate):
        batch_size = pixel_values.shape[0]
        if keep_rate is None:
            return lambda: clock.advance(1.0 * batch_size)
        return lambda: clock.advance(batch_size / (share_of_bound[keep_rate, batch_size] * macs_ratio[keep_rate]))

    monkeypatch.setattr(benchmark_timing, "_step_function", timed_step)
    output_dir = tmp_path / "results"
    cli_main(
        ["benchmark", "--model", str(tmp_path / "model"), "--keep-rates", "0.7", "0.5", "--batch-sizes", "4", "1", "2",
         "--image-sizes", "16", "--rounds", "2", "--warmup", "0", "--no-memory", "--no-progress",
         "--output-dir", str(output_dir)]
    )  # fmt: skip
    out = capsys.readouterr().out

    entries = json.loads((output_dir / "benchmark.json").read_text())["small_batches"]
    assert [(entry["keep_rate"], entry["smallest_batch_size"]) for entry in entries] == [
        (0.7, 2),
        (0.5, "not reached"),
    ]
    for entry in entries:
        assert entry["macs_ratio"] == pytest.approx(macs_ratio[entry["keep_rate"]])
        assert entry["speedup_over_macs_ratio"] == {
            str(size): pytest.approx(share_of_bound[entry["keep_rate"], size]) for size in (1, 2, 4)
        }
    markdown = (output_dir / "benchmark.md").read_text()
    prefix = f"| {tmp_path / 'model'} | inference | cpu | float32 | False | 16 | sdpa |"
    for text in (markdown, out):
        assert "smallest batch size at 95% of the MACs ratio |" in text
        assert f"{prefix} 0.7 | {macs_ratio[0.7]:.3f} | 2 |" in text
        assert f"{prefix} 0.5 | {macs_ratio[0.5]:.3f} | not reached |" in text


def test_small_batch_report_of_rows():
    rows = [
        dict(model="m", mode="inference", device="cpu", dtype="float32", compiled=False, image_size=224,
             attn_implementation="sdpa", variant=variant, keep_rate=rate, batch_size=size, macs_ratio=1.5,
             speedup_over_macs_ratio=share)
        for variant, rate, size, share in [("stock", None, 1, 0.5), ("evit", 0.7, 8, 0.95), ("evit", 0.7, 1, 0.949),
                                           ("evit", 0.7, 32, 1.0)]
    ]  # fmt: skip
    (entry,) = smallest_batches_at_bound(rows)
    assert entry["smallest_batch_size"] == 8  # exactly 95% counts; 94.9% does not
    assert smallest_batches_at_bound(rows, share=1.01)[0]["smallest_batch_size"] == "not reached"


def test_benchmark_takes_one_keep_rate_per_reduction_layer(tmp_path, capsys):
    model = tmp_path / "model"  # the results go beside it: never into an input's folder
    tiny_stock_model("vit-classifier").save_pretrained(model)
    layers = benchmarked_reduction_layers(str(model), 32)
    per_layer = [0.9, 0.7, 0.5][: len(layers)]
    assert len(per_layer) == len(layers) == 3
    cli_main(
        ["benchmark", "--model", str(model), "--batch-sizes", "1", "--rounds", "1", "--warmup", "0",
         "--keep-rates", "0.7", "/".join(map(str, per_layer)), "--image-sizes", "32", "--no-memory", "--no-progress",
         "--output-dir", str(tmp_path / "out")]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "| evit | 0.9 / 0.7 / 0.5 |" in out
    rows = json.loads((tmp_path / "out" / "benchmark.json").read_text())["rows"]
    row = next(row for row in rows if row["keep_rate"] == per_layer)
    config = macs_config(str(model), 32)
    assert row["macs_ratio"] == pytest.approx(
        count_macs(config, keep_rate=1.0) / count_macs(config, keep_rate=per_layer)
    )
    assert count_macs(config, keep_rate=per_layer) != count_macs(config, keep_rate=0.7)  # a schedule of its own
    small = json.loads((tmp_path / "out" / "benchmark.json").read_text())["small_batches"]
    assert sorted(str(entry["keep_rate"]) for entry in small) == sorted([str(per_layer), "0.7"])


def test_benchmark_refuses_a_per_layer_keep_rate_of_the_wrong_length(tmp_path):
    tiny_stock_model("vit-classifier").save_pretrained(tmp_path)
    with pytest.raises(InvalidBenchmarkSetting, match=r"it has 2 \(\[0.9, 0.7\]\) for 3 reduction layers"):
        BenchmarkSettings(model=str(tmp_path), keep_rates=[[0.9, 0.7]], image_sizes=[32])


@pytest.mark.parametrize("one_layer", [False, True], ids=["every-layer", "one-layer"])
def test_layer_efficiency_bound_walks_the_token_schedule_of_count_macs(one_layer, capsys):
    script = load_script("benchmark_layer_efficiency")
    script.main(["--model", "deit-tiny", "--batch-sizes", "1", "--rounds", "1", "--keep-rate", "0.5"]
                + ["--one-layer"] * one_layer)  # fmt: skip
    (result,) = json.loads(capsys.readouterr().out)
    assert result["distinct_layers"] == (1 if one_layer else 12)
    schedule = result["token_schedule"]
    assert len(schedule) == 12 and schedule[0] == [197, 197]
    # Tokens shrink only in the reduction layers, and each layer starts with the tokens the one before ended with.
    assert [index for index, (before, after) in enumerate(schedule) if after < before] == [3, 6, 9]
    assert all(schedule[index][0] == schedule[index - 1][1] for index in range(1, 12))
    counted = macs_config("deit-tiny", 224)  # as evit-hf benchmark counts it, the head's 1,000 classes included
    assert result["macs_ratio"] == round(count_macs(counted, keep_rate=1.0) / count_macs(counted, keep_rate=0.5), 4)
    # A measured ratio of times (one round): a positive number; whether EViT is faster is the benchmark's to say.
    assert math.isfinite(result["stock_blocks_speedup"]) and result["stock_blocks_speedup"] > 0


def test_layer_efficiency_bound_refuses_other_shapes_before_any_work(capsys):
    with pytest.raises(SystemExit) as error:
        load_script("benchmark_layer_efficiency").main(["--model", "clip-base"])
    assert error.value.code == 2 and "--model must be one of deit-tiny" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, checked", [("0", 0.0), ("1.5", 1.5), ("nan", float("nan"))], ids=["zero", "above-one", "nan"]
)
def test_layer_efficiency_bound_refuses_keep_rates_with_the_configurations_check(text, checked, capsys):
    with pytest.raises(ValueError) as expected:
        check_keep_rate(checked)
    with pytest.raises(SystemExit) as error:
        load_script("benchmark_layer_efficiency").main(["--model", "deit-tiny", "--keep-rate", text])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.value.code == 2 and line.endswith("argument --keep-rate: " + str(expected.value).rstrip(".")), line
