"""Behaviour of single families beyond the suite every family runs (test_modeling.py): CLIP and MetaCLIP 2 (the text
tower, the settings in the vision configuration, refusals), DINOv2 (SwiGLU checkpoints) and DINOv3 (rotary positions
in training, the backbone refusal, its checkpoint layout)."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

import evit_hf

from .model_builders import (
    TINY_CLIP_TEXT,
    TINY_CLIP_VISION,
    TINY_DINOV2,
    TINY_DINOV3,
    encoder_stock_and_evit,
    encoder_stock_model,
    text_inputs,
)
from .spec_reference import reference_dinov3


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
    ],
    ids=["siglip-vision", "siglip"],  # LLaVA with a SigLIP tower: tests/test_llava.py
)
def test_apply_evit_refuses_models_it_cannot_reduce(build, reason):
    model = build()
    with pytest.raises(
        TypeError,
        match=r"apply_evit supports CLIPForImageClassification, CLIPModel, .*ViTModel.* \(and their EViT classes\).*"
        + reason,
    ):
        evit_hf.apply_evit(model)
    assert not any(type(m).__name__.startswith("EViT") for m in model.modules())  # nothing changed


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
