import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    Dinov2Config,
    Dinov2Model,
    ViTConfig,
    ViTForImageClassification,
)

import evit_hf
from evit_hf.planning import keep_rate_for_macs
from evit_hf.resolution import resize_position_embeddings

from .model_builders import DEIT_SMALL as DEIT_SMALL_SHAPE
from .model_builders import TINY


TINY_SHAPE = {key: value for key, value in TINY.items() if key not in ("num_labels", "initializer_range")}
DEIT_SMALL = {**DEIT_SMALL_SHAPE, "num_labels": 1000, "architectures": ["DeiTForImageClassification"]}


def test_keep_rate_for_the_macs_of_keep_0_7_is_0_7():
    config = DeiTConfig(**DEIT_SMALL)
    assert keep_rate_for_macs(config, evit_hf.count_macs(config, keep_rate=0.7)) == 0.7


@pytest.mark.parametrize("image_size", [224, 256, 288, 320])
def test_keep_rate_for_macs_is_the_largest_that_fits(image_size):
    config = DeiTConfig(**DEIT_SMALL)
    target = evit_hf.count_macs(config, image_size=224)  # the stock model at its own size: the paper's setting
    keep_rate = keep_rate_for_macs(config, target, image_size=image_size)
    assert evit_hf.count_macs(config, image_size=image_size, keep_rate=keep_rate) <= target
    if keep_rate < 1.0:
        assert evit_hf.count_macs(config, image_size=image_size, keep_rate=round(keep_rate + 0.01, 2)) > target
    assert (keep_rate == 1.0) == (image_size == 224)


def test_keep_rate_for_macs_follows_the_configured_reduction_layers():
    late = evit_hf.EViTDeiTConfig(**DEIT_SMALL, reduction_layers=[4, 7, 10])
    early = evit_hf.EViTDeiTConfig(**DEIT_SMALL, reduction_layers=[1, 2, 3])
    target = evit_hf.count_macs(DeiTConfig(**DEIT_SMALL), keep_rate=0.7)
    # Later reduction layers save less: they need a lower keep rate for the same budget.
    assert keep_rate_for_macs(late, target) < keep_rate_for_macs(early, target)


def test_a_budget_no_keep_rate_reaches_is_refused_with_its_cost():
    config = DeiTConfig(**DEIT_SMALL)
    cheapest = evit_hf.count_macs(config, keep_rate=0.01)
    with pytest.raises(ValueError, match=f"the smallest, 0.01, costs {cheapest:,}"):
        keep_rate_for_macs(config, cheapest - 1)
    assert keep_rate_for_macs(config, cheapest) == 0.01


@pytest.mark.parametrize("target", [0, -1.0, float("nan"), float("inf"), "3e9", True, None])
def test_bad_budgets_are_refused(target):
    with pytest.raises(ValueError, match="target_macs must be a positive number"):
        keep_rate_for_macs(DeiTConfig(**DEIT_SMALL), target)


RESIZABLE = {
    "vit-classifier": lambda: ViTForImageClassification(ViTConfig(**TINY_SHAPE, num_labels=5)),
    "deit-teacher": lambda: DeiTForImageClassificationWithTeacher(DeiTConfig(**TINY_SHAPE, num_labels=5)),
    "clip-vision-projection": lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_SHAPE, projection_dim=8)),
    "evit-vit-0.5": lambda: evit_hf.EViTForImageClassification(evit_hf.EViTConfig(**TINY_SHAPE, keep_rate=0.5)),
    "evit-deit-teacher-0.7": lambda: evit_hf.EViTDeiTForImageClassificationWithTeacher(
        evit_hf.EViTDeiTConfig(**TINY_SHAPE, keep_rate=0.7)
    ),
}


@pytest.mark.parametrize("name", sorted(RESIZABLE))
def test_resized_positions_equal_the_stock_interpolation_and_survive_saving(name, tmp_path):
    torch.manual_seed(0)
    model = RESIZABLE[name]().eval()
    pixel_values = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(pixel_values, interpolate_pos_encoding=True)[0]
        with pytest.raises(ValueError, match="doesn't match model"):
            model(pixel_values)
        assert resize_position_embeddings(model, 48) is model
        assert torch.equal(model(pixel_values)[0], expected)
    config = getattr(model.config, "vision_config", None) or model.config
    assert config.image_size == 48
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert reloaded.config.image_size == 48
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values)[0], expected)


def test_dinov2_changes_only_its_configuration():
    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(**TINY_SHAPE)).eval()
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    pixel_values = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        expected = model(pixel_values).last_hidden_state
        resize_position_embeddings(model, 48)
        assert torch.equal(model(pixel_values).last_hidden_state, expected)
    assert model.config.image_size == 48
    assert all(torch.equal(tensor, weights[name]) for name, tensor in model.state_dict().items())


@pytest.mark.parametrize("image_size", [0, 3, -48, 48.0, "48", True])
def test_bad_image_sizes_are_refused(image_size):
    model = ViTForImageClassification(ViTConfig(**TINY_SHAPE))
    with pytest.raises(ValueError, match=r"image_size is the new side .* >= the patch size \(4\)"):
        resize_position_embeddings(model, image_size)
    assert model.config.image_size == 32
