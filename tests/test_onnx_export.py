import numpy as np
import pytest
import torch

from .model_builders import stock_and_evit


onnxruntime = pytest.importorskip("onnxruntime", reason="install evit-hf[onnx] to test the ONNX export")
pytest.importorskip("onnxscript", reason="install evit-hf[onnx] to test the ONNX export")


# Each export takes seconds on 2 cores: all opt-in (--runslow).
@pytest.mark.slow
@pytest.mark.parametrize(
    "family, fuse",
    [
        pytest.param("vit-classifier", True, marks=pytest.mark.slow),
        ("vit-classifier", False),
        ("deit-teacher", True),
        pytest.param("deit-teacher", False, marks=pytest.mark.slow),
    ],
    ids=["fused-vit-classifier", "dropped-vit-classifier", "fused-deit-teacher", "dropped-deit-teacher"],
)
def test_onnx_export_matches_pytorch(family, fuse, tmp_path, pixel_values):
    _, evit = stock_and_evit(family, keep_rate=0.5, fuse_inattentive_tokens=fuse)
    path = tmp_path / "evit.onnx"
    with torch.no_grad():
        expected = evit(pixel_values)
        torch.onnx.export(evit, (pixel_values,), str(path), input_names=["pixel_values"], dynamo=True)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: pixel_values.numpy()})
    np.testing.assert_allclose(outputs[0], expected.logits.numpy(), atol=1e-4, rtol=1e-4)
    kept = [output for output in outputs if output.dtype == np.int64]
    assert len(kept) == len(expected.kept_token_indices)
    for exported, reference in zip(kept, expected.kept_token_indices, strict=True):
        np.testing.assert_array_equal(exported, reference.numpy())
