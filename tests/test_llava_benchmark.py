"""The vision-language benchmark on a tiny LLaVA: every variant measured, prefill and decoding timed on their own,
the KV cache in proportion to the tokens the language model reads."""

import json
import math

import pytest

import evit_hf.families
import evit_hf.vision_language_benchmark
from evit_hf.cli import main
from evit_hf.outputs import MANIFEST_FILE
from evit_hf.vision_language_benchmark import DECODE_TOKENS, run_vision_language_benchmark

from .command_helpers import refusal
from .llava_builders import IMAGE_TOKEN_ID, TINY_LLAMA, TINY_LLAVA_VISION


@pytest.fixture
def tiny_shape(monkeypatch):
    shapes = evit_hf.families.benchmark_shapes()
    family, _ = shapes["llava-1.5-tower-small-lm"]
    tiny = dict(vision_config=TINY_LLAVA_VISION, text_config=TINY_LLAMA, image_token_index=IMAGE_TOKEN_ID)
    monkeypatch.setattr(evit_hf.families, "benchmark_shapes", lambda: {**shapes, "tiny-llava": (family, tiny)})
    return "tiny-llava"


def test_every_variant_is_measured_with_its_own_image_tokens(tiny_shape):
    prompt_length = 8
    results = run_vision_language_benchmark(
        tiny_shape, [0.5], prompt_length=prompt_length, warmup=0, rounds=2, progress=False
    )
    rows = results["rows"]
    assert [(row["model"], row["image_tokens"]) for row in rows] == [("stock", 64), ("EViT", 18), ("EViT", 33)]
    stock = rows[0]
    for row in rows:
        assert row["prefill_ms"] > 0
        # Timed on its own: DECODE_TOKENS steps of a tiny model take well over a microsecond each.
        assert 0 < row["decode_tokens_per_s"] < DECODE_TOKENS * 1e6
        # Keys and values of every token the language model read, in proportion to their number.
        assert row["kv_cache_bytes"] * (stock["image_tokens"] + prompt_length) == stock["kv_cache_bytes"] * (
            row["image_tokens"] + prompt_length
        )
    for row in rows[1:]:
        assert row["macs_ratio"] > 1
        assert math.isclose(row["share_of_bound"], row["prefill_speedup"] / row["macs_ratio"])


def test_the_command_writes_its_files_under_the_output_policy(tiny_shape, tmp_path, capsys, monkeypatch):
    output_dir = tmp_path / "bench"
    arguments = ["benchmark", "--model", tiny_shape, "--keep-rates", "0.5", "--warmup", "0", "--rounds", "1",
                 "--no-progress", "--output-dir", str(output_dir)]  # fmt: skip
    main(arguments)
    written = json.loads((output_dir / "benchmark.json").read_text())
    assert [row["image_tokens"] for row in written["vision_language"][0]["rows"]] == [64, 18, 33]
    assert (output_dir / "benchmark.md").read_text().strip() in capsys.readouterr().out
    assert set(json.loads((output_dir / MANIFEST_FILE).read_text())["written"]) == {"benchmark.json", "benchmark.md"}
    # A user's file under one of its names is refused before any model is built, and kept.
    user_folder = tmp_path / "mine"
    user_folder.mkdir()
    (user_folder / "benchmark.md").write_text("my notes")

    def refuse(*args, **kwargs):
        raise AssertionError("the benchmark started before refusing")

    monkeypatch.setattr(evit_hf.vision_language_benchmark, "run_vision_language_benchmark", refuse)
    line = refusal(capsys, [*arguments[:-1], str(user_folder)])
    assert "benchmark.md" in line and "--output-dir" in line
    assert (user_folder / "benchmark.md").read_text() == "my notes"
    assert "--batch-sizes" in refusal(capsys, [*arguments, "--batch-sizes", "2"])


def test_decoding_is_timed_as_single_token_steps_over_the_prefills_cache(tiny_shape, monkeypatch):
    benchmark = evit_hf.vision_language_benchmark
    steps = []
    real_decode = benchmark._decode_seconds

    def decode_seconds(model, output, device):
        cache = benchmark._cache_of(output)
        cache_length = cache.get_seq_length()

        def record(module, args, kwargs):
            given = kwargs.get("cache", kwargs.get("past_key_values"))
            steps.append((tuple(kwargs["input_ids"].shape), cache_length, given is cache))

        handle = model.register_forward_pre_hook(record, with_kwargs=True)
        try:
            real_decode(model, output, device)
        finally:
            handle.remove()
        return 0.25  # the rate below is DECODE_TOKENS / this

    monkeypatch.setattr(benchmark, "_decode_seconds", decode_seconds)
    results = run_vision_language_benchmark(tiny_shape, [0.5], prompt_length=8, warmup=0, rounds=1, progress=False)
    assert [row["decode_tokens_per_s"] for row in results["rows"]] == [DECODE_TOKENS / 0.25] * 3
    # Each variant: DECODE_TOKENS forwards of one token each, over the cache of its own prompt.
    prompts = [row["image_tokens"] + 8 for row in results["rows"]]
    assert steps == [((1, 1), prompt, True) for prompt in prompts for _ in range(DECODE_TOKENS)]
