"""Per-layer keep rates go with the reduction layers as the user wrote them: `reduction_layers=[3, 1, 2],
keep_rate=[0.9, 0.7, 0.5]` means layer 3 keeps 0.9, wherever the two are given together (the constructor,
`from_pretrained`, `apply_evit`, `update`, `set_schedule`, the two-tower configurations). Layers out of ascending order
set apart from per-layer rates are refused: which rate goes with which layer would be a guess. The command line checks
keep rates with the configurations' own check."""

import pytest

import evit_hf
from evit_hf.cli import main
from evit_hf.configuration_evit_base import check_keep_rate, keep_rates_by_layer, vision_config_of
from evit_hf.messages import one_line

from .model_builders import TINY, tiny_stock_model


WRITTEN = {"reduction_layers": [3, 1, 2], "keep_rate": [0.9, 0.7, 0.5]}
# What the user meant, and how it is stored: the layers in ascending order, each with its own rate.
MEANT = {3: 0.9, 1: 0.7, 2: 0.5}
STORED = ([1, 2, 3], [0.7, 0.5, 0.9])


def _rates_of(config) -> dict[int, float]:
    settings = vision_config_of(config)
    return keep_rates_by_layer(settings.keep_rate, settings.reduction_layers)


def _saved(config_class, tmp_path, **settings):
    config_class(**settings).save_pretrained(tmp_path)
    return tmp_path


def _tiny_clip_config(**settings):
    from .model_builders import TINY_CLIP_TEXT

    return evit_hf.EViTCLIPConfig(text_config=TINY_CLIP_TEXT, vision_config={**TINY}, **settings)


# Every way of giving both at once, for a configuration that holds the settings (ViT) and a two-tower one (CLIP).
GIVEN_TOGETHER = {
    "constructor": lambda tmp_path: evit_hf.EViTConfig(**TINY, **WRITTEN),
    "from_pretrained-kwargs": lambda tmp_path: evit_hf.EViTConfig.from_pretrained(
        _saved(evit_hf.EViTConfig, tmp_path, **TINY), **WRITTEN
    ),
    "from_pretrained-config.json": lambda tmp_path: evit_hf.EViTConfig.from_pretrained(
        _saved(evit_hf.EViTConfig, tmp_path, **TINY, **WRITTEN)
    ),
    "apply_evit": lambda tmp_path: evit_hf.apply_evit(tiny_stock_model("vit-classifier"), **WRITTEN).config,
    "apply_evit-on-evit": lambda tmp_path: (
        evit_hf.apply_evit(
            evit_hf.apply_evit(tiny_stock_model("vit-classifier"), keep_rate=[0.6, 0.6, 0.6]), **WRITTEN
        ).config
    ),
    "update": lambda tmp_path: _updated(evit_hf.EViTConfig(**TINY), WRITTEN),
    "update-over-rates": lambda tmp_path: _updated(evit_hf.EViTConfig(**TINY, keep_rate=[0.4, 0.4, 0.4]), WRITTEN),
    "set_schedule": lambda tmp_path: _scheduled(evit_hf.EViTConfig(**TINY, keep_rate=[0.4, 0.4, 0.4])),
    # Over rates of another number of layers: no state in between pairs the old list with the new layers.
    "set_schedule-over-two-layers": lambda tmp_path: _scheduled(
        evit_hf.EViTConfig(**TINY, reduction_layers=[1, 2], keep_rate=[0.4, 0.4])
    ),
    "update-over-two-layers": lambda tmp_path: _updated(
        evit_hf.EViTConfig(**TINY, reduction_layers=[1, 2], keep_rate=[0.4, 0.4]), WRITTEN
    ),
    "clip-constructor": lambda tmp_path: _tiny_clip_config(**WRITTEN),
    "clip-from_pretrained-kwargs": lambda tmp_path: evit_hf.EViTCLIPConfig.from_pretrained(
        _saved_clip(tmp_path), **WRITTEN
    ),
    "clip-apply_evit": lambda tmp_path: evit_hf.apply_evit(tiny_stock_model("clip"), **WRITTEN).config,
    "clip-update": lambda tmp_path: _updated(_tiny_clip_config(), WRITTEN),
}


def _updated(config, settings):
    config.update(dict(settings))
    return config


def _scheduled(config):
    config.set_schedule(**WRITTEN)
    return config


def _saved_clip(tmp_path):
    _tiny_clip_config().save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("give", GIVEN_TOGETHER.values(), ids=GIVEN_TOGETHER.keys())
def test_each_rate_goes_with_its_layer_as_written(give, tmp_path):
    config = give(tmp_path)
    assert _rates_of(config) == MEANT
    settings = vision_config_of(config)
    assert (settings.reduction_layers, settings.keep_rate) == STORED


def test_the_stored_pairs_survive_saving_and_the_model_runs_them(tmp_path):
    model = evit_hf.apply_evit(tiny_stock_model("vit-classifier"), **WRITTEN)
    model.save_pretrained(tmp_path)
    reloaded = evit_hf.EViTForImageClassification.from_pretrained(tmp_path)
    assert _rates_of(reloaded.config) == MEANT
    # The MACs follow the pairs: layer 1 keeping 0.7 costs what the stored schedule costs, not layer 1 keeping 0.9.
    misread = evit_hf.EViTConfig(**TINY, reduction_layers=[1, 2, 3], keep_rate=[0.9, 0.7, 0.5])
    assert evit_hf.count_macs(reloaded.config) != evit_hf.count_macs(misread)
    meant = evit_hf.EViTConfig(**TINY, reduction_layers=[1, 2, 3], keep_rate=[0.7, 0.5, 0.9])
    assert evit_hf.count_macs(reloaded.config) == evit_hf.count_macs(meant)


def _assign_layers(config):
    config.reduction_layers = [3, 1, 2]


SET_APART = {
    "assignment": lambda tmp_path: _assign_layers(evit_hf.EViTConfig(**TINY, keep_rate=[0.9, 0.7, 0.5])),
    "clip-assignment": lambda tmp_path: _assign_layers(_tiny_clip_config(keep_rate=[0.9, 0.7, 0.5])),
    "update-layers-only": lambda tmp_path: evit_hf.EViTConfig(**TINY, keep_rate=[0.9, 0.7, 0.5]).update(
        {"reduction_layers": [3, 1, 2]}
    ),
    "from_pretrained-layers-over-stored-rates": lambda tmp_path: evit_hf.EViTConfig.from_pretrained(
        _saved(evit_hf.EViTConfig, tmp_path, **TINY, keep_rate=[0.9, 0.7, 0.5]), reduction_layers=[3, 1, 2]
    ),
    "clip-from_pretrained-layers-over-stored-rates": lambda tmp_path: evit_hf.EViTCLIPConfig.from_pretrained(
        _saved_clip_with_rates(tmp_path), reduction_layers=[3, 1, 2]
    ),
    "apply_evit-layers-over-the-models-rates": lambda tmp_path: evit_hf.apply_evit(
        evit_hf.apply_evit(tiny_stock_model("vit-classifier"), keep_rate=[0.9, 0.7, 0.5]), reduction_layers=[3, 1, 2]
    ),
}


def _saved_clip_with_rates(tmp_path):
    _tiny_clip_config(keep_rate=[0.9, 0.7, 0.5]).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("set_apart", SET_APART.values(), ids=SET_APART.keys())
def test_layers_out_of_order_set_apart_from_per_layer_rates_are_refused_with_the_fix(set_apart, tmp_path):
    with pytest.raises(ValueError) as error:
        set_apart(tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert "reduction_layers [3, 1, 2] is not in ascending order" in message
    assert "which rate belongs to which layer is unclear" in message
    assert "Give the layers and the rates together" in message and "ascending order ([1, 2, 3])" in message


def test_a_refused_assignment_changes_nothing():
    config = evit_hf.EViTConfig(**TINY, keep_rate=[0.9, 0.7, 0.5])
    with pytest.raises(ValueError):
        config.reduction_layers = [3, 1, 2]
    assert (config.reduction_layers, config.keep_rate) == ([1, 2, 3], [0.9, 0.7, 0.5])
    with pytest.raises(ValueError, match="one rate per reduction layer"):
        config.set_schedule(reduction_layers=[3, 1], keep_rate=[0.9, 0.7, 0.5])
    assert (config.reduction_layers, config.keep_rate) == ([1, 2, 3], [0.9, 0.7, 0.5])


def test_rates_set_alone_follow_the_stored_layers_in_ascending_order():
    # The documented reading of a list set on its own: the configuration shows its layers sorted, the rates follow.
    config = evit_hf.EViTConfig(**TINY, reduction_layers=[3, 1, 2])
    assert config.reduction_layers == [1, 2, 3]
    config.keep_rate = [0.9, 0.7, 0.5]
    assert _rates_of(config) == {1: 0.9, 2: 0.7, 3: 0.5}
    # Sorted layers set apart from rates of the same length pair in order, as before.
    config.reduction_layers = [0, 1, 2]
    assert _rates_of(config) == {0: 0.9, 1: 0.7, 2: 0.5}


# The command line's keep-rate flags answer with the configurations' own check: one check, one message.
KEEP_RATE_FLAGS = {
    "visualize": (["visualize", "--model", "m", "--image", "i.png", "--keep-rate"], "0", 0.0),
    "visualize-nan": (["visualize", "--model", "m", "--image", "i.png", "--keep-rate"], "nan", float("nan")),
    "convert": (["convert", "c.pth", "out", "--keep-rate"], "1.5", 1.5),
    "benchmark": (["benchmark", "--keep-rates"], "-0.25", -0.25),
    "benchmark-per-layer": (["benchmark", "--keep-rates"], "0.9/0/0.5", [0.9, 0.0, 0.5]),
}


@pytest.mark.parametrize("argv, value, checked", KEEP_RATE_FLAGS.values(), ids=KEEP_RATE_FLAGS.keys())
def test_the_command_line_refuses_keep_rates_with_the_configurations_check(argv, value, checked, capsys):
    with pytest.raises(ValueError) as expected:
        check_keep_rate(checked)
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, value])
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.endswith(one_line(expected.value).rstrip(".")), line
