"""Image datasets and transforms for fine-tuning, without torchvision."""

import math
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features
from datasets import Image as ImageFeature
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from PIL import Image
from transformers import TrainerCallback


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


# The file types `datasets`' imagefolder loader reads as images; other files in a folder are not part of the data.
IMAGE_EXTENSIONS = frozenset(ImageFolder.EXTENSIONS)


@dataclass
class ImageFolderContents:
    """What `scan_image_folder` found: the readable images (sorted paths), their classes, and the skipped files."""

    folder: str
    images: list[str]
    classes: list[str]
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, why), skipped on request


def _decode_error(path: str) -> str | None:
    """Why the image at `path` cannot be decoded, or None when it can (every pixel is read, so a truncated file fails
    here and not in the middle of training)."""
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return f"{type(error).__name__}: {error}"
    return None


def scan_image_folder(folder: str, skip_unreadable: bool = False, num_threads: int | None = None):
    """Checks a folder of images laid out as `folder/CLASS/IMAGE` and returns its contents, before any training.

    Every image is opened and decoded (in `num_threads` threads; PIL decodes without holding the GIL). All problems
    are reported together in one `ValueError`, each file by its path: a missing folder, images outside class
    sub-folders or nested deeper, fewer than two classes, and files that do not decode. With `skip_unreadable`, files
    that do not decode are left out instead and listed in `unreadable`.

    Returns:
        [`ImageFolderContents`]
    """
    if not os.path.exists(folder):
        raise ValueError(f"The image folder {folder} does not exist.")
    if not os.path.isdir(folder):
        raise ValueError(f"{folder} is not a folder: expected a folder of class sub-folders ({folder}/CLASS/IMAGE).")
    candidates, misplaced = [], []
    for root, directories, names in os.walk(folder):
        directories[:] = sorted(name for name in directories if not name.startswith("."))
        depth = os.path.relpath(root, folder).count(os.sep) + (root != folder)
        for name in sorted(names):
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            (candidates if depth == 1 else misplaced).append(os.path.join(root, name))

    with ThreadPoolExecutor(max_workers=num_threads or min(32, (os.cpu_count() or 1) + 4)) as pool:
        errors = list(pool.map(_decode_error, candidates))
    unreadable = [(path, error) for path, error in zip(candidates, errors, strict=True) if error is not None]
    images = [path for path, error in zip(candidates, errors, strict=True) if error is None]
    classes = sorted({os.path.basename(os.path.dirname(path)) for path in images})

    problems = []
    if misplaced:
        problems.append(
            f"{len(misplaced)} image(s) outside the {folder}/CLASS/IMAGE layout (each image belongs in a sub-folder "
            "named after its class, one level down):\n" + "\n".join(f"  {path}" for path in misplaced)
        )
    if len(classes) < 2:
        found = f"one class ({classes[0]!r})" if classes else "no class sub-folder with a readable image"
        problems.append(
            f"{folder} holds {found}; image classification needs at least two classes, one sub-folder each "
            f"({folder}/CLASS/IMAGE)."
        )
    if unreadable and not skip_unreadable:
        problems.append(
            f"{len(unreadable)} file(s) that do not decode as images (repair or remove them, or skip them with "
            "--skip_unreadable_images):\n" + "\n".join(f"  {path}: {error}" for path, error in unreadable)
        )
    if problems:
        raise ValueError(f"The image folder {folder} cannot be used as it is:\n" + "\n".join(problems))
    return ImageFolderContents(folder=folder, images=images, classes=classes, unreadable=unreadable)


def processor_size(image_processor) -> tuple[int, int]:
    """(height, width) of the images the image processor returns: its crop where it center-crops (resize the shorter
    side to 256, crop 224: the model sees 224), else its resize."""
    if getattr(image_processor, "do_center_crop", False) and getattr(image_processor, "crop_size", None):
        return image_processor.crop_size["height"], image_processor.crop_size["width"]
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


SAMPLE_INDEX_COLUMN = "sample_index"


class AugmentationRandomness(TrainerCallback):
    """The random numbers of the training augmentation, drawn per sample from `(seed, epoch, sample index)`.

    Drawing from a global generator makes the augmentation of a sample depend on everything fetched before it: a
    resumed run skips batches, and the data loader fetches ahead of the step that saves a checkpoint, so the random
    state saved in a checkpoint is already past the next batch. Per-sample generators give every sample the same crop
    and flip in an interrupted and resumed run as in an uninterrupted one, whatever was skipped or prefetched.

    Pass it to `Trainer(callbacks=[...])`: it follows the epoch (`on_epoch_begin`), in a shared-memory counter that
    data-loader workers see too.

    Args:
        seed (`int`):
            The run's seed (`TrainingArguments.seed`).
    """

    def __init__(self, seed: int):
        self.seed = seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def generator(self, sample_index: int) -> random.Random:
        """A generator of its own for `sample_index` in the current epoch (string seeds are hashed with SHA-512, the
        same in every process)."""
        return random.Random(f"{self.seed}:{self.epoch}:{sample_index}")

    def on_epoch_begin(self, args, state, control, **kwargs):
        # `state.epoch` is the epochs done so far (fractional when resuming inside an epoch).
        self.set_epoch(math.floor(state.epoch))


def with_sample_index(dataset: Dataset) -> Dataset:
    """`dataset` with a `sample_index` column (0, 1, ...) that the training transform seeds each sample's
    augmentation with."""
    if SAMPLE_INDEX_COLUMN in dataset.column_names:
        dataset = dataset.remove_columns(SAMPLE_INDEX_COLUMN)
    return dataset.add_column(SAMPLE_INDEX_COLUMN, list(range(len(dataset))))


def image_transforms(
    image_processor,
    image_column: str,
    crop_scale=(0.08, 1.0),
    random_flip: bool = True,
    randomness: AugmentationRandomness | None = None,
):
    """`set_transform` functions for training (random resized crop, optional horizontal flip) and evaluation (the
    processor's resize), both normalized by the image processor. They add "pixel_values" to the batch.

    With `randomness`, the training transform reads the `sample_index` column (see `with_sample_index`) and draws each
    sample's crop and flip from its own generator, so that interrupted runs resume exactly; without it, from Python's
    global generator.
    """
    size = processor_size(image_processor)

    def train_transform(batch):
        if randomness is None:
            generators = [random] * len(batch[image_column])
        else:
            if SAMPLE_INDEX_COLUMN not in batch:
                raise ValueError(
                    f"Per-sample augmentation needs a {SAMPLE_INDEX_COLUMN!r} column: pass the training set through "
                    "evit_hf.data.with_sample_index before set_transform."
                )
            generators = [randomness.generator(index) for index in batch[SAMPLE_INDEX_COLUMN]]
        images = []
        for image, rng in zip(batch[image_column], generators, strict=True):
            image = random_resized_crop(image.convert("RGB"), size, scale=crop_scale, rng=rng)
            if random_flip and rng.random() < 0.5:
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


__all__ = [
    "AugmentationRandomness",
    "ImageFolderContents",
    "collate_images",
    "digits_dataset",
    "image_transforms",
    "processor_size",
    "random_resized_crop",
    "scan_image_folder",
    "with_sample_index",
]
