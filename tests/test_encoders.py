"""EViT on CLIP vision towers and DINOv2 (with and without registers): spec, stock equality, conversion, publishing."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    CLIPTextModel,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

import evit_hf

from .encoder_reference import reference_dinov3, reference_outputs
from .model_builders import (
    ENCODER_FAMILIES,
    SPEC_TESTED_ENCODERS,
    TINY,
    TINY_CLIP_TEXT,
    TINY_CLIP_VISION,
    TINY_DINOV2,
    TINY_DINOV3,
    encoder_main_output,
    encoder_stock_and_evit,
    encoder_stock_model,
    text_inputs,
)


NUM_PATCHES = (TINY["image_size"] // TINY["patch_size"]) ** 2  # 64; reduction layers 1, 2, 3 of 4
AUTO_CLASSES = {
    family: AutoModelForImageClassification if "classifier" in family else AutoModel for family in ENCODER_FAMILIES
}


def settings_of(model):
    """The configuration holding the EViT settings (CLIP keeps them in its vision configuration)."""
    return model.config.vision_config if hasattr(model.config, "vision_config") else model.config


def run(model, pixel_values, **kwargs):
    if hasattr(model, "text_model"):  # both towers
        return model(input_ids=text_inputs(pixel_values.shape[0]), pixel_values=pixel_values, **kwargs)
    return model(pixel_values, **kwargs)


def vision_hidden_states(output):
    return getattr(output, "vision_model_output", output).hidden_states


@pytest.mark.parametrize("family", SPEC_TESTED_ENCODERS)
@pytest.mark.parametrize("keep_rate, fuse", [(0.7, True), (0.5, False)], ids=["0.7-fused", "0.5-dropped"])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_forward_matches_the_spec(family, keep_rate, fuse, attn_implementation, pixel_values):
    stock, evit = encoder_stock_and_evit(
        family, attn_implementation=attn_implementation, keep_rate=keep_rate, fuse_inattentive_tokens=fuse
    )
    with torch.no_grad():
        output = run(evit, pixel_values)
        expected, expected_kept = reference_outputs(
            family, stock, pixel_values, keep_rate, settings_of(evit).reduction_layers, fuse, text_inputs(3)
        )
    for name, tensor in expected.items():
        torch.testing.assert_close(getattr(output, name), tensor, atol=2e-5, rtol=1e-4, msg=name)
    assert len(output.kept_token_indices) == 3
    for layer, kept in enumerate(output.kept_token_indices):
        assert kept.tolist() == [per_image[layer] for per_image in expected_kept]


@pytest.mark.parametrize("family", SPEC_TESTED_ENCODERS)
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_keep_rate_one_is_the_stock_model(family, attn_implementation, pixel_values):
    stock, evit = encoder_stock_and_evit(family, attn_implementation=attn_implementation)
    _, without_layers = encoder_stock_and_evit(
        family, attn_implementation=attn_implementation, keep_rate=0.5, reduction_layers=[]
    )
    with torch.no_grad():
        expected = run(stock, pixel_values)
        full = run(evit, pixel_values, keep_rate=1.0)
        unreduced = run(without_layers, pixel_values)
        reduced = run(evit, pixel_values)  # keep 0.7
    for name in ("logits", "logits_per_image", "text_embeds", "image_embeds", "last_hidden_state", "pooler_output"):
        if getattr(expected, name, None) is not None:
            assert torch.equal(getattr(full, name), getattr(expected, name)), name
            assert torch.equal(getattr(unreduced, name), getattr(expected, name)), name
    assert not torch.equal(encoder_main_output(reduced), encoder_main_output(expected))
    assert [k.shape[1] for k in full.kept_token_indices] == [NUM_PATCHES] * 3


@pytest.mark.parametrize("family, prefix", [("clip-vision", 1), ("dinov2-base", 1), ("dinov2-registers-base", 4)])
def test_token_counts_and_per_call_keep_rate(family, prefix, pixel_values):
    _, evit = encoder_stock_and_evit(family, attn_implementation="eager")
    with torch.no_grad():
        default = evit(pixel_values, output_hidden_states=True, output_attentions=True)
        half = evit(pixel_values, keep_rate=0.5, output_hidden_states=True)
    # 64 patches; reduction layers 1, 2, 3 keep 45, 33, 24 (0.7) or 32, 17, 9 (0.5) candidates, plus the fused token
    assert [k.shape[1] for k in default.kept_token_indices] == [45, 33, 24]
    assert [k.shape[1] for k in half.kept_token_indices] == [32, 17, 9]
    assert [h.shape[1] for h in default.hidden_states] == [prefix + n for n in (64, 64, 46, 34, 25)]
    assert [a.shape[-1] for a in default.attentions] == [prefix + n for n in (64, 64, 46, 34)]
    assert [h.shape[1] for h in half.hidden_states][-1] == prefix + 10
    assert all(0 <= int(k.min()) and int(k.max()) < NUM_PATCHES for k in default.kept_token_indices[:1])
    assert evit.config.keep_rate == 0.7


@pytest.mark.parametrize("family", ["clip-vision", "dinov2-registers-base"])
@pytest.mark.parametrize("attn_implementation, builds_full_matrix", [("sdpa", False), ("eager", True)])
def test_sdpa_reduction_layers_never_build_the_full_attention_matrix(
    family, attn_implementation, builds_full_matrix, pixel_values, monkeypatch
):
    _, evit = encoder_stock_and_evit(family, attn_implementation=attn_implementation)
    product_shapes = []
    original_matmul = torch.matmul

    def recording_matmul(a, b, *args, **kwargs):
        result = original_matmul(a, b, *args, **kwargs)
        product_shapes.append(tuple(result.shape))
        return result

    monkeypatch.setattr(torch, "matmul", recording_matmul)
    with torch.no_grad():
        evit(pixel_values)
    square = [shape for shape in product_shapes if len(shape) == 4 and shape[-1] == shape[-2] and shape[-1] > 1]
    assert bool(square) == builds_full_matrix
    if not builds_full_matrix:  # the class-token rows, one per reduction layer
        assert [shape[2] for shape in product_shapes] == [1] * 3


@pytest.mark.parametrize("family", SPEC_TESTED_ENCODERS)
def test_apply_evit_converts_in_place(family, pixel_values):
    stock, reference = encoder_stock_and_evit(
        family, attn_implementation="eager", keep_rate=0.5, reduction_layers=[0, 2], fuse_inattentive_tokens=False
    )
    stock_class, evit_class = ENCODER_FAMILIES[family][:2]
    assert list(reference.state_dict()) == list(stock.state_dict())  # the stock keys, no new parameters
    parameters = {name: p.data_ptr() for name, p in stock.named_parameters()}
    with torch.no_grad():
        recorded = run(stock, pixel_values, output_hidden_states=True)  # installs the output hooks
    layer_count = len(vision_hidden_states(recorded))

    converted = evit_hf.apply_evit(stock, keep_rate=0.5, reduction_layers=[0, 2], fuse_inattentive_tokens=False)

    assert converted is stock and type(converted) is evit_class and isinstance(converted, stock_class)
    assert {name: p.data_ptr() for name, p in converted.named_parameters()} == parameters
    assert (settings_of(converted).keep_rate, settings_of(converted).reduction_layers) == (0.5, [0, 2])
    assert type(converted.config) is type(reference.config)
    assert converted.config._attn_implementation == "eager"
    with torch.no_grad():
        expected = run(reference, pixel_values, output_hidden_states=True)
        output = run(converted, pixel_values, output_hidden_states=True)
    assert torch.equal(encoder_main_output(output), encoder_main_output(expected))
    for a, b in zip(output.kept_token_indices, expected.kept_token_indices, strict=True):
        assert torch.equal(a, b)
    assert (
        len(vision_hidden_states(output)) == layer_count
    )  # recorded once each, also after the stock model recorded its own


def test_apply_evit_on_clip_leaves_the_text_tower(pixel_values):
    stock = encoder_stock_model("clip")
    input_ids = text_inputs()
    with torch.no_grad():
        text_before = stock.get_text_features(input_ids=input_ids).pooler_output
    evit_hf.apply_evit(stock, keep_rate=0.5)
    assert type(stock.text_model) is CLIPTextModel
    assert all(type(layer).__module__.startswith("transformers.") for layer in stock.text_model.encoder.layers)
    assert stock.config.vision_config is stock.vision_model.config and stock.config.keep_rate == 0.5
    assert stock.config.text_config is stock.text_model.config
    with torch.no_grad():
        assert torch.equal(stock.get_text_features(input_ids=input_ids).pooler_output, text_before)
        features = stock.get_image_features(pixel_values, keep_rate=0.25)
    assert [k.shape[1] for k in features.kept_token_indices] == [16, 5, 2]  # per-call keep rate reaches the tower
    stock.config.keep_rate = 0.9  # the training schedule assigns it on the model's configuration
    assert stock.vision_model.config.keep_rate == 0.9


def tiny_siglip_vision():
    return dict(TINY_CLIP_VISION, intermediate_size=64)


@pytest.mark.parametrize(
    "build, reason",
    [
        (lambda: SiglipVisionModel(SiglipVisionConfig(**tiny_siglip_vision())), "has no class token"),
        (
            lambda: SiglipModel(SiglipConfig(vision_config=tiny_siglip_vision(), text_config=TINY_CLIP_TEXT)),
            "has no class token",
        ),
        (
            lambda: LlavaForConditionalGeneration(
                LlavaConfig(
                    vision_config=CLIPVisionConfig(**TINY_CLIP_VISION),
                    text_config=LlamaConfig(
                        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64
                    ),
                    image_token_index=63,
                )
            ),
            r"holds a CLIPVisionModel at `model.vision_tower` and uses every one of its patch tokens",
        ),
    ],
    ids=["siglip-vision", "siglip", "llava"],
)
def test_apply_evit_refuses_models_it_cannot_reduce(build, reason):
    model = build()
    with pytest.raises(
        TypeError, match=r"apply_evit supports CLIPForImageClassification, CLIPModel, .*ViTModel .*" + reason
    ):
        evit_hf.apply_evit(model)
    assert not any(type(m).__name__.startswith("EViT") for m in model.modules())  # nothing changed


@pytest.mark.parametrize("family", SPEC_TESTED_ENCODERS)
def test_saved_folders_load_as_evit_and_into_the_stock_class(family, tmp_path, pixel_values):
    stock, evit = encoder_stock_and_evit(family, keep_rate=0.5, reduction_layers=[1, 3])
    evit.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for auto_class, saved_class in (("AutoConfig", type(evit.config)), (AUTO_CLASSES[family].__name__, type(evit))):
        module = saved_class.__module__.rsplit(".", 1)[-1]  # the family's file, copied next to the weights
        assert config["auto_map"][auto_class] == f"{module}.{saved_class.__name__}"
        assert (tmp_path / f"{module}.py").is_file()

    loaded, info = AUTO_CLASSES[family].from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is type(evit)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (settings_of(loaded).keep_rate, settings_of(loaded).reduction_layers) == (0.5, [1, 3])
    plain, info = type(stock).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert torch.equal(
            encoder_main_output(run(loaded.eval(), pixel_values)), encoder_main_output(run(evit, pixel_values))
        )
        at_keep_one = encoder_main_output(run(evit, pixel_values, keep_rate=1.0))
        assert torch.equal(encoder_main_output(run(plain.eval(), pixel_values)), at_keep_one)

    # Trainer resumes with a plain `load_state_dict` of the saved file (old key names where the family has them).
    _, fresh = encoder_stock_and_evit(family, seed=1)
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"))
    for name, tensor in evit.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name


# Key names of checkpoints written before transformers 5 (what the Hub holds), by family.
OLD_KEY_NAMES = {
    "clip-vision": "vision_model.encoder.layers.0.",
    "dinov2-base": "encoder.layer.0.attention.attention.query",
}


def write_checkpoint(stock, folder, family, layout):
    """Saves `stock` with the key names of transformers 5 ("current") or of 4.x ("original")."""
    stock.save_pretrained(folder, save_original_format=layout == "original")
    if layout == "original" and family == "clip-vision":
        # transformers 4.x's CLIPVisionModel held the tower as `vision_model`; 5.x reads those names, writes its own.
        weights = load_file(folder / "model.safetensors")
        save_file({f"vision_model.{k}": v for k, v in weights.items()}, folder / "model.safetensors", {"format": "pt"})


@pytest.mark.parametrize("family", ["clip-vision", "clip", "dinov2-base", "dinov2-registers-classifier"])
@pytest.mark.parametrize("layout", ["original", "current"])
def test_plain_checkpoints_load_every_weight(family, layout, tmp_path, pixel_values):
    stock, _ = encoder_stock_and_evit(family)
    write_checkpoint(stock, tmp_path, family, layout)
    keys = load_file(tmp_path / "model.safetensors").keys()
    if family in OLD_KEY_NAMES:  # the old names are what this test reads
        assert any(key.startswith(OLD_KEY_NAMES[family]) for key in keys) == (layout == "original")
    evit_class = ENCODER_FAMILIES[family][1]
    evit, info = evit_class.from_pretrained(
        tmp_path, keep_rate=0.5, fuse_inattentive_tokens=False, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(evit) is evit_class
    assert (settings_of(evit).keep_rate, settings_of(evit).fuse_inattentive_tokens) == (0.5, False)
    for name, tensor in stock.state_dict().items():
        assert torch.equal(evit.state_dict()[name], tensor), name
    with torch.no_grad():
        assert torch.equal(
            encoder_main_output(run(evit.eval(), pixel_values, keep_rate=1.0)),
            encoder_main_output(run(stock, pixel_values)),
        )


def test_clip_vision_tower_loads_from_a_whole_clip_checkpoint(tmp_path, pixel_values):
    # Hub CLIP repositories hold a CLIPModel; CLIPVisionModel.from_pretrained reads their vision half.
    stock = encoder_stock_model("clip")
    stock.save_pretrained(tmp_path)
    tower = evit_hf.EViTCLIPVisionModel.from_pretrained(tmp_path, keep_rate=0.5).eval()
    assert type(tower.config) is evit_hf.EViTCLIPVisionConfig and tower.config.keep_rate == 0.5
    with torch.no_grad():
        expected = stock.vision_model(pixel_values).pooler_output
        assert torch.equal(tower(pixel_values, keep_rate=1.0).pooler_output, expected)
    evit_clip = evit_hf.EViTCLIPModel.from_pretrained(tmp_path, keep_rate=0.4, reduction_layers=[0])
    assert (evit_clip.config.vision_config.keep_rate, evit_clip.config.vision_config.reduction_layers) == (0.4, [0])


def test_clip_settings_live_in_the_vision_configuration(tmp_path):
    config = evit_hf.EViTCLIPConfig(vision_config=TINY_CLIP_VISION, text_config=TINY_CLIP_TEXT, keep_rate=0.5)
    assert type(config.vision_config) is evit_hf.EViTCLIPVisionConfig and config.vision_config.keep_rate == 0.5
    assert "keep_rate" not in config.to_dict() and config.to_dict()["vision_config"]["keep_rate"] == 0.5
    with pytest.raises(ValueError, match=r"keep_rate must be in \(0, 1\]"):
        config.keep_rate = 1.5
    with pytest.raises(ValueError, match=r"reduction_layers holds 0-based layer indices in \[0, 3\]"):
        evit_hf.EViTCLIPConfig(vision_config=TINY_CLIP_VISION, reduction_layers=[4])
    plain_tower = evit_hf.EViTCLIPConfig(vision_config=CLIPVisionConfig(**TINY_CLIP_VISION))
    assert type(plain_tower.vision_config) is evit_hf.EViTCLIPVisionConfig
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path, keep_rate=0.3)
    assert type(loaded) is evit_hf.EViTCLIPConfig and loaded.vision_config.keep_rate == 0.3


def test_configs_refuse_other_families(tmp_path):
    evit_hf.EViTDinov2Config(**TINY_DINOV2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is 'evit_dinov2'"):
        evit_hf.EViTCLIPVisionModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'dinov2_with_registers'.*is 'evit_dinov2'"):
        evit_hf.EViTDinov2WithRegistersConfig.from_pretrained(tmp_path)


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModel, AutoModelForImageClassification
    results = {}
    pixel_values, input_ids, families = torch.load(sys.argv[1])
    for family, folder, auto_name in families:
        auto_class = {"AutoModel": AutoModel, "AutoModelForImageClassification": AutoModelForImageClassification}
        model = auto_class[auto_name].from_pretrained(folder, trust_remote_code=True).eval()
        inputs = {"pixel_values": pixel_values, **({"input_ids": input_ids} if hasattr(model, "text_model") else {})}
        with torch.no_grad():
            output = model(**inputs)
        results[family] = {"class": type(model).__name__, "output": output.to_tuple()[:2],
                           "kept": output.kept_token_indices}
    assert "evit_hf" not in sys.modules, "evit_hf was imported"
    torch.save(results, sys.argv[2])
    """
)


def test_remote_code_loads_every_family_without_evit_hf(tmp_path, pixel_values):
    models, families = {}, []
    for family in SPEC_TESTED_ENCODERS:
        _, models[family] = encoder_stock_and_evit(family, keep_rate=0.5)
        models[family].save_pretrained(tmp_path / family)
        families.append((family, str(tmp_path / family), AUTO_CLASSES[family].__name__))
    torch.save((pixel_values, text_inputs(3), families), tmp_path / "inputs.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)
    subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_SCRIPT, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path,
        env=env,
        check=True,
    )
    results = torch.load(tmp_path / "out.pt")
    for family, model in models.items():
        assert results[family]["class"] == type(model).__name__
        with torch.no_grad():
            expected = run(model, pixel_values)
        for got, want in zip(results[family]["output"], expected.to_tuple()[:2], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert all(
            torch.equal(a, b) for a, b in zip(results[family]["kept"], expected.kept_token_indices, strict=True)
        )


def test_swiglu_checkpoints_load_with_a_plain_load_state_dict(tmp_path):
    # DINOv2-giant's SwiGLU MLP is saved as one `weights_in` tensor that the current layout splits in two: the
    # resume path (`load_state_dict`) must split it as `from_pretrained` does, not report it missing.
    from transformers import Dinov2Config, Dinov2ForImageClassification

    config = Dinov2Config(**{**TINY_DINOV2, "use_swiglu_ffn": True, "num_labels": 3})
    torch.manual_seed(0)
    evit = evit_hf.apply_evit(Dinov2ForImageClassification(config), keep_rate=0.5)
    evit.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert any("mlp.weights_in" in key for key in saved)  # the old, fused layout
    torch.manual_seed(1)
    fresh = evit_hf.apply_evit(Dinov2ForImageClassification(config), keep_rate=0.5)
    fresh.load_state_dict(saved)
    for name, tensor in evit.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name


@pytest.mark.parametrize("family", ["dinov3", "dinov3-registers"])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_dinov3_training_rotations_follow_the_kept_patches(family, attn_implementation, pixel_values):
    # In training mode DINOv3 shifts, jitters and rescales the patch coordinates at random: each kept token keeps the
    # rotation of its own patch from those same coordinates.
    stock, evit = encoder_stock_and_evit(family, attn_implementation=attn_implementation, keep_rate=0.7)
    for model in (stock, evit):
        model.config.pos_embed_shift, model.config.pos_embed_jitter = 0.1, 1.2
    torch.manual_seed(4)
    output = evit.train()(pixel_values)
    torch.manual_seed(4)
    rotations = stock.train().rope_embeddings(pixel_values)
    assert not torch.allclose(rotations[0], stock.eval().rope_embeddings(pixel_values)[0])  # augmented
    with torch.no_grad():
        finals, kept, _ = reference_dinov3(stock, pixel_values, 0.7, evit.config.reduction_layers, True, rotations)
    torch.testing.assert_close(output.last_hidden_state, torch.stack(finals), atol=2e-5, rtol=1e-4)
    for layer, indices in enumerate(output.kept_token_indices):
        assert indices.tolist() == [per_image[layer] for per_image in kept]


def test_dinov3_backbone_is_refused_with_the_reason():
    from transformers import DINOv3ViTBackbone, DINOv3ViTConfig

    backbone = DINOv3ViTBackbone(DINOv3ViTConfig(**TINY_DINOV3, out_indices=[4]))
    with pytest.raises(
        TypeError, match="does not convert DINOv3ViTBackbone: it returns feature maps on the full patch"
    ):
        evit_hf.apply_evit(backbone)


def test_dinov3_checkpoints_with_the_layers_at_the_top_load_every_weight(tmp_path, pixel_values):
    # DINOv3 checkpoints name the layers `layer.N...` (transformers keeps them under `model.` and saves the old names
    # back); transformers renames them by model type, and the EViT model gets the same renaming.
    stock = encoder_stock_model("dinov3-registers")
    stock.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert any(key.startswith("layer.") for key in keys) and not any(key.startswith("model.") for key in keys)
    evit, info = evit_hf.EViTDINOv3ViTModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        torch.testing.assert_close(
            evit(pixel_values, keep_rate=1.0).last_hidden_state, stock(pixel_values).last_hidden_state, rtol=0, atol=0
        )
