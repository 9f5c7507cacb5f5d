import json

import pytest
import torch

from evit_hf.benchmark import BenchmarkSettings, reorganization_overhead, run_benchmark
from evit_hf.benchmark import main as benchmark_main

from .model_builders import stock_and_evit


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


def test_compiled_benchmark_runs():
    settings = BenchmarkSettings(
        model="deit-tiny", keep_rates=[0.5], batch_sizes=[2], image_sizes=[32], compiled=[True], rounds=1, warmup=1
    )
    rows = run_benchmark(settings, progress=False)["rows"]
    assert [row["compiled"] for row in rows] == [True, True]


def test_reorganization_overhead_is_a_share():
    overhead = reorganization_overhead("deit-tiny", keep_rate=0.7, batch_size=2, image_size=64, rounds=2)
    assert 0 < overhead["share"] < 1
    assert overhead["reorganization_ms"] < overhead["forward_ms"]


@pytest.mark.parametrize(
    "settings, message",
    [({"model": "resnet"}, "model must be one of"), ({"dtypes": ["int8"]}, "dtypes must be among"),
     ({"keep_rates": [0.0]}, "keep rates must be in")],
    ids=["model", "dtype", "keep-rate"],
)  # fmt: skip
def test_benchmark_settings_are_validated(settings, message):
    with pytest.raises(ValueError, match=message):
        BenchmarkSettings(**settings)


@pytest.mark.gpu
def test_cuda_bf16_forward_matches_fp32(pixel_values):
    _, evit = stock_and_evit("vit-classifier")
    with torch.no_grad():
        reference = evit(pixel_values).logits
        half = evit.to("cuda", torch.bfloat16)(pixel_values.to("cuda", torch.bfloat16)).logits
    torch.testing.assert_close(half.float().cpu(), reference, atol=0.15, rtol=0.05)
