"""The modeling suite of every family: each test runs on every tester of tests/model_builders.py (one per model class
of `evit_hf.FAMILIES`: tiny configuration, literal spec reference), then targeted tests of ViT/DeiT behaviour.
Targeted tests of the other families are in test_encoders.py."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DeiTConfig, DeiTModel, ViTConfig, ViTModel

import evit_hf
from evit_hf.token_reorganization import num_kept_tokens

from .llava_builders import VISION_LANGUAGE_TESTERS
from .model_builders import (
    DEIT_SMALL,
    FAMILIES,
    FAMILY_TESTERS,
    IMAGE_MODEL_FAMILIES,
    TESTERS,
    TINY,
    VISION_LANGUAGE_FAMILIES,
    cached_stock_and_evit,
    cached_stock_model,
    encoder_main_output,
    evit_settings,
    main_output,
    model_inputs,
    stock_and_evit,
    text_inputs,
)
from .spec_reference import reference_forward


NUM_PATCHES = (TINY["image_size"] // TINY["patch_size"]) ** 2  # 64; reduction layers 1, 2, 3 of 4
REDUCTION_LAYERS = evit_hf.default_reduction_layers(TINY["num_hidden_layers"])
# The fields a model's output may have that a reduced forward changes (and keep rate 1 must not).
OUTPUT_FIELDS = ("logits", "logits_per_image", "text_embeds", "image_embeds", "last_hidden_state", "pooler_output")
TESTER_IDS = list(TESTERS)


def run(tester, model, pixel_values, **kwargs):
    return model(**model_inputs(tester, pixel_values), **kwargs)


def vision_output(output):
    """The vision tower's part of an output (both-tower models nest it)."""
    return getattr(output, "vision_model_output", None) or output


def test_every_family_has_a_tester():
    assert list(FAMILY_TESTERS) == [family.name for family in IMAGE_MODEL_FAMILIES]
    assert {family.name for family in VISION_LANGUAGE_FAMILIES} == set(VISION_LANGUAGE_TESTERS)
    for family in VISION_LANGUAGE_FAMILIES:
        assert set(VISION_LANGUAGE_TESTERS[family.name].items()) == set(family.models.items())
    for family in IMAGE_MODEL_FAMILIES:
        testers = [tester for tester in TESTERS.values() if tester.family == family.name]
        assert testers, f"family {family.name!r} has no tester in tests/model_builders.py"
        assert {(tester.stock_class, tester.evit_class) for tester in testers} == set(family.models.items())
        for stock_class, evit_class in family.models.items():
            assert issubclass(evit_class, stock_class) and evit_class.config_class in family.config_classes
            assert evit_class.config_class.model_type in family.model_types


@pytest.mark.parametrize("builder", TESTER_IDS)
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "dropped"])
@pytest.mark.parametrize("keep_rate", [0.7, 0.5, 0.25])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_forward_matches_the_spec(builder, keep_rate, fuse, attn_implementation, pixel_values):
    tester = TESTERS[builder]
    stock, evit = cached_stock_and_evit(
        builder, attn_implementation=attn_implementation, keep_rate=keep_rate, fuse_inattentive_tokens=fuse
    )
    with torch.no_grad():
        output = run(tester, evit, pixel_values)
        expected, expected_kept = tester.reference(
            stock, pixel_values, keep_rate, REDUCTION_LAYERS, fuse, tester.prefix, text_inputs(pixel_values.shape[0])
        )
    assert expected
    for name, tensor in expected.items():
        torch.testing.assert_close(getattr(output, name), tensor, atol=2e-5, rtol=1e-4, msg=name)
    assert len(output.kept_token_indices) == len(REDUCTION_LAYERS)
    for layer, kept in enumerate(output.kept_token_indices):
        assert kept.dtype == torch.long
        assert kept.tolist() == [per_image[layer] for per_image in expected_kept]


@pytest.mark.parametrize("builder", TESTER_IDS)
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_keep_rate_one_is_the_stock_model(builder, attn_implementation, pixel_values):
    tester = TESTERS[builder]
    stock, evit = cached_stock_and_evit(builder, attn_implementation=attn_implementation)
    _, without_layers = cached_stock_and_evit(
        builder, attn_implementation=attn_implementation, keep_rate=0.5, reduction_layers=[]
    )
    with torch.no_grad():
        expected = run(tester, stock, pixel_values)
        full = run(tester, evit, pixel_values, keep_rate=1.0)
        unreduced = run(tester, without_layers, pixel_values)
        reduced = run(tester, evit, pixel_values)  # keep 0.7
    compared = [name for name in OUTPUT_FIELDS if getattr(expected, name, None) is not None]
    assert compared
    for name in compared:
        assert torch.equal(getattr(full, name), getattr(expected, name)), name
        assert torch.equal(getattr(unreduced, name), getattr(expected, name)), name
    assert not torch.equal(encoder_main_output(reduced), encoder_main_output(expected))  # keep 0.7 changes something
    assert [k.tolist() for k in full.kept_token_indices] == [[list(range(NUM_PATCHES))] * 3] * 3


@pytest.mark.parametrize("builder", TESTER_IDS)
def test_keep_rate_per_call_uses_the_same_weights(builder, pixel_values):
    tester = TESTERS[builder]
    _, evit = cached_stock_and_evit(builder, attn_implementation="eager")
    with torch.no_grad():
        default = run(tester, evit, pixel_values, output_hidden_states=True, output_attentions=True)
        half = run(tester, evit, pixel_values, keep_rate=0.5, output_hidden_states=True)
        again = run(tester, evit, pixel_values)
    assert evit_settings(evit).keep_rate == 0.7
    # 64 patches; reduction layers 1, 2, 3 keep 45, 33, 24 (0.7) or 32, 17, 9 (0.5) candidates, plus the fused token
    assert [k.shape[1] for k in default.kept_token_indices] == [45, 33, 24]
    assert [k.shape[1] for k in half.kept_token_indices] == [32, 17, 9]
    prefix = tester.prefix
    assert [h.shape[1] for h in vision_output(default).hidden_states] == [prefix + n for n in (64, 64, 46, 34, 25)]
    assert [a.shape[-1] for a in vision_output(default).attentions] == [prefix + n for n in (64, 64, 46, 34)]
    assert all(a.shape[-2] == a.shape[-1] for a in vision_output(default).attentions)
    assert [h.shape[1] for h in vision_output(half).hidden_states] == [prefix + n for n in (64, 64, 33, 18, 10)]
    torch.testing.assert_close(encoder_main_output(again), encoder_main_output(default))


@pytest.mark.parametrize("builder", TESTER_IDS)
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "dropped"])
def test_kept_token_indices_follow_patches(builder, fuse, pixel_values):
    tester = TESTERS[builder]
    _, evit = cached_stock_and_evit(builder, keep_rate=0.5, fuse_inattentive_tokens=fuse)
    with torch.no_grad():
        kept = run(tester, evit, pixel_values).kept_token_indices
    assert all(indices.shape[0] == pixel_values.shape[0] for indices in kept)
    for image in range(pixel_values.shape[0]):
        alive = set(range(NUM_PATCHES))  # patches whose token still exists on its own
        fused_alive = 0  # fused tokens (index -1) a layer can keep: each reduction layer with fusion makes one
        for indices in kept:
            row = indices[image].tolist()
            patches = [i for i in row if i != -1]
            assert len(set(patches)) == len(patches)
            assert set(patches) <= alive  # a token that was fused or dropped never comes back
            assert row.count(-1) <= fused_alive
            alive = set(patches)
            fused_alive = row.count(-1) + int(fuse)


@pytest.mark.parametrize("builder", TESTER_IDS)
@pytest.mark.parametrize("attn_implementation, builds_full_matrix", [("sdpa", False), ("eager", True)])
def test_sdpa_reduction_layers_never_build_the_full_attention_matrix(
    builder, attn_implementation, builds_full_matrix, pixel_values, monkeypatch
):
    tester = TESTERS[builder]
    _, evit = cached_stock_and_evit(builder, attn_implementation=attn_implementation)
    # Both-tower models: the image side alone, so that every product belongs to the vision layers.
    forward = evit.get_image_features if tester.takes_text else evit
    product_shapes = []
    original_matmul = torch.matmul

    def recording_matmul(a, b, *args, **kwargs):
        result = original_matmul(a, b, *args, **kwargs)
        product_shapes.append(tuple(result.shape))
        return result

    monkeypatch.setattr(torch, "matmul", recording_matmul)
    with torch.no_grad():
        forward(pixel_values)
    square = [shape for shape in product_shapes if len(shape) == 4 and shape[-1] == shape[-2] and shape[-1] > 1]
    assert bool(square) == builds_full_matrix
    if not builds_full_matrix:  # the class-token rows, one per reduction layer
        assert [shape[2] for shape in product_shapes if len(shape) == 4] == [1] * len(REDUCTION_LAYERS)


def uncompiled_flex_attention(query, key, value, training=False, **kwargs):
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(query, key, value, **kwargs)


def uncompiled_block_mask(*args, _compile=True, **kwargs):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(*args, _compile=False, **kwargs)


@pytest.mark.parametrize("builder", ["vit-classifier", "deit-teacher"])
@pytest.mark.parametrize(
    "compiled", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["flex-uncompiled", "flex-compiled"]
)
def test_flex_attention_agrees_with_eager(builder, compiled, pixel_values, monkeypatch):
    # transformers compiles flex attention and its block mask with inductor on the first call (20-30 s on 2 cores
    # without a warm inductor cache, as in CI, and again for each new sequence length a reduction layer makes).
    # Uncompiled, torch runs the same attention and mask functions eagerly: the EViT layers take the same flex path.
    import transformers.integrations.flex_attention as flex_integration
    import transformers.masking_utils as masking_utils

    flex_calls = []
    if not compiled:

        def recording_flex_attention(*args, **kwargs):
            flex_calls.append(args[0].shape)
            return uncompiled_flex_attention(*args, **kwargs)

        monkeypatch.setattr(flex_integration, "compile_friendly_flex_attention", recording_flex_attention)
        monkeypatch.setattr(masking_utils, "create_block_mask", uncompiled_block_mask)
    _, eager = cached_stock_and_evit(builder, attn_implementation="eager")
    _, flex = cached_stock_and_evit(builder, attn_implementation="flex_attention")
    assert flex.config._attn_implementation == "flex_attention"
    with torch.no_grad():
        expected = eager(pixel_values)
        try:
            output = flex(pixel_values)
        except (NotImplementedError, RuntimeError) as error:  # flex attention needs a recent torch on CPU
            pytest.skip(f"flex attention unavailable here: {error}")
    torch.testing.assert_close(output.logits, expected.logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(output.kept_token_indices, expected.kept_token_indices, strict=True):
        assert torch.equal(a, b)
    if not compiled:  # every layer ran flex attention, on the tokens its reorganization left
        prefix = TESTERS[builder].prefix
        assert [shape[2] for shape in flex_calls] == [prefix + n for n in (64, 64, 46, 34)]


@pytest.mark.parametrize("builder", TESTER_IDS)
def test_apply_evit_converts_in_place(builder, pixel_values):
    tester = TESTERS[builder]
    settings = dict(keep_rate=0.5, reduction_layers=[0, 2], fuse_inattentive_tokens=False)
    stock = cached_stock_model(builder, attn_implementation="eager")
    constructed = tester.evit_class(
        tester.evit_config_class(**tester.settings, **settings, attn_implementation="eager")
    )
    constructed.load_state_dict(stock.state_dict())
    constructed.eval()
    assert list(constructed.state_dict()) == list(stock.state_dict())  # the stock keys, no new parameters
    parameters = {name: p.data_ptr() for name, p in stock.named_parameters()}
    with torch.no_grad():
        recorded = run(tester, stock, pixel_values, output_hidden_states=True)  # installs the output hooks
    layer_count = len(vision_output(recorded).hidden_states)

    converted = evit_hf.apply_evit(stock, **settings)

    assert converted is stock and type(converted) is tester.evit_class and isinstance(converted, tester.stock_class)
    assert {name: p.data_ptr() for name, p in converted.named_parameters()} == parameters  # weights untouched
    assert (evit_settings(converted).keep_rate, evit_settings(converted).reduction_layers) == (0.5, [0, 2])
    assert type(converted.config) is type(constructed.config)
    assert converted.config._attn_implementation == "eager"  # the backend carries over
    with torch.no_grad():
        expected = run(tester, constructed, pixel_values, output_hidden_states=True)
        output = run(tester, converted, pixel_values, output_hidden_states=True)
    assert torch.equal(encoder_main_output(output), encoder_main_output(expected))
    for a, b in zip(output.kept_token_indices, expected.kept_token_indices, strict=True):
        assert torch.equal(a, b)
    # recorded once each, also after the stock model recorded its own
    assert len(vision_output(output).hidden_states) == layer_count


@pytest.mark.parametrize("builder", TESTER_IDS)
def test_saved_folders_load_as_evit_and_into_the_stock_class(builder, tmp_path, pixel_values):
    tester = TESTERS[builder]
    _, evit = cached_stock_and_evit(builder, keep_rate=0.5, reduction_layers=[1, 3])
    evit.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for auto_class, saved_class in (("AutoConfig", type(evit.config)), (tester.auto_class.__name__, type(evit))):
        module = saved_class.__module__.rsplit(".", 1)[-1]  # the family's file, copied next to the weights
        assert config["auto_map"][auto_class] == f"{module}.{saved_class.__name__}"
        assert (tmp_path / f"{module}.py").is_file()

    loaded, info = tester.auto_class.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is tester.evit_class
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (evit_settings(loaded).keep_rate, evit_settings(loaded).reduction_layers) == (0.5, [1, 3])
    plain, info = tester.stock_class.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        reduced = encoder_main_output(run(tester, evit, pixel_values))
        assert torch.equal(encoder_main_output(run(tester, loaded.eval(), pixel_values)), reduced)
        at_keep_one = encoder_main_output(run(tester, evit, pixel_values, keep_rate=1.0))
        assert torch.equal(encoder_main_output(run(tester, plain.eval(), pixel_values)), at_keep_one)

    # Trainer resumes with a plain `load_state_dict` of the saved file (old key names where the family has them).
    _, fresh = cached_stock_and_evit(builder, seed=1)
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"))
    for name, tensor in evit.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name


# The start of a key that only checkpoints written before transformers 5 (what the Hub holds) have, by family.
OLD_KEY_NAMES = {
    "vit": "encoder.layer.0.attention.attention.query",
    "deit": "encoder.layer.0.attention.attention.query",
    "clip": "vision_model.encoder.layers.0.",
    "dinov2": "encoder.layer.0.attention.attention.query",
    "dinov2_with_registers": "encoder.layer.0.attention.attention.query",
}


def write_checkpoint(stock, folder, builder, layout):
    """Saves `stock` with the key names of transformers 5 ("current") or of 4.x ("original")."""
    stock.save_pretrained(folder, save_original_format=layout == "original")
    if layout == "original" and builder == "clip-vision":
        # transformers 4.x's CLIPVisionModel held the tower as `vision_model`; 5.x reads those names, writes its own.
        weights = load_file(folder / "model.safetensors")
        save_file({f"vision_model.{k}": v for k, v in weights.items()}, folder / "model.safetensors", {"format": "pt"})


@pytest.mark.parametrize("builder", TESTER_IDS)
@pytest.mark.parametrize("layout", ["original", "current"])
def test_plain_checkpoints_load_every_weight(builder, layout, tmp_path, pixel_values):
    tester = TESTERS[builder]
    stock = cached_stock_model(builder)
    write_checkpoint(stock, tmp_path, builder, layout)
    old_names = OLD_KEY_NAMES.get(tester.family)
    if old_names and builder in ("vit-base", "deit-base", "clip-vision", "dinov2-base", "dinov2-registers-base"):
        keys = load_file(tmp_path / "model.safetensors").keys()  # the old names are what this test reads
        assert any(key.startswith(old_names) for key in keys) == (layout == "original")
    evit, info = tester.evit_class.from_pretrained(
        tmp_path, keep_rate=0.5, fuse_inattentive_tokens=False, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(evit) is tester.evit_class
    assert (evit_settings(evit).keep_rate, evit_settings(evit).fuse_inattentive_tokens) == (0.5, False)
    for name, tensor in stock.state_dict().items():
        assert torch.equal(evit.state_dict()[name], tensor), name
    with torch.no_grad():
        assert torch.equal(
            encoder_main_output(run(tester, evit.eval(), pixel_values, keep_rate=1.0)),
            encoder_main_output(run(tester, stock, pixel_values)),
        )


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    import transformers
    results = {}
    pixel_values, input_ids, testers = torch.load(sys.argv[1])
    for name, folder, auto_name, takes_text in testers:
        model = getattr(transformers, auto_name).from_pretrained(folder, trust_remote_code=True).eval()
        inputs = {"pixel_values": pixel_values, **({"input_ids": input_ids} if takes_text else {})}
        with torch.no_grad():
            output = model(**inputs)
        results[name] = {"class": type(model).__name__, "output": output.to_tuple()[:2],
                         "kept": output.kept_token_indices}
    assert "evit_hf" not in sys.modules, "evit_hf was imported"
    torch.save(results, sys.argv[2])
    """
)


@pytest.mark.slow  # a fresh interpreter per family: seconds on 2 cores
def test_remote_code_loads_every_family_without_evit_hf(tmp_path, pixel_values):
    # One process for all testers: starting Python with torch and transformers costs seconds.
    models, listed = {}, []
    for name, tester in TESTERS.items():
        _, models[name] = cached_stock_and_evit(name, keep_rate=0.5)
        models[name].save_pretrained(tmp_path / name)
        listed.append((name, str(tmp_path / name), tester.auto_class.__name__, tester.takes_text))
    torch.save((pixel_values, text_inputs(pixel_values.shape[0]), listed), tmp_path / "inputs.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)
    subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_SCRIPT, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path,
        env=env,
        check=True,
    )
    results = torch.load(tmp_path / "out.pt")
    assert set(results) == set(TESTERS)
    for name, model in models.items():
        assert results[name]["class"] == type(model).__name__
        with torch.no_grad():
            expected = run(TESTERS[name], model, pixel_values)
        for got, want in zip(results[name]["output"], expected.to_tuple()[:2], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert all(torch.equal(a, b) for a, b in zip(results[name]["kept"], expected.kept_token_indices, strict=True))


# ViT and DeiT: attention masks, masked image modeling, resolution, errors, the spec's DeiT-S token counts.


def reference_main_output(stock, evit, pixel_values, keep_rate, fuse, prefix):
    finals, kept = reference_forward(
        stock, pixel_values, keep_rate, evit.config.reduction_layers, fuse, num_prefix_tokens=prefix
    )
    if hasattr(stock, "cls_classifier"):  # DeiT with teacher: both heads, averaged
        logits = [(stock.cls_classifier(x[0]) + stock.distillation_classifier(x[1])) / 2 for x in finals]
        return torch.stack(logits), kept
    if hasattr(stock, "classifier"):
        return torch.stack([stock.classifier(x[0]) for x in finals]), kept
    return torch.stack(finals), kept


def test_sdpa_returns_no_attentions_like_the_stock_model(pixel_values):
    stock, evit = stock_and_evit("vit-classifier", attn_implementation="sdpa")
    with torch.no_grad():
        assert (
            evit(pixel_values, output_attentions=True).attentions
            == stock(pixel_values, output_attentions=True).attentions
        )
    assert evit.config._attn_implementation == "sdpa"


def test_return_dict_false_gives_a_tuple(pixel_values):
    _, evit = stock_and_evit("vit-classifier")
    with torch.no_grad():
        output = evit(pixel_values, return_dict=False)
    assert isinstance(output, tuple)
    torch.testing.assert_close(output[0], evit(pixel_values).logits)


@pytest.mark.parametrize("family", ["vit-classifier", "deit-teacher"])
def test_interpolate_pos_encoding_at_higher_resolution(family):
    stock, evit = stock_and_evit(family)
    pixel_values = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(3))  # 12 x 12 = 144 patches
    with torch.no_grad():
        output = evit(pixel_values, interpolate_pos_encoding=True)
        expected, expected_kept = reference_main_output(stock, evit, pixel_values, 0.7, True, FAMILIES[family][2])
        stock_logits = stock(pixel_values, interpolate_pos_encoding=True).logits
        evit_full = evit(pixel_values, interpolate_pos_encoding=True, keep_rate=1.0).logits
    assert output.kept_token_indices[0].shape[1] == num_kept_tokens(144, 0.7)
    assert int(output.kept_token_indices[0].max()) < 144
    torch.testing.assert_close(output.logits, expected, atol=2e-5, rtol=1e-4)
    for layer, indices in enumerate(output.kept_token_indices):
        assert indices.tolist() == [per_image[layer] for per_image in expected_kept]
    assert torch.equal(evit_full, stock_logits)


def test_invalid_calls_raise_clear_errors(pixel_values):
    _, evit = stock_and_evit("vit-classifier")
    with pytest.raises(ValueError, match=r"keep_rate must be in \(0, 1\]"):
        evit(pixel_values, keep_rate=0.0)
    with pytest.raises(ValueError, match="keep_rate=1.0"):
        evit(pixel_values, attention_mask=torch.ones(3, NUM_PATCHES + 1))


def token_mask(prefix):
    """An attention mask over prefix + 64 patch tokens: image 0 masks patches 5-19, image 2 patches 40-63."""
    mask = torch.ones(3, prefix + NUM_PATCHES, dtype=torch.long)
    mask[0, prefix + 5 : prefix + 20] = 0
    mask[2, prefix + 40 :] = 0
    return mask


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_attention_mask_at_keep_rate_one_is_the_stock_models(family, attn_implementation, pixel_values):
    stock, evit = cached_stock_and_evit(family, attn_implementation=attn_implementation)
    mask = token_mask(FAMILIES[family][2])
    with torch.no_grad():
        expected = main_output(stock(pixel_values, attention_mask=mask))
        output = evit(pixel_values, attention_mask=mask, keep_rate=1.0)
        unmasked = main_output(stock(pixel_values))
    assert torch.equal(main_output(output), expected)
    assert not torch.equal(expected[0], unmasked[0]) and not torch.equal(expected[2], unmasked[2])  # it masks
    torch.testing.assert_close(expected[1], unmasked[1])  # image 1 masks nothing
    assert all(k.tolist() == [list(range(NUM_PATCHES))] * 3 for k in output.kept_token_indices)


@pytest.mark.parametrize("family", ["vit-classifier", "deit-teacher"])
@pytest.mark.parametrize(
    "settings, call",
    [({}, {"keep_rate": 0.5}), ({"keep_rate": 0.5}, {}), ({"keep_rate": 0.5}, {"keep_rate": 0.9})],
    ids=["keep-rate-of-the-call", "keep-rate-of-the-config", "both"],
)
def test_attention_mask_with_token_reduction_raises(family, settings, call, pixel_values):
    _, evit = cached_stock_and_evit(family, **settings)
    mask = token_mask(FAMILIES[family][2])
    with pytest.raises(ValueError, match="attention_mask cannot be combined with token reduction.*keep_rate=1.0"):
        evit(pixel_values, attention_mask=mask, **call)


def masked_image_models(family, attn_implementation="sdpa", **evit_settings):
    """Stock and EViT base models built with a mask token, same weights; the mask token and the position embeddings
    are random, not the zeros they start as."""
    is_deit = family.startswith("deit")
    stock_class, evit_class = (DeiTModel, evit_hf.EViTDeiTModel) if is_deit else (ViTModel, evit_hf.EViTModel)
    config_class, evit_config_class = (
        (DeiTConfig, evit_hf.EViTDeiTConfig) if is_deit else (ViTConfig, evit_hf.EViTConfig)
    )
    torch.manual_seed(0)
    stock = stock_class(config_class(**TINY, attn_implementation=attn_implementation), use_mask_token=True).eval()
    with torch.no_grad():
        stock.embeddings.mask_token.normal_()
        # DeiT starts with zero position embeddings: masked patches would be identical tokens with tied scores.
        stock.embeddings.position_embeddings.normal_(std=0.2)
    evit_config = evit_config_class(**TINY, **evit_settings, attn_implementation=attn_implementation)
    evit = evit_class(evit_config, use_mask_token=True).eval()
    evit.load_state_dict(stock.state_dict())
    return stock, evit


def masked_patches():
    generator = torch.Generator().manual_seed(6)
    return torch.rand(3, NUM_PATCHES, generator=generator) < 0.4


@pytest.mark.parametrize("family", ["vit-base", "deit-base"], ids=["vit", "deit"])
def test_bool_masked_pos_at_keep_rate_one_is_the_stock_models(family, pixel_values):
    stock, evit = masked_image_models(family)
    bool_masked_pos = masked_patches()
    with torch.no_grad():
        expected = stock(pixel_values, bool_masked_pos=bool_masked_pos).last_hidden_state
        output = evit(pixel_values, bool_masked_pos=bool_masked_pos, keep_rate=1.0).last_hidden_state
        unmasked = stock(pixel_values).last_hidden_state
    assert torch.equal(output, expected)
    assert not torch.equal(expected, unmasked)  # the mask token is used


@pytest.mark.parametrize("family, prefix", [("vit-base", 1), ("deit-base", 2)], ids=["vit", "deit"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "dropped"])
def test_bool_masked_pos_with_token_reduction_matches_the_spec(family, prefix, fuse, pixel_values):
    stock, evit = masked_image_models(family, keep_rate=0.5, fuse_inattentive_tokens=fuse)
    bool_masked_pos = masked_patches()
    with torch.no_grad():
        output = evit(pixel_values, bool_masked_pos=bool_masked_pos)
        finals, kept = reference_forward(
            stock, pixel_values, 0.5, evit.config.reduction_layers, fuse, prefix, bool_masked_pos=bool_masked_pos
        )
    torch.testing.assert_close(output.last_hidden_state, torch.stack(finals), atol=2e-5, rtol=1e-4)
    for layer, indices in enumerate(output.kept_token_indices):
        assert indices.tolist() == [per_image[layer] for per_image in kept]


# The spec's token counts are those of DeiT-S's token grid (224 px, patch 16, 12 layers): they do not depend on the
# width, so a narrow model with that grid and depth checks them at a small fraction of DeiT-S's cost.
DEIT_SMALL_GRID = dict(DEIT_SMALL, hidden_size=24, num_attention_heads=6, intermediate_size=48)


@pytest.fixture(scope="module")
def deit_small_grid_models():
    torch.manual_seed(0)
    vit = evit_hf.EViTForImageClassification(evit_hf.EViTConfig(**DEIT_SMALL_GRID)).eval()
    deit = evit_hf.EViTDeiTForImageClassificationWithTeacher(evit_hf.EViTDeiTConfig(**DEIT_SMALL_GRID)).eval()
    return {"vit": vit, "distilled-deit": deit}


@pytest.mark.parametrize(
    "keep_rate, fuse, candidates_after",
    [(0.7, True, [139, 99, 71]), (0.7, False, [138, 97, 68]), (0.5, False, [98, 49, 25]), (0.5, True, [99, 51, 27])],
    ids=["0.7-fused", "0.7-dropped", "0.5-dropped", "0.5-fused"],
)
@pytest.mark.parametrize("kind, prefix", [("vit", 1), ("distilled-deit", 2)])
def test_deit_small_token_counts(deit_small_grid_models, kind, prefix, keep_rate, fuse, candidates_after):
    model = deit_small_grid_models[kind]
    model.config.fuse_inattentive_tokens = fuse
    assert model.config.reduction_layers == [3, 6, 9]
    with torch.no_grad():
        output = model(torch.randn(1, 3, 224, 224), keep_rate=keep_rate, output_hidden_states=True)
    counts = [h.shape[1] for h in output.hidden_states]
    assert counts[:4] == [prefix + 196] * 4
    assert [counts[layer + 1] for layer in (3, 6, 9)] == [prefix + c for c in candidates_after]
    assert counts[-1] == prefix + candidates_after[-1]
    assert [k.shape[1] for k in output.kept_token_indices] == [c - int(fuse) for c in candidates_after]
    assert math.isfinite(float(output.logits.sum()))
