import copy

import pytest
import torch

import evit_hf
from evit_hf.families import PIPELINE_AUTO_CLASSES

from .model_builders import FAMILY_TESTERS, IMAGE_MODEL_FAMILIES, tiny_stock_model


ROWS = [
    {"keep_rate": 1.0, "accuracy": 0.9, "images_per_s": 100.0, "macs": 2.0e6},
    {"keep_rate": [0.9, 0.7, 0.5], "accuracy": 0.85, "images_per_s": 150.0, "macs": 1.2e6},
]


@pytest.mark.parametrize(
    "builder, pipeline_tag, auto_class",
    [
        ("vit-classifier", "image-classification", "AutoModelForImageClassification"),
        ("clip-classifier", "image-classification", "AutoModelForImageClassification"),
        ("dinov2-base", "image-feature-extraction", "AutoModel"),
        ("dinov3", "image-feature-extraction", "AutoModel"),
        ("clip", "zero-shot-image-classification", "AutoModelForZeroShotImageClassification"),
    ],
)
def test_the_card_names_the_task_and_auto_class_of_the_family(builder, pipeline_tag, auto_class):
    model = evit_hf.apply_evit(tiny_stock_model(builder))
    card = evit_hf.create_model_card(model, repo_id="user/tiny")
    assert card.data.pipeline_tag == pipeline_tag
    assert pipeline_tag in card.data.tags
    assert f'{auto_class}.from_pretrained("user/tiny"' in card.text
    assert f'pipeline("{pipeline_tag}"' in card.text
    assert type(model).__name__ in card.text


def test_per_layer_keep_rates_image_size_and_training_settings_are_recorded():
    model = evit_hf.apply_evit(
        tiny_stock_model("vit-classifier"), keep_rate=[0.9, 0.7, 0.5], reduction_layers=[1, 2, 3]
    )
    card = evit_hf.create_model_card(
        copy.deepcopy(model),
        repo_id="user/tiny",
        results=ROWS,
        training_settings={"distillation alpha": 0.5, "MACs matched to": "the stock model at 224 px"},
    )
    assert "| keep rate | 0.9 / 0.7 / 0.5 (one per reduction layer) |" in card.text
    assert "| reduction layers | 1, 2, 3 |" in card.text
    assert f"| input size | {model.config.image_size} px |" in card.text
    assert "| distillation alpha | 0.5 |" in card.text
    assert "| MACs matched to | the stock model at 224 px |" in card.text
    assert "| 0.9 / 0.7 / 0.5 | 85.00 |" in card.text
    # The row at the model's own (per-layer) keep rate is the headline of the metadata.
    assert [result.metric_value for result in card.data.eval_results] == [0.85]


ALL_BUILDERS = [(family, builder) for family in IMAGE_MODEL_FAMILIES for builder in FAMILY_TESTERS[family.name]]


@pytest.mark.parametrize("family, builder", ALL_BUILDERS, ids=[builder for _, builder in ALL_BUILDERS])
def test_every_model_of_the_table_gets_a_task_its_family_serves_and_an_auto_class_that_loads_it(family, builder):
    model = evit_hf.apply_evit(tiny_stock_model(builder))
    card = evit_hf.create_model_card(model, repo_id="user/tiny")
    assert card.data.pipeline_tag in family.pipelines
    auto_class = PIPELINE_AUTO_CLASSES[card.data.pipeline_tag]
    assert type(model) in family.auto_classes[auto_class]
    assert f'{auto_class}.from_pretrained("user/tiny"' in card.text


@pytest.mark.parametrize("builder", ["clip", "metaclip-2"])
def test_zero_shot_rows_are_reported_as_zero_shot_accuracy(builder):
    model = evit_hf.apply_evit(tiny_stock_model(builder), keep_rate=0.5)
    rows = [dict(row, keep_rate=rate, accuracy_kind="zero-shot") for row, rate in zip(ROWS, (1.0, 0.5), strict=True)]
    rows[1]["top5_accuracy"] = 0.95
    card = evit_hf.create_model_card(model, repo_id="user/tiny", results=rows)
    assert card.data.pipeline_tag == "zero-shot-image-classification"
    assert "| keep rate | zero-shot accuracy | zero-shot top-5 | images/s | MACs |" in card.text
    assert 'the prompt "a photo of a {label}." with its label name' in card.text  # how it was measured
    results = card.data.eval_results
    assert [(r.task_type, r.metric_name, r.metric_value) for r in results] == [
        ("zero-shot-image-classification", "zero-shot accuracy", 0.85),
        ("zero-shot-image-classification", "zero-shot top-5 accuracy", 0.95),
    ]


@pytest.mark.parametrize("builder", ["vit-classifier", "dinov2-base", "clip"], ids=lambda builder: builder)
def test_the_cards_use_snippet_runs_on_the_saved_folder(builder, tmp_path):
    # The card's "Use" code, as a reader would paste it, on the folder the card is saved with (remote code).
    import re

    from PIL import Image

    from .family_folders import write_family_folder

    folder = tmp_path / "model"
    if builder == "clip":  # a text tower long enough for the card's prompts, and the processor's own file
        from transformers import AutoImageProcessor, CLIPConfig, CLIPModel, CLIPProcessor

        from .family_folders import tiny_image_processor, tiny_tokenizer
        from .model_builders import TINY_CLIP_TEXT, TINY_CLIP_VISION

        text = dict(TINY_CLIP_TEXT, max_position_embeddings=64)
        config = CLIPConfig(text_config=text, vision_config=TINY_CLIP_VISION, projection_dim=16)
        model = evit_hf.apply_evit(CLIPModel(config).eval(), keep_rate=0.7)
        model.save_pretrained(folder)
        tiny_image_processor().save_pretrained(folder)
        CLIPProcessor(AutoImageProcessor.from_pretrained(folder), tiny_tokenizer()).save_pretrained(folder)
    else:
        model = write_family_folder(builder, folder, keep_rate=0.7)
    card = evit_hf.create_model_card(model, repo_id=str(folder))
    snippet = re.search(r"## Use\n\n```python\n(.*?)```", card.text, re.DOTALL).group(1)
    namespace = {"image": Image.effect_noise((40, 36), 40).convert("RGB")}
    exec(snippet, namespace)
    output = namespace.get("logits", namespace.get("features", namespace.get("probabilities")))
    assert output is not None and torch.isfinite(output).all()
    if builder == "clip":
        assert namespace["task"](namespace["image"], candidate_labels=["cat", "dog"])[0]["label"] in ("cat", "dog")
