"""EViT LLaVA on the Hub's terms: the processor's placeholders, save_pretrained -> Auto classes (with evit_hf, and as
remote code without it), the image-text-to-text pipeline, and the model card."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

import evit_hf

from .llava_builders import IMAGE_TOKEN_ID, save_stock_folder, tiny_pixels


PROMPT = "USER: <image> what digit is this ? ASSISTANT:"


def _image(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def stock_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stock-llava")
    save_stock_folder(folder)
    return str(folder)


@pytest.fixture(scope="module")
def evit_folder(stock_folder, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("evit-llava"))
    model = evit_hf.EViTLlavaForConditionalGeneration.from_pretrained(stock_folder, keep_rate=0.5)
    processor = evit_hf.EViTLlavaProcessor.from_pretrained(stock_folder, model_config=model.config)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("keep_rate", [1.0, 0.7, 0.5, [0.9, 0.6, 0.4]])
def test_the_processor_emits_one_placeholder_per_image_feature(stock_folder, keep_rate):
    model = evit_hf.EViTLlavaForConditionalGeneration.from_pretrained(stock_folder, keep_rate=keep_rate).eval()
    processor = evit_hf.EViTLlavaProcessor.from_pretrained(stock_folder, model_config=model.config)
    inputs = processor(images=[_image(0), _image(1)], text=[PROMPT, PROMPT], return_tensors="pt")
    per_image = evit_hf.num_image_tokens(model.config)
    assert (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1).tolist() == [per_image, per_image]
    with torch.no_grad():
        model(**inputs)  # the placeholders match the features


def test_from_pretrained_takes_the_settings_and_the_stock_keys(stock_folder):
    model = evit_hf.EViTLlavaForConditionalGeneration.from_pretrained(
        stock_folder, keep_rate=[0.8, 0.5], reduction_layers=[0, 2], fuse_inattentive_tokens=False
    )
    assert model.config.vision_config.reduction_layers == [0, 2]
    assert model.config.keep_rate == [0.8, 0.5]
    assert not model.config.fuse_inattentive_tokens
    stock = AutoModelForImageTextToText.from_pretrained(stock_folder)
    assert type(stock).__name__ == "LlavaForConditionalGeneration"
    assert model.state_dict().keys() == stock.state_dict().keys()


def test_a_saved_folder_loads_as_evit_through_the_auto_classes(evit_folder):
    model = AutoModelForImageTextToText.from_pretrained(evit_folder).eval()
    processor = AutoProcessor.from_pretrained(evit_folder)
    assert type(model) is evit_hf.EViTLlavaForConditionalGeneration
    assert type(processor) is evit_hf.EViTLlavaProcessor
    assert model.config.keep_rate == 0.5
    inputs = processor(images=_image(), text=PROMPT, return_tensors="pt")
    assert (inputs["input_ids"] == IMAGE_TOKEN_ID).sum() == evit_hf.num_image_tokens(model.config) < 64
    with torch.no_grad():
        model(**inputs)
    config = json.loads(open(os.path.join(evit_folder, "config.json")).read())
    assert config["auto_map"]["AutoModelForImageTextToText"] == (
        "modeling_evit_llava.EViTLlavaForConditionalGeneration"
    )
    assert os.path.exists(os.path.join(evit_folder, "processing_evit_llava.py"))


def test_the_pipeline_runs_on_a_saved_folder(evit_folder):
    generator = pipeline("image-text-to-text", model=evit_folder)
    assert type(generator.model) is evit_hf.EViTLlavaForConditionalGeneration
    result = generator(images=Image.fromarray(_image()), text=PROMPT, max_new_tokens=3, do_sample=False)
    assert isinstance(result[0]["generated_text"], str)


def test_a_processor_without_a_model_config_reads_the_folders(evit_folder, stock_folder):
    saved = evit_hf.EViTLlavaProcessor.from_pretrained(evit_folder)
    assert saved.evit_schedule["keep_rate"] == 0.5
    defaults = evit_hf.EViTLlavaProcessor.from_pretrained(stock_folder)  # a stock folder: the EViT defaults
    assert defaults.evit_schedule["keep_rate"] == 0.7


REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline
    folder, out = sys.argv[1:]
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    inputs = processor(images=image, text="USER: <image> what digit is this ? ASSISTANT:", return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    generator = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    text = generator(images=Image.fromarray(image), text="USER: <image> what ASSISTANT:", max_new_tokens=2)
    text = text[0]["generated_text"]
    assert "evit_hf" not in sys.modules, "evit_hf was imported"
    torch.save({"model": type(model).__name__, "module": type(model).__module__,
                "processor": type(processor).__name__, "input_ids": inputs["input_ids"], "logits": logits,
                "text": text}, out)
    """
)


@pytest.mark.slow  # a fresh interpreter imports transformers and builds a pipeline: about 10 s
def test_a_saved_folder_runs_as_remote_code_without_evit_hf(evit_folder, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)
    out = tmp_path / "out.pt"
    subprocess.run([sys.executable, "-c", REMOTE_SCRIPT, evit_folder, str(out)], cwd=tmp_path, env=env, check=True)
    result = torch.load(out)
    assert result["model"] == "EViTLlavaForConditionalGeneration"
    assert result["module"].startswith("transformers_modules")
    assert result["processor"] == "EViTLlavaProcessor"
    model = evit_hf.EViTLlavaForConditionalGeneration.from_pretrained(evit_folder).eval()
    with torch.no_grad():
        want = model(input_ids=result["input_ids"], pixel_values=_pixels_of(evit_folder)).logits
    torch.testing.assert_close(result["logits"], want)


def _pixels_of(folder):
    processor = evit_hf.EViTLlavaProcessor.from_pretrained(folder)
    return processor(images=_image(), text=PROMPT, return_tensors="pt")["pixel_values"]


def test_get_image_features_takes_a_keep_rate_per_call(evit_folder):
    model = AutoModelForImageTextToText.from_pretrained(evit_folder).eval()
    with torch.no_grad():
        features = model.get_image_features(tiny_pixels(), keep_rate=1.0).pooler_output
    assert [len(f) for f in features] == [64, 64]


def test_visualize_draws_the_towers_kept_patches_of_a_saved_folder(evit_folder, tmp_path):
    from evit_hf.cli import main
    from evit_hf.visualization import kept_token_panels

    image_path, output = tmp_path / "digit.png", tmp_path / "kept.png"
    Image.fromarray(_image(3)).save(image_path)
    main(["visualize", "--model", evit_folder, "--image", str(image_path), "--output", str(output)])
    drawn = Image.open(output)
    model = evit_hf.EViTLlavaForConditionalGeneration.from_pretrained(evit_folder)
    panels = kept_token_panels(model, _pixels_of(evit_folder)[0])
    assert [title for title, _ in panels] == ["input", "after layer 1", "after layer 2", "after layer 3"]
    assert drawn.width > 4 * drawn.height / 2  # four panels side by side


def test_the_model_card_says_what_was_reduced_and_by_how_much(evit_folder):
    model = evit_hf.EViTLlavaForConditionalGeneration.from_pretrained(evit_folder)
    card = str(evit_hf.create_model_card(model, "me/evit-llava"))
    assert "pipeline_tag: image-text-to-text" in card
    assert "AutoModelForImageTextToText" in card
    assert f"64 -> {evit_hf.num_image_tokens(model.config)}" in card
    assert "0.5" in card and "1, 2, 3" in card
