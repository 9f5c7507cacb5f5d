import json

import pytest

import evit_hf
from evit_hf import EViTConfig, EViTDeiTConfig, default_reduction_layers

from .model_builders import TESTERS, TINY


# The EViT configuration class of every tester's model, once each (CLIP's whole-model configuration keeps the
# settings in its vision configuration and reads them through).
EVIT_CONFIG_CLASSES = list(dict.fromkeys(tester.evit_config_class for tester in TESTERS.values()))
CONFIG_CLASSES = pytest.mark.parametrize(
    "config_class", EVIT_CONFIG_CLASSES, ids=[config_class.__name__ for config_class in EVIT_CONFIG_CLASSES]
)


@CONFIG_CLASSES
def test_defaults_are_the_papers(config_class):
    config = config_class()
    assert (config.keep_rate, config.reduction_layers, config.fuse_inattentive_tokens) == (0.7, [3, 6, 9], True)


def test_model_types_and_bases():
    from transformers import DeiTConfig, ViTConfig

    assert EViTConfig.model_type == "evit" and issubclass(EViTConfig, ViTConfig)
    assert EViTDeiTConfig.model_type == "evit_deit" and issubclass(EViTDeiTConfig, DeiTConfig)


@pytest.mark.parametrize(
    "num_hidden_layers, expected",
    [(12, [3, 6, 9]), (24, [6, 12, 18]), (4, [1, 2, 3]), (6, [2, 3, 4]), (2, [0, 1]), (1, [0])],
    ids=lambda value: str(value),
)
def test_default_reduction_layers_for_other_depths(num_hidden_layers, expected):
    assert default_reduction_layers(num_hidden_layers) == expected
    assert EViTConfig(num_hidden_layers=num_hidden_layers).reduction_layers == expected


@CONFIG_CLASSES
@pytest.mark.parametrize(
    "settings, message",
    [
        ({"keep_rate": 0.0}, r"keep_rate must be in \(0, 1\]"),
        ({"keep_rate": 1.01}, r"keep_rate must be in \(0, 1\]"),
        ({"keep_rate": -0.5}, r"keep_rate must be in \(0, 1\]"),
        ({"keep_rate": float("nan")}, r"keep_rate must be a number in \(0, 1\]"),
        ({"reduction_layers": [12]}, r"0-based layer indices in \[0, 11\]"),
        ({"reduction_layers": [-1]}, r"0-based layer indices in \[0, 11\]"),
        ({"reduction_layers": [3, 3]}, "must not repeat a layer"),
    ],
    ids=["keep-0", "keep-above-1", "keep-negative", "keep-nan", "layer-too-deep", "layer-negative", "layer-repeated"],
)
def test_invalid_settings_raise_value_errors(config_class, settings, message):
    with pytest.raises(ValueError, match=message):
        config_class(**settings)


def test_reduction_layers_are_sorted_and_keep_rate_one_is_allowed():
    config = EViTConfig(keep_rate=1, reduction_layers=(9, 2))
    assert config.reduction_layers == [2, 9]
    assert config.keep_rate == 1.0 and isinstance(config.keep_rate, float)


@CONFIG_CLASSES
def test_round_trip_through_json(config_class, tmp_path):
    config = config_class(**TINY, keep_rate=0.55, reduction_layers=[0, 3], fuse_inattentive_tokens=False)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved = saved.get("vision_config", saved)  # CLIP and MetaCLIP 2 save the settings with the vision tower
    assert (saved["keep_rate"], saved["reduction_layers"], saved["fuse_inattentive_tokens"]) == (0.55, [0, 3], False)
    loaded = config_class.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()


def test_plain_config_reads_as_evit_with_kwargs(tmp_path):
    from transformers import ViTConfig

    ViTConfig(**TINY).save_pretrained(tmp_path)
    config = EViTConfig.from_pretrained(tmp_path, keep_rate=0.5)
    assert config.model_type == "evit"
    assert (config.keep_rate, config.reduction_layers) == (0.5, [1, 2, 3])
    assert config.hidden_size == TINY["hidden_size"]


def test_public_api_is_sorted_and_importable():
    assert evit_hf.__all__ == sorted(evit_hf.__all__)
    assert all(hasattr(evit_hf, name) for name in evit_hf.__all__)
