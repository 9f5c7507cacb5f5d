import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from transformers import ViTConfig, ViTForMaskedImageModeling, ViTModel

import evit_hf

from .model_builders import (
    FAMILY_TESTERS,
    IMAGE_MODEL_FAMILIES,
    TINY,
    builder_classes,
    cached_stock_model,
    stock_and_evit,
)


def test_apply_evit_defaults_and_settings_update(pixel_values):
    stock, _ = stock_and_evit("vit-classifier")
    evit_hf.apply_evit(stock)
    assert (stock.config.keep_rate, stock.config.reduction_layers, stock.config.fuse_inattentive_tokens) == (
        0.7,
        evit_hf.default_reduction_layers(TINY["num_hidden_layers"]),
        True,
    )
    evit_hf.apply_evit(stock, keep_rate=0.4)  # an EViT model: only the given setting changes
    assert (stock.config.keep_rate, stock.config.reduction_layers) == (0.4, [1, 2, 3])
    with torch.no_grad():
        assert stock(pixel_values).kept_token_indices[0].shape[1] == 26


def test_apply_evit_leaves_models_sharing_the_config_alone(pixel_values):
    torch.manual_seed(0)
    config = ViTConfig(**{k: v for k, v in TINY.items() if k != "num_labels"}, attn_implementation="eager")
    first, second = ViTModel(config).eval(), ViTModel(config).eval()
    evit_hf.apply_evit(first)
    assert second.config is config and type(config) is ViTConfig
    assert first.config is not config
    assert first.config._attn_implementation == "eager"  # the backend carries over
    assert all(layer.attention.config is first.config for layer in first.layers)
    with torch.no_grad():
        assert second(pixel_values).last_hidden_state.shape[1] == 65
        assert first(pixel_values).last_hidden_state.shape[1] < 65


def test_apply_evit_after_outputs_were_recorded(pixel_values):
    stock, _ = stock_and_evit("deit-classifier", attn_implementation="eager")
    with torch.no_grad():
        before = stock(pixel_values, output_hidden_states=True, output_attentions=True)  # installs the hooks
        evit_hf.apply_evit(stock, keep_rate=0.5)
        after = stock(pixel_values, output_hidden_states=True, output_attentions=True)
    assert [h.shape[1] for h in before.hidden_states] == [66] * 5
    assert [h.shape[1] for h in after.hidden_states] == [66, 66, 35, 20, 12]
    assert [a.shape[-1] for a in after.attentions] == [66, 66, 35, 20]


def test_apply_evit_then_save_and_reload(tmp_path, pixel_values):
    stock, _ = stock_and_evit("vit-classifier")
    evit_hf.apply_evit(stock, keep_rate=0.6)
    stock.save_pretrained(tmp_path)
    reloaded = evit_hf.EViTForImageClassification.from_pretrained(tmp_path).eval()
    assert reloaded.config.keep_rate == 0.6
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values).logits, stock(pixel_values).logits)


@pytest.mark.parametrize(
    "model",
    [
        ViTForMaskedImageModeling(ViTConfig(**{k: v for k, v in TINY.items() if k != "num_labels"})),
        nn.Linear(2, 2),
    ],
    ids=["vit-masked-image-modeling", "linear"],
)
def test_apply_evit_rejects_other_models(model):
    with pytest.raises(TypeError, match="apply_evit supports .*DeiTForImageClassificationWithTeacher.*ViTModel"):
        evit_hf.apply_evit(model)


def test_apply_evit_validates_settings():
    stock, _ = stock_and_evit("vit-classifier")
    with pytest.raises(ValueError, match="reduction_layers"):
        evit_hf.apply_evit(stock, reduction_layers=[7])
    assert type(stock).__name__ == "ViTForImageClassification"  # nothing changed on error


# A fresh process: no EViT model has been built in it, so nothing but `apply_evit` tells transformers what a converted
# model records for output_hidden_states / output_attentions (the registry is per process, filled by class name).
FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher, ViTConfig, ViTForImageClassification
    from transformers import ViTModel
    import evit_hf
    from tests.model_builders import TINY

    pixel_values = torch.load(sys.argv[1])
    results = {}
    for name, model_class, config_class in (
        ("vit-classifier", ViTForImageClassification, ViTConfig),
        ("vit-base", ViTModel, ViTConfig),
        ("deit-teacher", DeiTForImageClassificationWithTeacher, DeiTConfig),
    ):
        torch.manual_seed(0)
        model = model_class(config_class(**TINY, attn_implementation="eager")).eval()
        evit_hf.apply_evit(model, keep_rate=0.5)
        with torch.no_grad():
            output = model(pixel_values, output_hidden_states=True, output_attentions=True)
        results[name] = {"hidden_states": output.hidden_states, "attentions": output.attentions}
    torch.save(results, sys.argv[2])
    """
)


@pytest.mark.slow  # a real run in a subprocess, or a fresh interpreter: seconds on 2 cores
def test_converted_models_record_outputs_in_a_fresh_process(tmp_path, pixel_values):
    torch.save(pixel_values, tmp_path / "pixels.pt")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_SCRIPT, str(tmp_path / "pixels.pt"), str(tmp_path / "out.pt")],
        cwd=root,
        env=env,
        check=True,
    )
    results = torch.load(tmp_path / "out.pt")
    # prefix + 64 patches; reduction layers 1, 2, 3 at keep 0.5 keep 32, 17, 9 candidates (+1 fused)
    for family, prefix in (("vit-classifier", 1), ("vit-base", 1), ("deit-teacher", 2)):
        recorded = results[family]
        assert recorded["hidden_states"] is not None and recorded["attentions"] is not None, family
        assert [h.shape[1] for h in recorded["hidden_states"]] == [prefix + n for n in (64, 64, 33, 18, 10)]
        assert [a.shape[-1] for a in recorded["attentions"]] == [prefix + n for n in (64, 64, 33, 18)]
        _, evit = stock_and_evit(family, attn_implementation="eager", keep_rate=0.5)  # the same weights, built here
        with torch.no_grad():
            expected = evit(pixel_values, output_hidden_states=True, output_attentions=True)
        for name in ("hidden_states", "attentions"):
            for got, want in zip(recorded[name], getattr(expected, name), strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=0)


# The model files each family's saved folder ships: its own, those of the family it builds on, and the base.
BASE_FILES = {"configuration_evit_base.py", "modeling_evit_base.py", "token_reorganization.py"}
FAMILY_FILES = {
    "vit": {"configuration_evit.py", "modeling_evit.py"},
    "deit": {"configuration_evit_deit.py", "modeling_evit_deit.py", "configuration_evit.py", "modeling_evit.py"},
    "clip": {"configuration_evit_clip.py", "modeling_evit_clip.py"},
    "metaclip_2": {
        "configuration_evit_metaclip_2.py",
        "modeling_evit_metaclip_2.py",
        "configuration_evit_clip.py",
        "modeling_evit_clip.py",
    },
    "dinov2": {"configuration_evit_dinov2.py", "modeling_evit_dinov2.py"},
    "dinov2_with_registers": {"configuration_evit_dinov2.py", "modeling_evit_dinov2.py"},
    "dinov3_vit": {"configuration_evit_dinov3_vit.py", "modeling_evit_dinov3_vit.py"},
}


@pytest.mark.parametrize("family", IMAGE_MODEL_FAMILIES, ids=lambda family: family.name)
def test_saved_folders_ship_only_their_familys_code(family, tmp_path):
    for builder in FAMILY_TESTERS[family.name]:
        model = evit_hf.apply_evit(cached_stock_model(builder), keep_rate=0.5)
        model.save_pretrained(tmp_path / builder)
        shipped = {name for name in os.listdir(tmp_path / builder) if name.endswith(".py")}
        assert shipped == FAMILY_FILES[family.name] | BASE_FILES, builder


@pytest.mark.parametrize("family", IMAGE_MODEL_FAMILIES, ids=lambda family: family.name)
def test_constructors_take_the_path_of_apply_evit(family):
    # A model built as EViT and a stock model converted by apply_evit: the same class for every module and the same
    # keys. The constructor builds the stock modules, then runs apply_evit's conversion.
    for builder in FAMILY_TESTERS[family.name]:
        _, evit_class = builder_classes(builder)
        converted = evit_hf.apply_evit(cached_stock_model(builder), keep_rate=0.5)
        built = evit_class(converted.config)
        assert [(name, type(module)) for name, module in built.named_modules()] == [
            (name, type(module)) for name, module in converted.named_modules()
        ], builder
        assert built.state_dict().keys() == converted.state_dict().keys()


@pytest.mark.parametrize("family", IMAGE_MODEL_FAMILIES, ids=lambda family: family.name)
def test_layers_and_attention_are_where_the_table_says(family):
    for builder in FAMILY_TESTERS[family.name]:
        model = evit_hf.apply_evit(cached_stock_model(builder), keep_rate=0.5)
        loops = [module for module in model.modules() if type(module) in family.layers_and_attention]
        assert loops, builder  # every model has a module that runs the layer loop
        for module in loops:
            layers_path, attention_name = family.layers_and_attention[type(module)]
            layers = module.get_submodule(layers_path)
            assert len(layers) == module.config.num_hidden_layers
            assert all(type(layer) is module.layer_class for layer in layers)
            assert all(type(getattr(layer, attention_name)) is module.layer_class.attention_class for layer in layers)


@pytest.mark.slow  # torch.compile: seconds on 2 cores
def test_compiled_models_are_refused_with_the_reason():
    model = torch.compile(cached_stock_model("vit-classifier"))
    with pytest.raises(
        TypeError, match=r"compiled wrapper .*OptimizedModule.*apply_evit\(model\)`, then `torch\.compile"
    ):
        evit_hf.apply_evit(model)
