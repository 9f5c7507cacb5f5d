"""Tiny saved EViT folders of every family, with what pipelines need beside the weights: an image processor and, for
models with a text tower, a tokenizer that reads the tiny text tower's vocabulary."""

import string

from transformers import CLIPTokenizer

import evit_hf

from .model_builders import (
    FAMILY_TESTERS,
    IMAGE_MODEL_FAMILIES,
    TINY,
    TINY_CLIP_TEXT,
    builder_classes,
    has_text_tower,
    tiny_stock_model,
)


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer of single characters (letters, digits, "."; each also as a word end) whose start and end of
    text are the tiny text tower's ids: short prompts such as "a photo of a cat." fit its 16 positions."""
    pieces = [*string.ascii_lowercase, *string.digits, "."]
    vocab = {piece: index for index, piece in enumerate(pieces + [f"{piece}</w>" for piece in pieces])}
    vocab["<|startoftext|>"] = TINY_CLIP_TEXT["bos_token_id"]
    vocab["<|endoftext|>"] = TINY_CLIP_TEXT["eos_token_id"]
    assert len(vocab) <= TINY_CLIP_TEXT["vocab_size"]
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TINY_CLIP_TEXT["max_position_embeddings"])


def tiny_image_processor():
    """A `ViTImageProcessor` at the tiny models' size (mean and std 0.5)."""
    from evit_hf.visualization import default_image_processor

    return default_image_processor(evit_hf.EViTConfig(**TINY))


def builders_for(auto_class_name: str) -> list[tuple[str, str]]:
    """(family name, builder) for the first builder of each family whose EViT model `auto_class_name` loads."""
    found = []
    for family in IMAGE_MODEL_FAMILIES:
        models = family.auto_classes.get(auto_class_name, ())
        builder = next((b for b in FAMILY_TESTERS[family.name] if builder_classes(b)[1] in models), None)
        if builder is not None:
            found.append((family.name, builder))
    return found


def write_family_folder(builder: str, folder, keep_rate: float = 0.5, label_names=None):
    """Saves the EViT model of `builder` (random tiny weights, `keep_rate`) into `folder` with the tiny image processor
    and, where it has a text tower, the tiny tokenizer; returns the model, in eval mode."""
    model = evit_hf.apply_evit(tiny_stock_model(builder), keep_rate=keep_rate)
    if label_names is not None:
        model.config.id2label = dict(enumerate(label_names))
        model.config.label2id = {name: index for index, name in enumerate(label_names)}
    model.save_pretrained(folder)
    tiny_image_processor().save_pretrained(folder)
    if has_text_tower(builder):
        tiny_tokenizer().save_pretrained(folder)
    return model.eval()
