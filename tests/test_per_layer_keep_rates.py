import copy
import math

import pytest
import torch

import evit_hf
from evit_hf.families import family_for_model_type
from evit_hf.keep_rate_schedule import KeepRateScheduler

from .model_builders import DEIT_SMALL, FAMILY_TESTERS, TINY, tiny_stock_model


# One builder per family: the first, a model without a text tower.
BUILDERS = {family: builders[0] for family, builders in FAMILY_TESTERS.items()}
LAYERS = [1, 2, 3]


def _settings_config(model):
    return getattr(model.config, "vision_config", None) or model.config


def _run(model, pixel_values, **kwargs):
    with torch.no_grad():
        return model(pixel_values=pixel_values, **kwargs)


def _hidden(output):
    return output.last_hidden_state


@pytest.fixture(params=sorted(BUILDERS), ids=sorted(BUILDERS))
def family_model(request):
    stock = tiny_stock_model(BUILDERS[request.param])
    return request.param, stock


def test_each_layer_keeps_its_own_share(family_model, pixel_values):
    family, stock = family_model
    model = evit_hf.apply_evit(copy.deepcopy(stock), keep_rate=[0.9, 0.5, 0.3], reduction_layers=LAYERS)
    output = _run(model, pixel_values)
    config = _settings_config(model)
    assert config.keep_rate == [0.9, 0.5, 0.3]
    prefix = family_for_model_type(config.model_type).num_prefix_tokens(config)
    candidates = TINY["image_size"] ** 2 // TINY["patch_size"] ** 2
    expected = []
    for rate in (0.9, 0.5, 0.3):
        kept = math.ceil(rate * candidates)
        expected.append(kept)
        candidates = kept + 1  # the fused token is a candidate of the next reduction layer
    assert [indices.shape[1] for indices in output.kept_token_indices] == expected, family
    assert output.last_hidden_state.shape[1] == prefix + expected[-1] + 1


def test_a_list_of_one_rate_is_that_rate(family_model, pixel_values):
    _, stock = family_model
    uniform = evit_hf.apply_evit(copy.deepcopy(stock), keep_rate=0.5, reduction_layers=LAYERS)
    listed = evit_hf.apply_evit(copy.deepcopy(stock), keep_rate=[0.5, 0.5, 0.5], reduction_layers=LAYERS)
    assert torch.equal(_hidden(_run(uniform, pixel_values)), _hidden(_run(listed, pixel_values)))


def test_rate_one_in_a_list_is_a_layer_that_reduces_nothing(family_model, pixel_values):
    _, stock = family_model
    listed = evit_hf.apply_evit(copy.deepcopy(stock), keep_rate=[1.0, 0.5, 1.0], reduction_layers=LAYERS)
    single = evit_hf.apply_evit(copy.deepcopy(stock), keep_rate=0.5, reduction_layers=[2])
    assert torch.equal(_hidden(_run(listed, pixel_values)), _hidden(_run(single, pixel_values)))
    # The forward argument takes a list too, and overrides the configuration's for the call.
    assert torch.equal(
        _hidden(_run(listed, pixel_values, keep_rate=[1.0, 1.0, 1.0])), _hidden(_run(stock, pixel_values))
    )


def test_per_layer_rates_survive_saving(tmp_path, pixel_values):
    stock = tiny_stock_model("vit-classifier")
    model = evit_hf.apply_evit(stock, keep_rate=[0.8, 0.6, 0.4], reduction_layers=LAYERS)
    model.save_pretrained(tmp_path)
    reloaded = evit_hf.EViTForImageClassification.from_pretrained(tmp_path).eval()
    assert reloaded.config.keep_rate == [0.8, 0.6, 0.4]
    assert torch.equal(_run(reloaded, pixel_values).logits, _run(model, pixel_values).logits)
    overridden = evit_hf.EViTForImageClassification.from_pretrained(
        tmp_path, reduction_layers=[2, 3], keep_rate=[0.5, 0.5]
    )
    assert (overridden.config.reduction_layers, overridden.config.keep_rate) == ([2, 3], [0.5, 0.5])


LENGTH_MESSAGE = r"keep_rate lists one rate per reduction layer.*it has 2 \(\[0\.5, 0\.5\]\) for 3 reduction layers"


def test_a_list_of_the_wrong_length_is_refused_on_every_path(tmp_path, pixel_values):
    stock = tiny_stock_model("vit-classifier")
    with pytest.raises(ValueError, match=LENGTH_MESSAGE):
        evit_hf.EViTConfig(**TINY, keep_rate=[0.5, 0.5], reduction_layers=LAYERS)
    with pytest.raises(ValueError, match=LENGTH_MESSAGE):
        evit_hf.apply_evit(copy.deepcopy(stock), keep_rate=[0.5, 0.5], reduction_layers=LAYERS)
    model = evit_hf.apply_evit(copy.deepcopy(stock), keep_rate=0.5, reduction_layers=LAYERS)
    with pytest.raises(ValueError, match=LENGTH_MESSAGE):
        model.config.keep_rate = [0.5, 0.5]
    with pytest.raises(ValueError, match=LENGTH_MESSAGE):
        _run(model, pixel_values, keep_rate=[0.5, 0.5])
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=LENGTH_MESSAGE):
        evit_hf.EViTForImageClassification.from_pretrained(tmp_path, keep_rate=[0.5, 0.5])
    with pytest.raises(ValueError, match=LENGTH_MESSAGE):
        evit_hf.count_macs(model.config, keep_rate=[0.5, 0.5])
    model.config.keep_rate = [0.5, 0.6, 0.7]
    with pytest.raises(ValueError, match=r"has 3 \(\[0\.5, 0\.6, 0\.7\]\) for 2 reduction layers"):
        model.config.reduction_layers = [1, 2]
    assert model.config.reduction_layers == LAYERS  # a refused value changes nothing
    with pytest.raises(ValueError, match="got an empty list"):
        model.config.keep_rate = []
    with pytest.raises(ValueError, match=r"keep_rate must be in \(0, 1\]"):
        model.config.keep_rate = [0.5, 1.5, 0.5]


def test_macs_follow_each_layers_rate():
    config = evit_hf.EViTDeiTConfig(**DEIT_SMALL, keep_rate=0.7)
    assert evit_hf.count_macs(config) == evit_hf.count_macs(config, keep_rate=[0.7, 0.7, 0.7])
    single = evit_hf.EViTDeiTConfig(**DEIT_SMALL, keep_rate=0.5, reduction_layers=[9])
    assert evit_hf.count_macs(config, keep_rate=[1.0, 1.0, 0.5]) == evit_hf.count_macs(single)
    # An earlier layer's rate saves more than a later one's.
    early, late = ([0.5, 1.0, 1.0], [1.0, 1.0, 0.5])
    assert evit_hf.count_macs(config, keep_rate=early) < evit_hf.count_macs(config, keep_rate=late)


def test_the_warm_up_takes_each_layer_to_its_own_target():
    scheduler = KeepRateScheduler([0.9, 0.7, 0.5], warmup=2, shrink=4, unit="step")
    assert scheduler.keep_rate_at(0) == [1.0, 1.0, 1.0]
    halfway = scheduler.keep_rate_at(4)
    assert halfway == pytest.approx([0.95, 0.85, 0.75])
    assert scheduler.keep_rate_at(6) == [0.9, 0.7, 0.5]
    model = evit_hf.apply_evit(tiny_stock_model("vit-classifier"), keep_rate=0.5, reduction_layers=LAYERS)
    model.config.keep_rate = halfway  # what the callback assigns before a step
    assert model.config.keep_rate == pytest.approx([0.95, 0.85, 0.75])
