"""Model cards for EViT checkpoints, rendered from `model_cards/` with `huggingface_hub.ModelCard`."""

from importlib import resources
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .configuration_evit_base import vision_config_of


MODEL_CARD_TEMPLATE = "evit_model_card.md"  # models this project trains, calibrates or converts in place
CONVERSION_CARD_TEMPLATE = "converted_checkpoint_card.md"  # checkpoints of the reference code (`evit-hf convert`)


def default_template_path(name: str = MODEL_CARD_TEMPLATE) -> Path:
    """A template of `model_cards/`: shipped in the package as `evit_hf.model_cards`, or next to it in a checkout."""
    try:
        path = Path(str(resources.files("evit_hf.model_cards") / name))
        if path.is_file():
            return path
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parent.parent / "model_cards" / name


def _pipeline_and_auto_class(model) -> tuple[str, str]:
    """The pipeline task and Auto class of `model`, from its family's record (`evit_hf.FAMILIES`): the first task of
    `PIPELINE_AUTO_CLASSES` that the family serves and whose Auto class loads the model's class."""
    from .families import IMAGE_FEATURE_EXTRACTION, PIPELINE_AUTO_CLASSES, family_for_model

    family = family_for_model(model)
    for pipeline, auto_class in PIPELINE_AUTO_CLASSES.items():
        if (
            family is not None
            and pipeline in family.pipelines
            and type(model) in family.auto_classes.get(auto_class, ())
        ):
            return pipeline, auto_class
    return IMAGE_FEATURE_EXTRACTION, PIPELINE_AUTO_CLASSES[IMAGE_FEATURE_EXTRACTION]


# What the metadata calls each accuracy of zero-shot rows (the metric is the same; its name says how it was measured).
_ZERO_SHOT_METRIC_NAMES = {"accuracy": "zero-shot accuracy", "top5_accuracy": "zero-shot top-5 accuracy"}


def _zero_shot_note(prompt: str) -> str:
    return (
        f'Zero-shot accuracy: each class is the prompt "{prompt}" with its label name, embedded once by the text '
        "tower; an image gets the class whose embedding is nearest (cosine) to the image's, from the vision tower at "
        "the row's keep rate. No classifier was trained."
    )


def create_model_card(
    model,
    repo_id: str,
    base_model: str | None = None,
    dataset_name: str | None = None,
    dataset_id: str | None = None,
    results: list[dict] | None = None,
    results_note: str = "",
    template_path: str | Path | None = None,
    training_settings: dict | None = None,
    zero_shot_prompt: str = "a photo of a {label}.",
) -> ModelCard:
    """A model card for an EViT model: YAML metadata (library, pipeline, base model, dataset, tags, metrics with their
    values) and a body with the EViT settings, an accuracy and speed table per keep rate, and the citation.

    Args:
        model: the EViT model, of any family; its family's record gives the pipeline task and the Auto class.
        repo_id (`str`): the Hub repository (or folder name) the card describes.
        base_model (`str`, *optional*): the Hub id the model was fine-tuned from.
        dataset_name (`str`, *optional*): a readable dataset name; `dataset_id` its Hub id, if any.
        results (`list[dict]`, *optional*): rows of `evaluate_keep_rates`; the row at the model's keep rate is the
            one reported in the metadata (zero-shot rows as zero-shot image classification, named so).
        results_note (`str`, *optional*): a paragraph under the table (how the numbers were measured); for zero-shot
            rows it defaults to how zero-shot accuracy is measured, with `zero_shot_prompt`.
        template_path (*optional*): another template.
        training_settings (`dict`, *optional*): more rows of the settings table, such as the distillation weight
            and temperature, or the image size a budget was matched at (`{"distillation alpha": 0.5}`).
        zero_shot_prompt (`str`, *optional*): the prompt zero-shot rows were measured with.
    """
    from .evaluation import ZERO_SHOT, format_keep_rate, results_markdown
    from .families import ZERO_SHOT_IMAGE_CLASSIFICATION

    template_path = Path(template_path or default_template_path())
    if not template_path.is_file():
        raise FileNotFoundError(f"Model card template not found at {template_path}; pass template_path=...")
    config = vision_config_of(model.config)
    pipeline_tag, auto_class = _pipeline_and_auto_class(model)
    eval_results = None
    headline = next((row for row in results or [] if row["keep_rate"] == config.keep_rate), None)
    if headline is not None:
        zero_shot = headline.get("accuracy_kind") == ZERO_SHOT
        eval_results = [
            EvalResult(
                task_type=ZERO_SHOT_IMAGE_CLASSIFICATION if zero_shot else pipeline_tag,
                dataset_type=dataset_id or dataset_name or "custom",
                dataset_name=dataset_name or dataset_id or "custom",
                metric_type=name,
                metric_value=headline[name],
                metric_name=_ZERO_SHOT_METRIC_NAMES[name] if zero_shot else None,
            )
            for name in ("accuracy", "top5_accuracy")
            if name in headline
        ]
    if not results_note and any(row.get("accuracy_kind") == ZERO_SHOT for row in results or []):
        results_note = _zero_shot_note(zero_shot_prompt)
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        license="apache-2.0",
        base_model=base_model,
        datasets=[dataset_id] if dataset_id else None,
        metrics=["accuracy"] + (["top5_accuracy"] if headline and "top5_accuracy" in headline else []),
        tags=["evit", pipeline_tag, "vision", "token-reorganization"],
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results,
    )
    image_size = config.image_size
    training_settings = dict(training_settings or {})
    if hasattr(model.config, "image_feature_count"):  # vision-language models: what the language model reads
        training_settings.setdefault(
            "image tokens per image (stock -> EViT)",
            f"{model.config.image_feature_count(keep_rate=1.0)} -> {model.config.image_feature_count()}",
        )
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        architecture=type(model).__name__,
        base_model=base_model,
        dataset_name=dataset_name,
        keep_rate=format_keep_rate(config.keep_rate),
        per_layer_keep_rates=isinstance(config.keep_rate, list),
        pipeline_tag=pipeline_tag,
        auto_class=auto_class,
        training_settings=dict(training_settings or {}),
        reduction_layers=", ".join(str(layer) for layer in config.reduction_layers),
        fuse_inattentive_tokens=config.fuse_inattentive_tokens,
        image_size=image_size if isinstance(image_size, int) else "x".join(map(str, image_size)),
        results_table=results_markdown(results) if results else "Not evaluated.",
        results_note=results_note,
    )


def create_conversion_model_card(
    model, repo_id: str, source: str, source_kind: str, resize: int, origins: dict[str, str]
) -> ModelCard:
    """The card of a checkpoint converted from the reference code (`model_cards/converted_checkpoint_card.md`): the
    EViT settings and the architecture with where each came from (`origins`: `keep_rate_from`,
    `reduction_layers_from`, `fuse_from`, `heads_from`, `labels_from`), the reference's evaluation transform (shorter
    side resized to `resize` px) and how to load it."""
    config = model.config
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=["evit", "image-classification", "vision", "token-reorganization", "timm-conversion"],
        model_name=repo_id,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(default_template_path(CONVERSION_CARD_TEMPLATE)),
        model_name=repo_id,
        repo_id=repo_id,
        architecture=type(model).__name__,
        source=source,
        source_kind=source_kind,
        keep_rate=config.keep_rate,
        reduction_layers=", ".join(str(layer) for layer in config.reduction_layers),
        fuse=config.fuse_inattentive_tokens,
        image_size=config.image_size,
        resize=resize,
        hidden_size=config.hidden_size,
        depth=config.num_hidden_layers,
        heads=config.num_attention_heads,
        num_labels=config.num_labels,
        **origins,
    )


__all__ = ["create_conversion_model_card", "create_model_card"]
