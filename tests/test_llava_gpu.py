"""EViT LLaVA on CUDA: bf16, SDPA and flash attention, generate(). Marked `gpu` (skipped without CUDA); `bash
scripts/gpu_check.sh` runs them. Half precision may swap two candidates with close scores, so bf16 is compared with
its own keep-1 run (exact: stock) and checked for the token counts and finite logits, not against float32."""

import copy
import importlib.util

import pytest
import torch

import evit_hf

from . import spec_reference
from .llava_builders import IMAGE_TOKEN_ID, prompt_ids, tiny_pixels, tiny_stock


CUDA = "cuda"
gpu = pytest.mark.gpu


def _pair(attn_implementation, dtype, **settings):
    stock = tiny_stock("llava", attn_implementation).to(CUDA, dtype)
    evit = evit_hf.apply_evit(copy.deepcopy(stock), **settings)
    return stock, evit


@gpu
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_float32_on_cuda_equals_the_spec(attn_implementation):
    stock, evit = _pair(attn_implementation, torch.float32, keep_rate=0.5)
    pixel_values = tiny_pixels().to(CUDA)
    count = evit_hf.num_image_tokens(evit.config)
    with torch.no_grad():
        features = evit.get_image_features(pixel_values).pooler_output
        want = spec_reference.reference_llava_image_features(
            stock,
            pixel_values,
            dict.fromkeys(evit.config.reduction_layers, 0.5),
            True,
            evit.config.feature_hidden_states,
            False,
        )
        input_ids = prompt_ids(count).to(CUDA)
        logits = evit(input_ids=input_ids, pixel_values=pixel_values).logits
        want_logits = spec_reference.reference_llava_logits(stock, input_ids, want, IMAGE_TOKEN_ID)
    for got, expected in zip(features, want, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(logits, want_logits, atol=1e-3, rtol=1e-3)


@gpu
@pytest.mark.parametrize("attn_implementation", ["sdpa", "flash_attention_2"])
def test_bf16_generate_at_keep_1_equals_stock_and_reads_fewer_tokens_with_reduction(attn_implementation):
    if attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    stock, evit = _pair(attn_implementation, torch.bfloat16, keep_rate=1.0)
    input_ids, pixel_values = prompt_ids(64).to(CUDA), tiny_pixels().to(CUDA, torch.bfloat16)
    arguments = dict(max_new_tokens=4, do_sample=False)
    assert torch.equal(
        evit.generate(input_ids=input_ids, pixel_values=pixel_values, **arguments),
        stock.generate(input_ids=input_ids, pixel_values=pixel_values, **arguments),
    )
    evit.config.keep_rate = 0.5
    count = evit_hf.num_image_tokens(evit.config)
    input_ids = prompt_ids(count).to(CUDA)
    with torch.no_grad():
        logits = evit(input_ids=input_ids, pixel_values=pixel_values).logits
    assert torch.isfinite(logits.float()).all()
    output = evit.generate(input_ids=input_ids, pixel_values=pixel_values, **arguments)
    assert output.shape == (2, count + 5 + 4)
