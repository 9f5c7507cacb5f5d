"""Half-precision models of every family take the float32 pixels their image processors make, as the stock models do:
bf16 on CPU, fp16 and bf16 under the `gpu` marker (skipped without CUDA)."""

import pytest
import torch

import evit_hf

from .model_builders import TESTERS, TINY, cached_stock_model, encoder_main_output, model_inputs


gpu = pytest.mark.gpu
SETTINGS = [
    ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.float16, marks=gpu),
    pytest.param("cuda", torch.bfloat16, marks=gpu),
]
SETTING_IDS = ["cpu-bfloat16", "cuda-float16", "cuda-bfloat16"]


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)  # tiny models: one thread is fastest and steady on a busy machine; restored after


@pytest.mark.parametrize("device, dtype", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("builder", list(TESTERS))
def test_a_half_precision_model_takes_float32_pixels_as_the_stock_model_does(builder, device, dtype):
    tester = TESTERS[builder]
    stock = cached_stock_model(builder).to(device=device, dtype=dtype)
    evit = evit_hf.apply_evit(cached_stock_model(builder), keep_rate=0.5).to(device=device, dtype=dtype).eval()
    size = TINY["image_size"]
    pixel_values = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    inputs = {key: value.to(device) for key, value in model_inputs(tester, pixel_values).items()}
    assert inputs["pixel_values"].dtype == torch.float32  # what an image processor returns
    with torch.no_grad():
        expected = encoder_main_output(stock(**inputs))
        unreduced = encoder_main_output(evit(**inputs, keep_rate=1.0))
        reduced = encoder_main_output(evit(**inputs))
    assert expected.dtype == unreduced.dtype == reduced.dtype == dtype
    assert torch.equal(unreduced, expected)  # keep 1 is the stock model, in half precision too
    assert torch.isfinite(reduced).all()
    assert reduced.shape[0] == 2
