"""The fine-tuning machinery of `examples/run_image_classification.py`, as a library: the arguments shared by the
examples, model and label loading for every family with an image classifier, the EViT settings of a run, and the
teardown and publishing helpers for users' own `Trainer` scripts.

- `ModelArguments`, `DataTrainingArguments`: the `HfArgumentParser` dataclasses of the checkpoint, EViT settings and
  data (the evaluation example reuses them); `check_model_arguments` / `check_data_arguments` refuse values no run
  can use, before any model loads.
- `evit_class_for`, `evit_classifier_config`, `load_evit_classifier`: a checkpoint of any family with an image
  classifier (stock or EViT, a classifier, base model or CLIP-style vision tower) as the family's EViT classifier.
  An EViT folder's own reduction layers and keep rates are the default (`default_keep_rate`).
- `load_data`, `load_image_folders`, `label_names`, `head_label_mismatch`: the data and its labels.
- `run_settings`: the settings recorded in every checkpoint (see `evit_hf.checkpoints`).
- `leave_process_group(trainer)`: the end of a multi-process `Trainer` run that cannot hang.
- `published_files`, `publish`: what a model folder uploads to the Hub.
"""

import copy
import gc
import json
import logging
import os
import sys
import weakref
from dataclasses import dataclass, field

import torch
from datasets import ClassLabel, load_dataset
from huggingface_hub import HfApi
from huggingface_hub.utils import filter_repo_objects
from transformers import AutoConfig, PreTrainedModel, Trainer

from .configuration_evit_base import check_keep_rate, vision_config_of
from .data import digits_dataset, image_folder_dataset, processor_size, scan_image_folder
from .distillation import check_distillation_settings
from .families import FAMILIES, family_for_model_type
from .macs import count_macs
from .messages import one_line
from .planning import keep_rate_for_macs
from .resolution import resize_position_embeddings
from .visualization import load_image_processor_or_default


logger = logging.getLogger(__name__)

# Files a published folder holds: weights as safetensors, configs, remote code, the card and its figures; never the
# pickles Trainer writes (training_args.bin, optimizer.pt) nor the intermediate checkpoints.
PUBLISHED_PATTERNS = ["*.safetensors", "*.json", "*.py", "README.md", "*.png"]

UNPUBLISHED_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "runs/**", "*.bin", "*.pt", "*.pth", "*.pkl"]

# The keep rate of a run that names none (the paper's).
DEFAULT_KEEP_RATE = 0.7

# The Auto class whose models this script fine-tunes; a family's first model under it is the one trained.
CLASSIFIER_AUTO_CLASS = "AutoModelForImageClassification"


@dataclass
class ModelArguments:
    """Which checkpoint to start from, and the EViT settings."""

    model_name_or_path: str = field(
        metadata={
            "help": "Hub id or folder of a checkpoint of a family with an image classifier (ViT, DeiT, CLIP, "
            "MetaCLIP 2, DINOv2, stock or EViT; a base model or CLIP vision tower gets a new head)."
        }
    )
    keep_rate: list[float] | None = field(
        default=None,
        metadata={
            "help": "Share of tokens each reduction layer keeps: one rate for all, or one per reduction layer, "
            "paired with --reduction_layers as written (--keep_rate 0.9 0.7 0.5). Default: an EViT checkpoint's "
            f"own rates (and reduction layers), else {DEFAULT_KEEP_RATE}."
        },
    )
    reduction_layers: list[int] | None = field(
        default=None, metadata={"help": "0-based reduction layers (default: the checkpoint's, or the paper's)."}
    )
    fuse_inattentive_tokens: bool = field(
        default=True, metadata={"help": "Fuse the tokens that are not kept into one (--no_fuse_inattentive_tokens)."}
    )
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "Input side in pixels (default: the checkpoint's): the image processor resizes and crops to it "
            "and the position embeddings are resized once (evit_hf.resolution.resize_position_embeddings)."
        },
    )
    match_macs_of_image_size: int | None = field(
        default=None,
        metadata={
            "help": "Choose the largest keep rate whose MACs at --image_size do not exceed the unreduced model's at "
            "this size (the paper's higher resolution at equal cost); instead of --keep_rate."
        },
    )
    keep_rate_warmup: float = field(
        default=0.0, metadata={"help": "Span (see keep_rate_schedule_unit) during which every token is kept."}
    )
    keep_rate_shrink: float = field(
        default=0.0, metadata={"help": "Span of the cosine from keep rate 1 down to keep_rate, after the warm-up."}
    )
    keep_rate_schedule_unit: str = field(
        default="epoch", metadata={"help": "Unit of the warm-up and shrink spans: 'epoch' or 'step'."}
    )
    image_processor_name: str | None = field(
        default=None, metadata={"help": "Image processor, if not the checkpoint's own."}
    )
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Start a new head when the checkpoint's labels differ from the dataset's."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache Hub downloads."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the checkpoint."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the stored login)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow remote code in the checkpoint."})

    def __post_init__(self):
        # The command line gives a list (one rate or one per layer), a JSON file a number or a list: one rate is a
        # number, so that it applies to every reduction layer.
        if isinstance(self.keep_rate, (list, tuple)) and len(self.keep_rate) == 1:
            self.keep_rate = self.keep_rate[0]
        elif isinstance(self.keep_rate, tuple):
            self.keep_rate = list(self.keep_rate)

    @property
    def target_keep_rate(self) -> float | list[float]:
        """The keep rate this run trains for: --keep_rate, the one --match_macs_of_image_size chose, or the default."""
        return DEFAULT_KEEP_RATE if self.keep_rate is None else self.keep_rate


@dataclass
class DataTrainingArguments:
    """Which data to train and evaluate on. With no dataset argument, scikit-learn's bundled digits."""

    dataset_name: str | None = field(default=None, metadata={"help": "A dataset on the Hub."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration."})
    train_dir: str | None = field(default=None, metadata={"help": "A folder of training images (imagefolder)."})
    validation_dir: str | None = field(default=None, metadata={"help": "A folder of validation images."})
    train_val_split: float = field(
        default=0.15,
        metadata={
            "help": "Share of the training split held out for validation when there is no validation split, in "
            "[0, 1); 0 holds nothing out (no validation split)."
        },
    )
    image_column_name: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "Column holding the labels."})
    skip_unreadable_images: bool = field(
        default=False,
        metadata={"help": "Leave out image files that do not decode (listed in the log) instead of stopping."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set."})
    crop_scale_min: float = field(
        default=0.08, metadata={"help": "Smallest area share of the random resized crop (training augmentation)."}
    )
    random_flip: bool = field(default=True, metadata={"help": "Random horizontal flips (--no_random_flip)."})
    card_keep_rates: list[float] = field(
        default_factory=lambda: [1.0, 0.9, 0.7, 0.5],
        metadata={"help": "Keep rates in the model card's accuracy and speed table (the target is added)."},
    )
    dataset_display_name: str | None = field(default=None, metadata={"help": "Dataset name for the model card."})


@dataclass
class DistillationArguments:
    """Distillation from the unreduced starting model (evit_hf.distillation.DistillationTrainer)."""

    distillation_alpha: float = field(
        default=0.0,
        metadata={
            "help": "Weight in [0, 1] of the KL divergence to the frozen, unreduced starting checkpoint in the "
            "training loss (0: plain fine-tuning)."
        },
    )
    distillation_temperature: float = field(
        default=1.0, metadata={"help": "Softmax temperature of the teacher's and the student's distributions (> 0)."}
    )


def check_data_arguments(data_args: DataTrainingArguments) -> None:
    """Refuses sample counts and a split share that no run can use, with one line naming the flag."""
    for flag, value in (
        ("--max_train_samples", data_args.max_train_samples),
        ("--max_eval_samples", data_args.max_eval_samples),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1 (leave it out to use the whole split); got {value}.")
    if not 0 <= data_args.train_val_split < 1:
        raise ValueError(
            "--train_val_split is the share of the training split held out for validation: it must be in [0, 1) "
            f"(0: no validation split); got {data_args.train_val_split}."
        )
    for rate in data_args.card_keep_rates:
        keep_rate_flag_check("--card_keep_rates", rate)


def keep_rate_flag_check(flag: str, keep_rate):
    """`check_keep_rate(keep_rate)` (the configurations' own check) with `flag` named in its one-line refusal."""
    try:
        return check_keep_rate(keep_rate)
    except ValueError as error:
        raise ValueError(f"{flag}: {error}") from None


def check_model_arguments(model_args: ModelArguments) -> None:
    """Refuses image sizes and a keep-rate choice that no run can use, with one line naming the flag."""
    for flag, value in (
        ("--image_size", model_args.image_size),
        ("--match_macs_of_image_size", model_args.match_macs_of_image_size),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{flag} is an image side in pixels and must be at least 1; got {value}.")
    if model_args.match_macs_of_image_size is not None and model_args.keep_rate is not None:
        raise ValueError(
            f"--match_macs_of_image_size {model_args.match_macs_of_image_size} chooses the keep rate, and --keep_rate "
            f"{model_args.keep_rate} names one: pass only one of them."
        )
    if model_args.keep_rate is not None:
        keep_rate_flag_check("--keep_rate", model_args.keep_rate)
        if isinstance(model_args.keep_rate, list) and model_args.reduction_layers is not None:
            try:
                check_keep_rate(model_args.keep_rate, model_args.reduction_layers)
            except ValueError as error:
                raise ValueError(f"--keep_rate with --reduction_layers: {error}") from None


def own_keep_rate(checkpoint_config):
    """The keep rate (one, or one per reduction layer) an EViT checkpoint was saved with; None for a stock one."""
    return getattr(vision_config_of(checkpoint_config), "keep_rate", None)


def default_keep_rate(model_args: ModelArguments, checkpoint_config) -> None:
    """An EViT checkpoint's own schedule is the default: without --keep_rate (and --match_macs_of_image_size), the run
    keeps the checkpoint's keep rates, and without --reduction_layers its reduction layers (the configuration loads
    them). A per-layer list cannot follow other --reduction_layers: that is refused, asking for --keep_rate."""
    own = own_keep_rate(checkpoint_config)
    if own is None or model_args.keep_rate is not None or model_args.match_macs_of_image_size is not None:
        return
    own_layers = list(getattr(vision_config_of(checkpoint_config), "reduction_layers", []))
    if isinstance(own, list) and model_args.reduction_layers is not None and model_args.reduction_layers != own_layers:
        raise ValueError(
            f"--reduction_layers {model_args.reduction_layers} replaces {model_args.model_name_or_path}'s own "
            f"reduction layers {own_layers}, whose keep rates {own} are one per layer: pass --keep_rate for the new "
            "layers (one rate, or one per layer)."
        )
    model_args.keep_rate = own


def check_distillation_arguments(distillation_args: DistillationArguments) -> None:
    try:
        check_distillation_settings(distillation_args.distillation_alpha, distillation_args.distillation_temperature)
    except ValueError as error:
        raise ValueError(f"--{error}") from None


def load_data(data_args: DataTrainingArguments, model_args: ModelArguments, seed: int):
    if data_args.dataset_name is not None:
        dataset = load_dataset(
            data_args.dataset_name,
            data_args.dataset_config_name,
            cache_dir=model_args.cache_dir,
            token=model_args.token,
            trust_remote_code=model_args.trust_remote_code,
        )
    elif data_args.train_dir is not None or data_args.validation_dir is not None:
        dataset = load_image_folders(data_args, model_args.cache_dir)
    else:
        logger.info("No dataset given: using scikit-learn's bundled digits (1,797 images, 10 classes).")
        dataset = digits_dataset(seed=seed)

    for split in dataset.values():
        for role, column in (("image", data_args.image_column_name), ("label", data_args.label_column_name)):
            if column not in split.column_names:
                raise ValueError(
                    f"The dataset has no {role} column {column!r}; its columns are {split.column_names}. "
                    f"Pass --{role}_column_name with one of them."
                )
    if "validation" not in dataset and "train" in dataset and data_args.train_val_split > 0:
        split = dataset["train"].train_test_split(data_args.train_val_split, seed=seed)
        dataset["train"], dataset["validation"] = split["train"], split["test"]
    return dataset


def load_image_folders(data_args: DataTrainingArguments, cache_dir: str | None = None):
    """The --train_dir / --validation_dir folders as a dataset with imagefolder's columns, every image checked first
    (see `evit_hf.data.scan_image_folder`; the results are cached in `cache_dir`, by default the datasets cache): bad
    layouts and files are reported all at once, before any model is loaded. The dataset holds exactly the files the
    check found (names are never read as patterns), labelled by one class list shared by both splits."""
    folders = {
        "train": ("--train_dir", data_args.train_dir),
        "validation": ("--validation_dir", data_args.validation_dir),
    }
    contents, problems = {}, []
    for split, (argument, folder) in folders.items():
        if folder is None:
            continue
        try:
            contents[split] = scan_image_folder(
                folder, skip_unreadable=data_args.skip_unreadable_images, cache_dir=cache_dir
            )
        except ValueError as error:
            problems.append(f"{argument}: {error}")
    if problems:
        raise ValueError("\n".join(problems))
    if "train" in contents and "validation" in contents:
        unseen = sorted(set(contents["validation"].classes) - set(contents["train"].classes))
        if unseen:
            raise ValueError(
                f"The validation folder {data_args.validation_dir} has classes that the training folder "
                f"{data_args.train_dir} has not: {unseen}. Both need the same class sub-folders."
            )
    for found in contents.values():
        if found.unreadable:
            logger.warning(
                f"Skipped {len(found.unreadable)} unreadable file(s) in {found.folder} (--skip_unreadable_images):\n"
                + "\n".join(f"  {path}: {error}" for path, error in found.unreadable)
            )
    return image_folder_dataset(contents)


def label_names(dataset, label_column: str) -> list[str]:
    split = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    feature = split.features[label_column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    raise ValueError(
        f"The label column {label_column!r} must be a datasets.ClassLabel (integer class ids with names); it is "
        f"{feature}. Cast it with dataset.cast_column({label_column!r}, ClassLabel(names=[...]))."
    )


def classifier_families() -> list:
    """The families of `evit_hf.FAMILIES` that have an image classifier, in the table's order."""
    return [family for family in FAMILIES if family.auto_classes.get(CLASSIFIER_AUTO_CLASS)]


def evit_class_for(model_name_or_path: str, model_args: ModelArguments):
    """`(EViT classifier class, checkpoint configuration)` for a checkpoint of a family with an image classifier, as
    `AutoModelForImageClassification` would pick it (the family's first classifier: the class head, for DeiT); a
    one-line error for anything else."""
    try:
        config = AutoConfig.from_pretrained(
            model_name_or_path,
            cache_dir=model_args.cache_dir,
            revision=model_args.model_revision,
            token=model_args.token,
            trust_remote_code=model_args.trust_remote_code,
        )
    except OSError as error:  # no such folder or Hub id, no config.json, no network
        raise ValueError(
            f"--model_name_or_path {model_name_or_path}: no configuration loads ({one_line(error)}): pass a folder "
            "written by save_pretrained, or a Hub id."
        ) from None
    family = family_for_model_type(config.model_type)
    classifiers = family.auto_classes.get(CLASSIFIER_AUTO_CLASS) if family is not None else None
    if not classifiers:
        what = f"{family.display_name} has no image classifier in" if family else "of no family in"
        supported = ", ".join(f.display_name for f in classifier_families())
        raise ValueError(
            f"{model_name_or_path} is a {config.model_type!r} model, {what} evit_hf.FAMILIES; this script "
            f"fine-tunes image classifiers of {supported}: pass a checkpoint of one of them."
        )
    # The distillation head of a distilled DeiT is inference-only in transformers: fine-tuning trains the class head.
    return classifiers[0], config


def _reads_model_type(config_class, model_type: str) -> bool:
    return model_type in (config_class.model_type, *getattr(config_class, "source_model_types", ()))


def _tower_config_key(evit_class, model_type: str) -> str | None:
    """The sub-configuration of `evit_class`'s configuration that a checkpoint of `model_type` is (the vision tower of
    a CLIP-style classifier), or None when the classifier's configuration reads the checkpoint itself."""
    config_class = evit_class.config_class
    if _reads_model_type(config_class, model_type):
        return None
    for key, sub_config_class in getattr(config_class, "sub_configs", {}).items():
        if _reads_model_type(sub_config_class, model_type):
            return key
    raise ValueError(f"{evit_class.__name__} does not read checkpoints of model_type {model_type!r}.")


def settings_config(config):
    """The configuration that holds the EViT settings and the image size: the vision tower's, for CLIP-style
    models."""
    return vision_config_of(config)


def apply_evit_settings(config, keep_rate, reduction_layers=None, fuse_inattentive_tokens=True) -> None:
    """Sets the EViT settings on `config`, each checked by the configuration (its one validation path). Layers and
    rates are set together, so that each rate goes with its layer as written (`reduction_layers=[3, 1, 2]`,
    `keep_rate=[0.9, 0.7, 0.5]`: layer 3 keeps 0.9); a keep-rate list of the wrong length for the reduction layers is
    a one-line `ValueError` naming both lengths."""
    if reduction_layers is not None:
        settings_config(config).set_schedule(reduction_layers=reduction_layers, keep_rate=keep_rate)
    else:
        config.keep_rate = keep_rate
    config.fuse_inattentive_tokens = fuse_inattentive_tokens


def evit_classifier_config(model_args: ModelArguments, checkpoint_config, evit_class):
    """The configuration `evit_class` is built with from the checkpoint, with this run's EViT settings. A CLIP-style
    vision tower checkpoint becomes the vision configuration of a classifier's (whose text tower is never built)."""
    hub = dict(cache_dir=model_args.cache_dir, revision=model_args.model_revision, token=model_args.token)
    tower_key = _tower_config_key(evit_class, checkpoint_config.model_type)
    if tower_key is None:
        config = evit_class.config_class.from_pretrained(model_args.model_name_or_path, **hub)
    else:
        tower_config = evit_class.config_class.sub_configs[tower_key].from_pretrained(
            model_args.model_name_or_path, **hub
        )
        config = evit_class.config_class(**{tower_key: tower_config})
    config.architectures = [evit_class.__name__]
    apply_evit_settings(
        config, model_args.target_keep_rate, model_args.reduction_layers, model_args.fuse_inattentive_tokens
    )
    return config


def load_evit_classifier(model_args: ModelArguments, config, evit_class, checkpoint_config):
    """`evit_class` with the checkpoint's weights and `config` (see `evit_classifier_config`). From a CLIP-style
    vision tower checkpoint, the classifier gets the tower's weights and a new head; from another classifier of the
    family, its head where the family's record maps it (`EViTFamily.classifier_key_mapping`)."""
    hub = dict(cache_dir=model_args.cache_dir, revision=model_args.model_revision, token=model_args.token)
    if _tower_config_key(evit_class, checkpoint_config.model_type) is None:
        # A distilled DeiT saves its class head under another name: the classifier starts from it.
        key_mapping = dict(family_for_model_type(checkpoint_config.model_type).classifier_key_mapping)
        model = evit_class.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
            key_mapping=key_mapping or None,
            **hub,
        )
        if not key_mapping:
            return model
        # A model loaded with a key mapping saves its weights under the checkpoint's names again, which the
        # classifier would not read back: a model built afresh with these weights saves the classifier's own names.
        rebuilt = evit_class(model.config)
        rebuilt.load_state_dict(model.state_dict())
        return rebuilt
    model = evit_class(config)
    # The classifier's one sub-model is the tower; its class loads the tower checkpoint (with or without projection).
    tower_name, tower = next((n, child) for n, child in model.named_children() if isinstance(child, PreTrainedModel))
    loaded = type(tower).from_pretrained(model_args.model_name_or_path, config=tower.config, **hub)
    getattr(model, tower_name).load_state_dict(loaded.state_dict())
    logger.info(f"{model_args.model_name_or_path} is a vision tower: {evit_class.__name__} with a new head.")
    return model


def check_image_size(model_args: ModelArguments, config) -> None:
    """--image_size and --match_macs_of_image_size against the model's patch size, before any data is loaded."""
    patch_size = settings_config(config).patch_size
    patch_size = patch_size if isinstance(patch_size, int) else max(patch_size)
    for flag, value in (
        ("--image_size", model_args.image_size),
        ("--match_macs_of_image_size", model_args.match_macs_of_image_size),
    ):
        if value is not None and value < patch_size:
            raise ValueError(f"{flag} {value} is smaller than one patch of the model ({patch_size} px): pass more.")


def resize_to_image_size(model, image_size: int | None):
    """`model` with its position embeddings resized once to `image_size` px inputs (see
    `evit_hf.resolution.resize_position_embeddings`) and the size in its configuration; unchanged for None or its own
    size."""
    if image_size is not None and image_size != settings_config(model.config).image_size:
        resize_position_embeddings(model, image_size)
        logger.info(f"Position embeddings resized to {image_size} px inputs.")
    return model


def keep_rate_matching_macs(config, image_size: int | None, matched_image_size: int) -> float:
    """The largest keep rate (to 0.01) whose MACs at `image_size` (None: the configuration's) do not exceed the
    unreduced model's at `matched_image_size`."""
    budget = count_macs(config, image_size=matched_image_size, keep_rate=1.0)
    try:
        return keep_rate_for_macs(config, budget, image_size=image_size)
    except ValueError as error:
        raise ValueError(f"--match_macs_of_image_size {matched_image_size}: {error}") from None


def image_processor_at_size(image_processor, image_size: int):
    """A copy of `image_processor` whose images are `image_size` x `image_size`: its crop where it center-crops (the
    resize before it scaled by the same factor, as 256 -> 224 becomes 329 -> 288), else its resize."""
    processor = copy.deepcopy(image_processor)
    height, width = processor_size(image_processor)
    size = processor.size
    if getattr(processor, "do_center_crop", False) and getattr(processor, "crop_size", None):
        processor.crop_size = {"height": image_size, "width": image_size}
        scale = image_size / min(height, width)
        if size.get("shortest_edge") is not None:
            processor.size = {"shortest_edge": round(size["shortest_edge"] * scale)}
        else:
            processor.size = {"height": round(size["height"] * scale), "width": round(size["width"] * scale)}
    elif size.get("shortest_edge") is not None:
        processor.size = {"shortest_edge": image_size}
    else:
        processor.size = {"height": image_size, "width": image_size}
    return processor


def head_label_mismatch(config, labels: list[str]) -> str | None:
    """How the labels a checkpoint's classification head predicts differ from the dataset's, or None when they agree.

    Names must agree in order; default names (LABEL_0, ...) carry no meaning, so for them only the count must."""
    checkpoint_labels = [config.id2label[i] for i in sorted(config.id2label)] if config.id2label else []
    unnamed = checkpoint_labels == [f"LABEL_{i}" for i in range(len(checkpoint_labels))]
    if (len(checkpoint_labels) == len(labels)) if unnamed else (checkpoint_labels == labels):
        return None
    differing = [
        f"{i}: {ours!r} vs {theirs!r}"
        for i, (ours, theirs) in enumerate(zip(checkpoint_labels, labels, strict=False))
        if ours != theirs
    ]
    shown = checkpoint_labels[:5] + (["..."] if len(checkpoint_labels) > 5 else [])
    description = (
        f"predicts {len(checkpoint_labels)} labels ({shown}), the dataset has {len(labels)} "
        f"({labels[:5]}{'...' if len(labels) > 5 else ''})"
    )
    if len(checkpoint_labels) == len(labels):
        description += f"; they differ at {', '.join(differing[:5])}{', ...' if len(differing) > 5 else ''}"
    return description


def check_teacher_predicts_labels(config, labels: list[str], model_name_or_path: str) -> None:
    """Distillation compares predictions class by class: the starting checkpoint, the teacher, must be a classifier
    of the dataset's labels."""
    is_classifier = any("ForImageClassification" in name for name in (config.architectures or []))
    mismatch = head_label_mismatch(config, labels) if is_classifier and config.id2label else "has no classifier"
    if mismatch is not None:
        raise ValueError(
            f"--distillation_alpha distills the starting checkpoint, and the head of {model_name_or_path} "
            f"{mismatch}: fine-tune it on the dataset first (--distillation_alpha 0), then distill from that model."
        )


def check_labels_match_head(config, labels: list[str], ignore_mismatched_sizes: bool, model_name_or_path: str):
    is_classifier = any("ForImageClassification" in name for name in (config.architectures or []))
    mismatch = head_label_mismatch(config, labels) if is_classifier and config.id2label else None
    if mismatch is not None and not ignore_mismatched_sizes:
        raise ValueError(
            f"The head of {model_name_or_path} {mismatch}. Pass --ignore_mismatched_sizes to train a new head for "
            "the dataset's labels."
        )


def run_settings(model_config, model_args: ModelArguments, distillation_args: DistillationArguments) -> dict:
    """This run's EViT settings, as recorded in its checkpoints (`evit_hf.checkpoints.EViTRunSettings`). A new
    setting joins by being added here. The teacher of a distillation run is its starting model: a real path for a
    folder, so that a resume that names it otherwise (relative, through a link) is the same run."""
    has_schedule = bool(model_args.keep_rate_warmup or model_args.keep_rate_shrink)
    tower_config = settings_config(model_config)
    distilling = distillation_args.distillation_alpha > 0
    settings = {
        "model_type": model_config.model_type,  # evit_deit: with a distillation token
        "image_size": tower_config.image_size,
        "reduction_layers": list(tower_config.reduction_layers),
        "fuse_inattentive_tokens": bool(tower_config.fuse_inattentive_tokens),
        "keep_rate": model_args.target_keep_rate,
        "match_macs_of_image_size": model_args.match_macs_of_image_size,
        "keep_rate_warmup": model_args.keep_rate_warmup,
        "keep_rate_shrink": model_args.keep_rate_shrink,
        "keep_rate_schedule_unit": model_args.keep_rate_schedule_unit if has_schedule else None,
        "distillation_alpha": distillation_args.distillation_alpha,
        "distillation_temperature": distillation_args.distillation_temperature if distilling else None,
    }
    if distilling:
        teacher = model_args.model_name_or_path
        settings["distillation_teacher"] = os.path.realpath(teacher) if os.path.exists(teacher) else teacher
    return json.loads(json.dumps(settings))  # as a checkpoint reads them back: tuples as lists


def load_image_processor(model_args: ModelArguments, config):
    """The checkpoint's (or --image_processor_name's) image processor, or a default one at the model's size; at
    --image_size when given."""
    processor = load_image_processor_or_default(
        model_args.image_processor_name or model_args.model_name_or_path,
        settings_config(config),
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
    )
    if model_args.image_size is not None and processor_size(processor) != (model_args.image_size,) * 2:
        processor = image_processor_at_size(processor, model_args.image_size)
    return processor


def leave_process_group(trainer: Trainer) -> None:
    """Waits for the main process to write its files, then leaves the process group, in an order that cannot hang.

    For a `Trainer` script run by `torchrun` or `accelerate launch`: call it last, once the main process has saved,
    in every process::

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            evit_hf.leave_process_group(trainer)

    Processes that exit with the group still up can abort at shutdown (gloo). The group must also not outlive its
    last Python handle: DistributedDataParallel's reducer holds the group, and a reducer freed last destroys it with
    the GIL held, joining gloo worker threads that may be waiting for the GIL to free a collective's tensors (a
    deadlock, pytorch/pytorch#56297). So the wrapped model goes first; `destroy_process_group` then frees the group
    through its own handle, which releases the GIL."""
    wrapped = weakref.ref(trainer.model_wrapped)
    trainer.accelerator.free_memory()  # the accelerator's references to the prepared (wrapped) model and optimizer
    trainer.model_wrapped = trainer.model
    gc.collect()  # the wrapped model may sit in reference cycles
    if wrapped() not in (None, trainer.model):
        logger.warning("The wrapped training model is still referenced; leaving the process group may hang.")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def card_keep_rates(keep_rates: list[float], target) -> list:
    """The keep rates of the card's table: the requested ones and the model's target (a per-layer list is one row),
    highest first."""
    uniform = sorted({float(rate) for rate in keep_rates} | ({target} if not isinstance(target, list) else set()))
    return ([target] if isinstance(target, list) else []) + uniform[::-1]


def published_files(folder: str) -> list[str]:
    """The files of `folder` that `publish` uploads, as paths relative to it."""
    paths = [os.path.relpath(os.path.join(root, name), folder) for root, _, names in os.walk(folder) for name in names]
    return sorted(filter_repo_objects(paths, allow_patterns=PUBLISHED_PATTERNS, ignore_patterns=UNPUBLISHED_PATTERNS))


def publish(folder: str, repo_id: str, token: str | None = None, private: bool | None = None) -> str:
    """Uploads the model folder to the Hub: safetensors weights, configs, remote code, card and figures (no pickles,
    no intermediate checkpoints)."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        allow_patterns=PUBLISHED_PATTERNS,
        ignore_patterns=UNPUBLISHED_PATTERNS,
        commit_message="Upload EViT model",
    )
    return repo_id


def run_script(main, args=None) -> None:
    """Runs an example's `main(args)` as a command: a refusal (a `ValueError`, raised as it is when `main` is called
    from Python) prints one line, `SCRIPT: error: MESSAGE`, on stderr and exits with status 2, as `evit-hf` does."""
    try:
        main(args)
    except ValueError as error:
        print(f"{os.path.basename(sys.argv[0])}: error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)


__all__ = [
    "CLASSIFIER_AUTO_CLASS",
    "DEFAULT_KEEP_RATE",
    "PUBLISHED_PATTERNS",
    "UNPUBLISHED_PATTERNS",
    "DataTrainingArguments",
    "DistillationArguments",
    "ModelArguments",
    "apply_evit_settings",
    "card_keep_rates",
    "check_data_arguments",
    "check_distillation_arguments",
    "check_image_size",
    "check_labels_match_head",
    "check_model_arguments",
    "check_teacher_predicts_labels",
    "classifier_families",
    "default_keep_rate",
    "evit_class_for",
    "evit_classifier_config",
    "head_label_mismatch",
    "image_processor_at_size",
    "keep_rate_flag_check",
    "keep_rate_matching_macs",
    "label_names",
    "leave_process_group",
    "load_data",
    "load_evit_classifier",
    "load_image_folders",
    "load_image_processor",
    "own_keep_rate",
    "publish",
    "published_files",
    "resize_to_image_size",
    "run_script",
    "run_settings",
    "settings_config",
]
