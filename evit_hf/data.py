"""Image datasets and transforms for fine-tuning, without torchvision."""

import math
import random

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features
from datasets import Image as ImageFeature
from PIL import Image


def digits_dataset(validation_fraction: float = 0.2, seed: int = 0) -> DatasetDict:
    """scikit-learn's bundled handwritten digits (1,797 real 8 x 8 images, 10 classes), offline, as a `DatasetDict`
    with "train" and "validation" splits (stratified), columns "image" (PIL, grayscale) and "label" (`ClassLabel`)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("The digits dataset comes with scikit-learn: pip install 'evit-hf[examples]'.") from error
    digits = load_digits()
    images = [Image.fromarray((image * (255.0 / 16.0)).round().astype(np.uint8), mode="L") for image in digits.images]
    labels = digits.target.tolist()
    rng = random.Random(seed)
    train_indices, validation_indices = [], []
    for label in range(10):  # stratified split
        indices = [i for i, value in enumerate(labels) if value == label]
        rng.shuffle(indices)
        cut = round(len(indices) * validation_fraction)
        validation_indices += indices[:cut]
        train_indices += indices[cut:]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=[str(d) for d in range(10)])})

    def split(indices):
        indices = sorted(indices)
        return Dataset.from_dict(
            {"image": [images[i] for i in indices], "label": [labels[i] for i in indices]}, features=features
        )

    return DatasetDict(train=split(train_indices), validation=split(validation_indices))


def processor_size(image_processor) -> tuple[int, int]:
    """(height, width) the image processor resizes to."""
    size = image_processor.size
    if "height" in size:
        return size["height"], size["width"]
    if "shortest_edge" in size:
        return size["shortest_edge"], size["shortest_edge"]
    raise ValueError(f"Cannot read an output size from the image processor's size {size}.")


def random_resized_crop(
    image: Image.Image, size: tuple[int, int], scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), rng=random
) -> Image.Image:
    """A random crop of random area share (`scale`) and aspect ratio (`ratio`), resized to `size` (height, width)."""
    width, height = image.size
    area = width * height
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        crop_width = round(math.sqrt(target_area * aspect))
        crop_height = round(math.sqrt(target_area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            left = rng.randint(0, width - crop_width)
            top = rng.randint(0, height - crop_height)
            box = (left, top, left + crop_width, top + crop_height)
            return image.resize((size[1], size[0]), Image.BILINEAR, box=box)
    return image.resize((size[1], size[0]), Image.BILINEAR)  # fall back to the whole image


def image_transforms(image_processor, image_column: str, crop_scale=(0.08, 1.0), random_flip: bool = True):
    """`set_transform` functions for training (random resized crop, optional horizontal flip) and evaluation (the
    processor's resize), both normalized by the image processor. They add "pixel_values" to the batch."""
    size = processor_size(image_processor)

    def train_transform(batch):
        images = []
        for image in batch[image_column]:
            image = random_resized_crop(image.convert("RGB"), size, scale=crop_scale)
            if random_flip and random.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            images.append(image)
        batch["pixel_values"] = list(image_processor(images, do_resize=False, return_tensors="pt").pixel_values)
        return batch

    def eval_transform(batch):
        images = [image.convert("RGB") for image in batch[image_column]]
        batch["pixel_values"] = list(image_processor(images, return_tensors="pt").pixel_values)
        return batch

    return train_transform, eval_transform


def collate_images(examples, label_column: str = "label") -> dict[str, torch.Tensor]:
    """Stacks "pixel_values" and the labels of a list of examples into a batch."""
    batch = {"pixel_values": torch.stack([example["pixel_values"] for example in examples])}
    if label_column in examples[0]:
        batch["labels"] = torch.tensor([example[label_column] for example in examples])
    return batch


__all__ = ["collate_images", "digits_dataset", "image_transforms", "processor_size", "random_resized_crop"]
