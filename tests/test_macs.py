import pytest
from transformers import DeiTConfig, ViTConfig

from evit_hf import EViTConfig, EViTDeiTConfig, count_macs

from .model_builders import DEIT_SMALL


DEIT_S = {**DEIT_SMALL, "num_labels": 1000}


@pytest.mark.parametrize(
    "keep_rate, giga_macs",
    [(1.0, 4.60), (0.9, 4.02), (0.8, 3.48), (0.7, 3.03), (0.6, 2.64), (0.5, 2.31)],
    ids=lambda value: str(value),
)
def test_deit_small_macs_are_the_specs(keep_rate, giga_macs):
    assert round(count_macs(EViTConfig(**DEIT_S), keep_rate=keep_rate) / 1e9, 2) == giga_macs


def test_macs_bounds_of_the_speed_up():
    config = EViTConfig(**DEIT_S)
    full = count_macs(config, keep_rate=1.0)
    assert round(full / count_macs(config, keep_rate=0.7), 3) == 1.518
    assert round(full / count_macs(config, keep_rate=0.5), 3) == 1.992


def test_stock_model_by_hand():
    # 12 layers of 197 tokens: projections 4 N d^2, attention 2 N^2 d, MLP 2 N d m; patch embedding; head
    n, d, m = 197, 384, 1536
    expected = 12 * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m) + 196 * 3 * 16 * 16 * d + d * 1000
    assert count_macs(ViTConfig(**DEIT_S)) == expected
    assert count_macs(EViTConfig(**DEIT_S), keep_rate=1.0) == expected


def test_fusion_costs_a_little_and_keeps_a_token():
    fused = count_macs(EViTConfig(**DEIT_S), keep_rate=0.7)
    dropped = count_macs(EViTConfig(**DEIT_S, fuse_inattentive_tokens=False), keep_rate=0.7)
    assert dropped < fused < count_macs(EViTConfig(**DEIT_S), keep_rate=0.8)


@pytest.mark.parametrize("image_size", [224, 288, 384])
def test_any_resolution(image_size):
    config = EViTConfig(**DEIT_S)
    patches = (image_size // 16) ** 2
    stock = count_macs(config, image_size=image_size, keep_rate=1.0)
    n, d, m = patches + 1, 384, 1536
    assert stock == 12 * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m) + patches * 3 * 256 * d + d * 1000
    assert count_macs(config, image_size=image_size) < stock  # the config's keep rate, 0.7


def test_distilled_deit_counts_two_prefix_tokens_and_two_heads():
    config = EViTDeiTConfig(**DEIT_S, architectures=["EViTDeiTForImageClassificationWithTeacher"])
    vit = EViTConfig(**DEIT_S)
    assert count_macs(config, keep_rate=1.0) > count_macs(vit, keep_rate=1.0)
    assert count_macs(DeiTConfig(**DEIT_S)) == count_macs(EViTDeiTConfig(**DEIT_S), keep_rate=1.0)
