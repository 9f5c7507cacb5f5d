"""Model cards for EViT checkpoints, rendered from `model_cards/` with `huggingface_hub.ModelCard`."""

from importlib import resources
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData


def default_template_path() -> Path:
    """model_cards/evit_model_card.md: shipped in the package as `evit_hf.model_cards`, or next to it in a checkout."""
    try:
        path = Path(str(resources.files("evit_hf.model_cards") / "evit_model_card.md"))
        if path.is_file():
            return path
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parent.parent / "model_cards" / "evit_model_card.md"


def create_model_card(
    model,
    repo_id: str,
    base_model: str | None = None,
    dataset_name: str | None = None,
    dataset_id: str | None = None,
    results: list[dict] | None = None,
    results_note: str = "",
    template_path: str | Path | None = None,
) -> ModelCard:
    """A model card for an EViT model: YAML metadata (library, base model, dataset, tags, metrics with their values)
    and a body with the EViT settings, an accuracy and speed table per keep rate, and the citation.

    Args:
        model: the EViT model.
        repo_id (`str`): the Hub repository (or folder name) the card describes.
        base_model (`str`, *optional*): the Hub id the model was fine-tuned from.
        dataset_name (`str`, *optional*): a readable dataset name; `dataset_id` its Hub id, if any.
        results (`list[dict]`, *optional*): rows of `evaluate_keep_rates`; the row at the model's keep rate is the
            one reported in the metadata.
        results_note (`str`, *optional*): a paragraph under the table (how the numbers were measured).
        template_path (*optional*): another template.
    """
    from .evaluation import results_markdown

    template_path = Path(template_path or default_template_path())
    if not template_path.is_file():
        raise FileNotFoundError(f"Model card template not found at {template_path}; pass template_path=...")
    config = model.config
    eval_results = None
    headline = next((row for row in results or [] if row["keep_rate"] == config.keep_rate), None)
    if headline is not None:
        eval_results = [
            EvalResult(
                task_type="image-classification",
                dataset_type=dataset_id or dataset_name or "custom",
                dataset_name=dataset_name or dataset_id or "custom",
                metric_type=name,
                metric_value=headline[name],
            )
            for name in ("accuracy", "top5_accuracy")
            if name in headline
        ]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        license="apache-2.0",
        base_model=base_model,
        datasets=[dataset_id] if dataset_id else None,
        metrics=["accuracy"] + (["top5_accuracy"] if headline and "top5_accuracy" in headline else []),
        tags=["evit", "image-classification", "vision", "token-reorganization"],
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results,
    )
    image_size = config.image_size
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        architecture=type(model).__name__,
        base_model=base_model,
        dataset_name=dataset_name,
        keep_rate=config.keep_rate,
        reduction_layers=", ".join(str(layer) for layer in config.reduction_layers),
        fuse_inattentive_tokens=config.fuse_inattentive_tokens,
        image_size=image_size if isinstance(image_size, int) else "x".join(map(str, image_size)),
        results_table=results_markdown(results) if results else "Not evaluated.",
        results_note=results_note,
    )


__all__ = ["create_model_card"]
