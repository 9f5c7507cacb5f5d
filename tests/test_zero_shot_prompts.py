"""Zero-shot evaluation refuses a tokenizer that cannot tell the classes apart, naming the labels concerned: prompts
that become the same tokens (cut at the tokenizer's length, or made of words it does not know), and a "tokenizer"
that tokenizes nothing (what `AutoProcessor` gives for a folder without tokenizer files). Refused in one line before
any image is read."""

import pytest
import torch
from transformers import AutoProcessor

import evit_hf
from evit_hf.evaluation import evaluate_keep_rates, zero_shot_text_embeddings

from .family_folders import tiny_image_processor, tiny_tokenizer
from .model_builders import tiny_stock_model


class UntouchableDataset(torch.utils.data.Dataset):
    """Fails the test if anything reads it: refusals come before any work."""

    def __len__(self):
        raise AssertionError("the dataset was read")

    def __getitem__(self, index):
        raise AssertionError("the dataset was read")


@pytest.fixture(scope="module")
def clip():
    return evit_hf.apply_evit(tiny_stock_model("clip")).eval()


# The tiny tokenizer holds 16 tokens, one per character: "a photo of a " takes 13 of them with the start of text.
ALIKE = {
    "cut-at-the-tokenizers-length": (["cat", "elephant", "elephants"], "'elephant', 'elephants'", "cut at 16 tokens"),
    "words-the-tokenizer-does-not-know": (["cat", "猫", "犬"], "'猫', '犬'", "unknown token"),
    "the-same-label-twice": (["cat", "dog", "cat"], "'cat', 'cat'", "the same tokens"),
}


@pytest.mark.parametrize("labels, named, why", ALIKE.values(), ids=ALIKE.keys())
def test_classes_whose_prompts_tokenize_alike_are_refused_naming_them(clip, labels, named, why):
    with pytest.raises(ValueError) as error:
        evaluate_keep_rates(clip, UntouchableDataset(), progress=False, tokenizer=tiny_tokenizer(), label_names=labels)
    message = str(error.value)
    assert "\n" not in message
    assert f"turns the class prompts of labels {named} into the same tokens" in message and why in message
    assert "'cat', 'elephant'" not in message and "cannot tell these classes apart" in message


def test_a_folder_without_tokenizer_files_is_refused_by_name(clip, tmp_path):
    clip.save_pretrained(tmp_path)
    tiny_image_processor().save_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)  # no tokenizer files: an image processor alone
    with pytest.raises(ValueError) as error:
        evaluate_keep_rates(clip, UntouchableDataset(), progress=False, tokenizer=processor, label_names=["a", "b"])
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"tokenizer= ({type(processor).__name__}) does not tokenize the class prompts (")
    assert "a folder that holds its tokenizer files" in message


def test_prompts_that_differ_give_one_embedding_per_class(clip):
    embeddings = zero_shot_text_embeddings(clip, tiny_tokenizer(), ["cat", "dog", "car"])
    assert embeddings.shape[0] == 3 and torch.allclose(embeddings.norm(dim=-1), torch.ones(3))
    # Prompts that differ only after padding is removed still differ: "car" and "cars" are not alike.
    assert zero_shot_text_embeddings(clip, tiny_tokenizer(), ["car", "cars"]).shape[0] == 2
