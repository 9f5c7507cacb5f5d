"""Image datasets and transforms for fine-tuning, without torchvision."""

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import datasets.config
import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features
from datasets import Image as ImageFeature
from datasets.utils import tqdm as hf_tqdm
from PIL import Image
from transformers import TrainerCallback
from transformers.utils import logging as transformers_logging

from .images import IMAGE_EXTENSIONS, load_rgb_image, to_rgb


logger = logging.getLogger(__name__)


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


# Part of every cached check result: raise it whenever the check finds other problems than before, so that results
# of an older check are not trusted.
IMAGE_CHECK_VERSION = 1
IMAGE_CHECK_CACHE_FOLDER = "evit_hf_image_checks"
# Images per task of the checking threads: few enough tasks for a million images, frequent progress updates.
IMAGE_CHECK_CHUNK = 64


@dataclass
class ImageFolderContents:
    """What `scan_image_folder` found: the readable images (sorted paths), their classes, and the skipped files."""

    folder: str
    images: list[str]
    classes: list[str]
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, why), skipped on request
    decoded: int = 0  # files this check decoded; the others were unchanged since a cached check

    @property
    def image_classes(self) -> list[str]:
        """The class of each image: the name of the sub-folder it was found in (a symbolic link keeps its own
        name)."""
        return [os.path.basename(os.path.dirname(path)) for path in self.images]


def _decode_error(path: str) -> str | None:
    """Why the image at `path` cannot be decoded, or None when it can. Every byte of the image data is read, so a
    truncated file fails here and not in the middle of training.

    JPEGs are decoded at an eighth of their size (`Image.draft`, the DCT scaling of libjpeg): the whole entropy-coded
    stream is still read, so truncated and corrupt files fail exactly as in a full decode, for under half the work."""
    if os.path.islink(path) and not os.path.exists(path):
        return f"a symbolic link to {os.readlink(path)}, which does not exist"
    try:
        with Image.open(path) as image:
            if image.format in ("JPEG", "MPO"):  # MPO: the multi-picture JPEGs of some cameras
                image.draft("L" if image.mode == "RGB" else image.mode, (1, 1))
            image.load()
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return f"{type(error).__name__}: {error}"
    return None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


@dataclass
class _FolderWalk:
    """The files under an image folder, by what they are to the `folder/CLASS/IMAGE` layout."""

    candidates: list[str] = field(default_factory=list)  # image files one level down, in class sub-folders
    misplaced: list[str] = field(default_factory=list)  # image files at the top or deeper than one level
    loops: list[tuple[str, str]] = field(default_factory=list)  # (link, the folder it leads back to)
    broken_links: list[tuple[str, str]] = field(default_factory=list)  # (link, missing target), at the top level
    unlisted: list[tuple[str, str]] = field(default_factory=list)  # (folder, why it cannot be read)


def _folder_identity(path: str) -> tuple[int, int]:
    status = os.stat(path)  # follows links: a linked folder is the folder it leads to
    return status.st_dev, status.st_ino


def _walk_image_folder(folder: str) -> _FolderWalk:
    """Every file under `folder`, following symbolic links to folders and files. A link that leads back to a folder
    it is in is a loop: it is recorded, not followed. Names are taken as they are (no pattern matching); hidden files
    and folders are left out."""
    walk = _FolderWalk()
    pending = [(folder, 0, frozenset({_folder_identity(folder)}))]
    while pending:
        directory, depth, ancestors = pending.pop()
        try:
            with os.scandir(directory) as scanned:
                entries = sorted(scanned, key=lambda entry: entry.name)
        except OSError as error:
            walk.unlisted.append((directory, _one_line(error)))
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                try:
                    identity = _folder_identity(entry.path)
                except OSError as error:
                    walk.unlisted.append((entry.path, _one_line(error)))
                    continue
                if identity in ancestors:
                    walk.loops.append((entry.path, os.path.realpath(entry.path)))
                else:
                    subfolders.append((entry.path, depth + 1, ancestors | {identity}))
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                (walk.candidates if depth == 1 else walk.misplaced).append(entry.path)
            elif depth == 0 and entry.is_symlink() and not os.path.exists(entry.path):
                walk.broken_links.append((entry.path, os.readlink(entry.path)))  # a class folder, perhaps
        pending.extend(reversed(subfolders))  # depth first, in name order
    return walk


def _loop_problems(walk: _FolderWalk) -> list[str]:
    """The link loops of a walk, as every check of an image folder reports them."""
    if not walk.loops:
        return []
    return [
        f"{len(walk.loops)} symbolic link loop(s) (links to a folder that holds them; remove them):\n"
        + "\n".join(f"  {link} -> {target}" for link, target in walk.loops)
    ]


def _unlisted_problem(walk: _FolderWalk) -> str:
    return f"{len(walk.unlisted)} folder(s) that cannot be listed (check their permissions):\n" + "\n".join(
        f"  {path}: {error}" for path, error in walk.unlisted
    )


def unlabeled_image_files(folder: str) -> list[str]:
    """The image files under `folder`, at any depth (a flat folder or one sub-folder per class: no labels are read),
    sorted by path, each image once: symbolic links to files and folders are followed, and a file reached again
    through another link or folder is not counted again. Link loops and folders that cannot be listed raise one
    `ValueError`, as `scan_image_folder` reports them; a folder without images gives an empty list."""
    if not os.path.isdir(folder):
        raise ValueError(f"{folder} is not a folder.")
    walk = _walk_image_folder(folder)
    problems = _loop_problems(walk) + ([_unlisted_problem(walk)] if walk.unlisted else [])
    if problems:
        raise ValueError(f"The image folder {folder} cannot be used as it is:\n" + "\n".join(problems))
    images, seen = [], set()
    for path in sorted(walk.candidates + walk.misplaced):
        real_path = os.path.realpath(path)
        if real_path not in seen:
            seen.add(real_path)
            images.append(path)
    return images


def image_check_cache_file(folder: str, cache_dir: str | None = None) -> str:
    """Where the results of checking the images of `folder` are cached: a JSON file per folder (by its real path)
    under `cache_dir`, by default the datasets cache (`datasets.config.HF_DATASETS_CACHE`)."""
    key = hashlib.sha256(os.path.realpath(folder).encode()).hexdigest()[:32]
    return os.path.join(cache_dir or datasets.config.HF_DATASETS_CACHE, IMAGE_CHECK_CACHE_FOLDER, f"{key}.json")


def _file_signature(path: str) -> tuple[int, int] | None:
    """(size, modification time in ns) of the file `path` leads to, or None where it cannot be read."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_size, status.st_mtime_ns


def _read_check_cache(cache_file: str, folder: str) -> dict[str, list]:
    """The cached results of an earlier check of `folder`: {path relative to the folder: [size, mtime_ns, error or
    None]}. A cache that cannot be read is ignored with a warning (every image is checked again)."""
    if not os.path.exists(cache_file):
        return {}
    try:
        with open(cache_file, encoding="utf-8") as handle:
            content = json.load(handle)
        files = content["files"]
        valid = (
            content["version"] == IMAGE_CHECK_VERSION
            and isinstance(files, dict)
            and all(
                isinstance(entry, list)
                and len(entry) == 3
                and all(isinstance(value, int) for value in entry[:2])
                and (entry[2] is None or isinstance(entry[2], str))
                for entry in files.values()
            )
        )
        if not valid:
            raise ValueError("not the results of this version's check")
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning(
            f"Ignoring the cached image check {cache_file} ({_one_line(error)}): every image of {folder} is checked "
            "again."
        )
        return {}
    return files if content.get("folder") == os.path.realpath(folder) else {}


def _write_check_cache(cache_file: str, folder: str, files: dict[str, list]) -> None:
    """Writes the check results of `folder` to `cache_file`, replacing it whole (a killed run leaves the old file or
    the new one, never half of one). A cache that cannot be written costs a warning, not the run."""
    temporary = f"{cache_file}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump({"version": IMAGE_CHECK_VERSION, "folder": os.path.realpath(folder), "files": files}, handle)
        os.replace(temporary, cache_file)
    except OSError as error:
        logger.warning(f"Cannot cache the image check of {folder} in {cache_file} ({_one_line(error)}).")
        with contextlib.suppress(OSError):
            os.remove(temporary)


def _decode_errors(paths: list[str], num_threads: int, description: str) -> list[str | None]:
    """`_decode_error` of every path, in threads (PIL decodes without holding the GIL), with a progress bar in
    images/s (quiet when not on a terminal, or where transformers' or datasets' progress bars are turned off)."""
    chunks = [paths[start : start + IMAGE_CHECK_CHUNK] for start in range(0, len(paths), IMAGE_CHECK_CHUNK)]
    errors = []
    show = transformers_logging.is_progress_bar_enabled()
    with (
        hf_tqdm(total=len(paths), unit=" images", desc=description, disable=None if show else True) as progress,
        ThreadPoolExecutor(max_workers=num_threads) as pool,
    ):
        for chunk_errors in pool.map(lambda chunk: [_decode_error(path) for path in chunk], chunks):
            errors += chunk_errors
            progress.update(len(chunk_errors))
    return errors


def check_images(
    folder: str, paths: list[str], num_threads: int | None = None, cache_dir: str | None = None, use_cache=True
) -> tuple[list[str | None], int]:
    """Why each image of `paths` (files under `folder`) cannot be decoded (None where it can), and how many were
    decoded: a file whose size and modification time are those of a cached check is not decoded again."""
    cache_file = image_check_cache_file(folder, cache_dir)
    cached = _read_check_cache(cache_file, folder) if use_cache else {}
    keys = [os.path.relpath(path, folder) for path in paths]
    signatures = [_file_signature(path) for path in paths]
    errors: list[str | None] = [None] * len(paths)
    to_decode = []
    for index, (key, signature) in enumerate(zip(keys, signatures, strict=True)):
        entry = cached.get(key)
        if signature is not None and entry is not None and tuple(entry[:2]) == signature:
            errors[index] = entry[2]
        else:
            to_decode.append(index)
    if to_decode:
        started = time.perf_counter()
        decoded = _decode_errors(
            [paths[index] for index in to_decode],
            num_threads or min(32, (os.cpu_count() or 1) + 4),
            description=f"Checking the images of {folder}",
        )
        seconds = max(time.perf_counter() - started, 1e-9)
        for index, error in zip(to_decode, decoded, strict=True):
            errors[index] = error
        logger.info(
            f"Checked {len(to_decode)} image(s) of {folder} in {seconds:.1f} s ({len(to_decode) / seconds:.0f} "
            f"images/s); {len(paths) - len(to_decode)} unchanged since the check cached in {cache_file}."
        )
    if use_cache and (to_decode or len(cached) != len(paths)):
        _write_check_cache(
            cache_file,
            folder,
            {
                key: [*signature, error]
                for key, signature, error in zip(keys, signatures, errors, strict=True)
                if signature is not None
            },
        )
    return errors, len(to_decode)


def scan_image_folder(
    folder: str,
    skip_unreadable: bool = False,
    num_threads: int | None = None,
    cache_dir: str | None = None,
    use_cache: bool = True,
) -> ImageFolderContents:
    """Checks a folder of images laid out as `folder/CLASS/IMAGE` and returns its contents, before any training.

    File and folder names are names, never patterns. Symbolic links to class folders and to images are followed (a
    class folder keeps the link's name); links that lead back to a folder that holds them are reported as loops.

    Every image is decoded (in `num_threads` threads), unless a cached check found it readable, or not, with the same
    size and modification time: the results are cached per file in `cache_dir` (default: the datasets cache), so
    that a rerun, a resume or an evaluation of the same folder decodes only what changed (`use_cache=False` decodes
    everything and caches nothing). All problems are reported together in one `ValueError`, each file by its path: a
    missing folder, images outside class sub-folders or nested deeper, link loops, folders that cannot be read,
    fewer than two classes, and files that do not decode. With `skip_unreadable`, files that do not decode are left
    out instead and listed in `unreadable`; a class left without images is then no class.

    Returns:
        [`ImageFolderContents`]
    """
    if not os.path.exists(folder):
        raise ValueError(f"The image folder {folder} does not exist.")
    if not os.path.isdir(folder):
        raise ValueError(f"{folder} is not a folder: expected a folder of class sub-folders ({folder}/CLASS/IMAGE).")
    walk = _walk_image_folder(folder)
    candidates = walk.candidates
    errors, decoded = check_images(
        folder, candidates, num_threads=num_threads, cache_dir=cache_dir, use_cache=use_cache
    )
    unreadable = [(path, error) for path, error in zip(candidates, errors, strict=True) if error is not None]
    images = [path for path, error in zip(candidates, errors, strict=True) if error is None]
    classes = sorted({os.path.basename(os.path.dirname(path)) for path in images})

    problems = []
    if walk.misplaced:
        problems.append(
            f"{len(walk.misplaced)} image(s) outside the {folder}/CLASS/IMAGE layout (each image belongs in a "
            "sub-folder named after its class, one level down):\n" + "\n".join(f"  {path}" for path in walk.misplaced)
        )
    problems += _loop_problems(walk)
    if walk.broken_links:
        problems.append(
            f"{len(walk.broken_links)} symbolic link(s) to nothing where class sub-folders belong (fix or remove "
            "them):\n" + "\n".join(f"  {link} -> {target} (does not exist)" for link, target in walk.broken_links)
        )
    if walk.unlisted:
        problems.append(_unlisted_problem(walk))
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
    return ImageFolderContents(folder=folder, images=images, classes=classes, unreadable=unreadable, decoded=decoded)


def image_folder_dataset(folders: dict[str, ImageFolderContents]) -> DatasetDict:
    """The checked image folders (`scan_image_folder`) as a `DatasetDict`, one split per folder, with the columns of
    `load_dataset("imagefolder")`: "image" (`datasets.Image`, read from the file's path) and "label" (`ClassLabel`).

    The dataset is built from the paths themselves, never from patterns, and every split shares one label space:
    the sorted class names of all folders, so that a class id means the same class in training and validation."""
    classes = sorted(set().union(*(contents.classes for contents in folders.values())))
    class_ids = {name: index for index, name in enumerate(classes)}
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=classes)})
    return DatasetDict(
        {
            split: Dataset.from_dict(
                {
                    "image": [os.path.abspath(path) for path in contents.images],
                    "label": [class_ids[name] for name in contents.image_classes],
                },
                features=features,
            )
            for split, contents in folders.items()
        }
    )


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
            image = random_resized_crop(to_rgb(image), size, scale=crop_scale, rng=rng)
            if random_flip and rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            images.append(image)
        batch["pixel_values"] = list(image_processor(images, do_resize=False, return_tensors="pt").pixel_values)
        return batch

    def eval_transform(batch):
        images = [to_rgb(image) for image in batch[image_column]]
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
    "check_images",
    "digits_dataset",
    "image_check_cache_file",
    "image_folder_dataset",
    "image_transforms",
    "load_rgb_image",
    "processor_size",
    "random_resized_crop",
    "scan_image_folder",
    "to_rgb",
    "with_sample_index",
]
