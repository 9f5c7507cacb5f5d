import json
import re

import pytest
import torch
from transformers import ViTConfig

from evit_hf import count_macs
from evit_hf.benchmark import (
    BenchmarkSettings,
    InvalidBenchmarkSetting,
    build_models,
    macs_config,
    model_patch_size,
    reorganization_overhead,
    run_benchmark,
)
from evit_hf.benchmark import main as benchmark_main


# Two layers, 4 px patches: reduction layers 0 and 1 by the depth rule.
TWO_LAYERS = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=4
)


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


def test_training_step_of_a_checkpoint_folder_draws_labels_of_its_head(tmp_path):
    ViTConfig(**TWO_LAYERS, num_labels=3).save_pretrained(tmp_path)
    settings = BenchmarkSettings(
        model=str(tmp_path), keep_rates=[0.5], batch_sizes=[8], image_sizes=[16], modes=["train"], rounds=1, warmup=1,
        measure_memory=False,
    )  # fmt: skip
    rows = run_benchmark(settings, progress=False)["rows"]
    assert [row["variant"] for row in rows] == ["stock", "evit"] and all(row["images_per_s"] > 0 for row in rows)


def test_reorganization_overhead_is_a_share():
    overhead = reorganization_overhead("deit-tiny", keep_rate=0.7, batch_size=2, image_size=64, rounds=2)
    assert 0 < overhead["share"] < 1
    assert overhead["reorganization_ms"] < overhead["forward_ms"]


@pytest.mark.parametrize(
    "settings, field, message",
    [({"model": "resnet"}, "model", "must be one of deit-tiny"), ({"dtypes": ["int8"]}, "dtypes", "must be among"),
     ({"keep_rates": [0.0]}, "keep_rates", "in (0, 1]; got 0.0"),
     ({"keep_rates": [float("nan")]}, "keep_rates", "in (0, 1]; got nan"),
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


@pytest.mark.parametrize("model, image_size, tokens", [("clip-vit-b16", 64, 17), ("dinov2-small", 56, 17)])
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
