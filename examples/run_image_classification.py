#!/usr/bin/env python
"""Fine-tune an image classifier of any EViT family (ViT, DeiT, CLIP, MetaCLIP 2, DINOv2, ...) as EViT with `Trainer`.

    # a Hub dataset
    python examples/run_image_classification.py --model_name_or_path facebook/deit-small-patch16-224 \
        --dataset_name beans --output_dir outputs/evit-beans --do_train --do_eval --keep_rate 0.7

    # folders of images, one sub-folder per class
    python examples/run_image_classification.py --model_name_or_path google/vit-base-patch16-224 \
        --train_dir data/train --validation_dir data/val --output_dir outputs/evit-folders --do_train --do_eval

    # no dataset argument: scikit-learn's bundled digits (offline)
    python examples/run_image_classification.py --model_name_or_path MODEL_FOLDER --output_dir outputs/digits \
        --do_train --do_eval

    # DeiT-S at 288 px for the cost of 224 px, distilled from the unreduced starting model
    python examples/run_image_classification.py --model_name_or_path facebook/deit-small-patch16-224 \
        --dataset_name beans --output_dir outputs/evit-288 --do_train --do_eval --image_size 288 \
        --match_macs_of_image_size 224 --distillation_alpha 0.5

Arguments can also come from one JSON file: `python examples/run_image_classification.py args.json`. Multi-GPU and
multi-process runs go through `torchrun` or `accelerate launch`; DeepSpeed and FSDP through Trainer's own
`--deepspeed` / `--fsdp` flags.
"""

import copy
import gc
import json
import logging
import os
import re
import shutil
import sys
import weakref
import zipfile
from dataclasses import dataclass, field

import datasets
import torch
import transformers
from datasets import ClassLabel, load_dataset
from huggingface_hub import HfApi
from huggingface_hub.utils import filter_repo_objects
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoConfig,
    HfArgumentParser,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_callback import ExportableState

import evit_hf
from evit_hf.configuration_evit_base import vision_config_of
from evit_hf.data import (
    AugmentationRandomness,
    collate_images,
    digits_dataset,
    image_folder_dataset,
    image_transforms,
    processor_size,
    scan_image_folder,
    with_sample_index,
)
from evit_hf.distillation import DistillationTrainer, check_distillation_settings
from evit_hf.families import FAMILIES, family_for_model_type
from evit_hf.macs import count_macs
from evit_hf.planning import keep_rate_for_macs
from evit_hf.resolution import resize_position_embeddings
from evit_hf.run_lock import OutputDirLock, check_output_dir
from evit_hf.visualization import load_image_processor_or_default


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
            "help": f"Share of tokens each reduction layer keeps: one rate for all (default {DEFAULT_KEEP_RATE}), or "
            "one per reduction layer in ascending layer order (--keep_rate 0.9 0.7 0.5)."
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


@dataclass
class RunArguments:
    """How a run treats what an earlier run left in --output_dir."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start over: delete the checkpoints, model and results of an earlier run in --output_dir. Without "
            "it, a run resumes from the last complete checkpoint and a finished run is left as it is."
        },
    )


def _cpu_processes() -> bool:
    """Whether this is one of several processes (torchrun, accelerate launch) on a machine without an accelerator."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def parse_arguments(args=None):
    parser = HfArgumentParser(
        (ModelArguments, DataTrainingArguments, TrainingArguments, DistillationArguments, RunArguments)
    )
    args = sys.argv[1:] if args is None else list(args)
    if len(args) == 1 and args[0].endswith(".json"):
        with open(args[0]) as handle:
            values = json.load(handle)
    else:
        values = None
    # Trainer runs CPU processes as one distributed job (gloo) only with use_cpu; without it each process would train
    # a model of its own.
    if _cpu_processes():
        if values is not None and "use_cpu" not in values:
            values["use_cpu"] = True
        elif values is None and not any(arg.startswith(("--use_cpu", "--use-cpu")) for arg in args):
            args = [*args, "--use_cpu", "true"]
        logger.info("Several processes and no accelerator: training on CPU with gloo (use_cpu=True).")
    if values is not None:
        return parser.parse_dict(values)
    return parser.parse_args_into_dataclasses(args=args)


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


def check_distillation_arguments(distillation_args: DistillationArguments) -> None:
    try:
        check_distillation_settings(distillation_args.distillation_alpha, distillation_args.distillation_temperature)
    except ValueError as error:
        raise ValueError(f"--{error}") from None


def check_arguments(model_args, data_args, training_args, distillation_args, run_args) -> None:
    """Impossible arguments, refused before any data or model is loaded (one line naming the flag)."""
    if training_args.do_train:
        if training_args.max_steps == 0 or training_args.max_steps < -1:
            raise ValueError(
                "--max_steps must be a positive number of optimizer steps, or -1 (the default) to train for "
                f"--num_train_epochs; got {training_args.max_steps}."
            )
        if training_args.max_steps < 0 and not training_args.num_train_epochs > 0:
            raise ValueError(
                f"--num_train_epochs must be above 0 (or pass --max_steps); got {training_args.num_train_epochs}."
            )
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size"):
        if getattr(training_args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1; got {getattr(training_args, flag)}.")
    check_data_arguments(data_args)
    check_model_arguments(model_args)
    check_distillation_arguments(distillation_args)
    check_output_dir(training_args.output_dir)
    if run_args.overwrite_output_dir and training_args.do_train:
        for flag, start in (
            ("--model_name_or_path", model_args.model_name_or_path),
            ("--resume_from_checkpoint", training_args.resume_from_checkpoint),
        ):
            if start is not None:
                check_start_survives_overwrite(flag, start, training_args.output_dir)


def check_start_survives_overwrite(flag: str, start: str, output_dir: str) -> None:
    """--overwrite_output_dir deletes what an earlier run left in --output_dir: never the model or checkpoint this
    run starts from. Paths are compared as the file system resolves them (relative paths, symbolic links)."""
    if not os.path.exists(start):
        return  # a Hub id
    start_path, output = os.path.realpath(start), os.path.realpath(output_dir)
    if os.path.commonpath([start_path, output]) != output:
        return
    where = "is --output_dir itself" if start_path == output else f"is inside --output_dir {output_dir}"
    raise ValueError(
        f"{flag} {start} {where}, whose earlier run --overwrite_output_dir deletes before training: copy the model "
        f"out of {output_dir} and pass the copy, or choose another --output_dir."
    )


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
    config = AutoConfig.from_pretrained(
        model_name_or_path,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )
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
    """Sets the EViT settings on `config`, each checked by the configuration (its one validation path): a keep-rate
    list of the wrong length for the reduction layers is a one-line `ValueError` naming both lengths."""
    if reduction_layers is not None:
        config.keep_rate = 1.0  # any earlier per-layer list would not fit the new layers
        config.reduction_layers = reduction_layers
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


# Written last into a checkpoint by Trainer, and into the output folder by main() once training has ended.
TRAINER_STATE = "trainer_state.json"
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json")
# What a run writes into --output_dir besides the model folder's own files; --overwrite_output_dir deletes them.
RUN_FILES = (
    TRAINER_STATE,
    "all_results.json",
    "train_results.json",
    "eval_results.json",
    "keep_rate_results.json",
    *MODEL_FILES,
)
# An evaluation-only run writes its results here, never over a trained run's files.
EVALUATION_ONLY_RESULTS = "eval_only_results.json"


def holds_model(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in MODEL_FILES)


def checkpoint_steps(output_dir: str) -> list[tuple[int, str]]:
    """The checkpoint-N folders of `output_dir` as `(N, path)`, oldest first (by N as a number: 9 before 10)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(
        (int(match.group(1)), os.path.join(output_dir, name))
        for name in os.listdir(output_dir)
        if (match := re.fullmatch(r"checkpoint-(\d+)", name)) and os.path.isdir(os.path.join(output_dir, name))
    )


def read_trainer_state(folder: str) -> dict:
    """The trainer_state.json of `folder`; a `ValueError` saying why when it is missing or does not read."""
    path = os.path.join(folder, TRAINER_STATE)
    try:
        with open(path) as handle:
            state = json.load(handle)
    except FileNotFoundError:
        raise ValueError(f"it has no {TRAINER_STATE} (the run stopped while writing it)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"its {TRAINER_STATE} does not read ({error})") from None
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise ValueError(f"its {TRAINER_STATE} holds no global_step")
    return state


def checkpoint_problem(checkpoint: str, world_size: int = 1) -> str | None:
    """Why `checkpoint` cannot be resumed from (half-written or damaged), or None when it can. `world_size`: the
    processes of the run that wrote it."""
    try:
        read_trainer_state(checkpoint)
    except ValueError as error:
        return str(error)
    if world_size > 1:
        # Each process writes its own random state, and nothing makes the others finish before the main process
        # writes trainer_state.json: a killed job can leave a checkpoint that has the state but lacks one of them.
        for rank in range(world_size):
            name = f"rng_state_{rank}.pth"
            if not zipfile.is_zipfile(os.path.join(checkpoint, name)):  # torch.save writes zip archives
                return f"its {name} is missing or incomplete (the job stopped while writing it)"
    weight_files = []
    index_file = os.path.join(checkpoint, "model.safetensors.index.json")
    if os.path.isfile(index_file):
        try:
            with open(index_file) as handle:
                weight_files = sorted(set(json.load(handle)["weight_map"].values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
            return f"its model.safetensors.index.json does not read ({error})"
    elif os.path.isfile(os.path.join(checkpoint, "model.safetensors")):
        weight_files = ["model.safetensors"]
    for name in weight_files:
        try:
            # The header lists every tensor's byte range: a truncated file does not cover them and fails here.
            with safe_open(os.path.join(checkpoint, name), "pt"):
                pass
        except (OSError, SafetensorError) as error:
            return f"its {name} does not read ({error})"
    return None


def last_complete_checkpoint(output_dir: str, world_size: int = 1) -> str | None:
    """The newest checkpoint-N folder that can be resumed from. Newer ones, half-written by a killed run (Trainer
    writes trainer_state.json last) or damaged (a truncated weights or state file), are skipped with a warning that
    names them."""
    for _, checkpoint in reversed(checkpoint_steps(output_dir)):
        problem = checkpoint_problem(checkpoint, world_size)
        if problem is None:
            return checkpoint
        logger.warning(f"Skipping {checkpoint}: {problem}. Resuming from an earlier checkpoint, if there is one.")
    return None


def finished_training_steps(output_dir: str) -> int | None:
    """The steps of the training that ended in `output_dir` (its model and final state are there), else None."""
    if not (os.path.isfile(os.path.join(output_dir, TRAINER_STATE)) and holds_model(output_dir)):
        return None
    try:
        return read_trainer_state(output_dir)["global_step"]
    except ValueError as error:
        logger.warning(f"{output_dir}: {error}; its model is not taken for a finished run.")
        return None


def clear_earlier_run(output_dir: str) -> None:
    """--overwrite_output_dir: deletes the checkpoints, model and results an earlier run left in `output_dir`."""
    if not os.path.isdir(output_dir):
        return
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if re.fullmatch(r"checkpoint-\d+", name) and os.path.isdir(path):
            shutil.rmtree(path)
        elif name in RUN_FILES or name == EVALUATION_ONLY_RESULTS:
            os.remove(path)
        else:
            continue
        logger.info(f"--overwrite_output_dir: deleted {path}.")


class EViTRunSettings(TrainerCallback, ExportableState):
    """The settings that make a run's steps what they are, recorded in every checkpoint: Trainer stores the state of
    `ExportableState` callbacks in trainer_state.json, the file it writes last, so a complete checkpoint has them.
    A resumed run compares its own settings with them (see `settings_differences`)."""

    def __init__(self, settings: dict | None = None):
        self.settings = dict(settings or {})

    def state(self) -> dict:
        return {"args": {"settings": self.settings}, "attributes": {}}

    def on_train_begin(self, args, state, control, **kwargs):
        # The state of a checkpoint from before this record has no entry for it, and Trainer's next checkpoint
        # would fail on the missing key.
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())


def run_settings(model_config, model_args: ModelArguments, distillation_args: DistillationArguments) -> dict:
    """This run's EViT settings, as recorded in its checkpoints. A new setting joins by being added here."""
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
    return json.loads(json.dumps(settings))  # as a checkpoint reads them back: tuples as lists


def recorded_settings(folder: str, settings: dict) -> dict:
    """The settings of the run that wrote `folder` (a checkpoint, or a finished run's output folder): those its
    trainer_state.json records, else (an earlier version's run) what its config.json says of `settings`' keys."""
    recorded = read_trainer_state(folder).get("stateful_callbacks", {}).get(EViTRunSettings.__name__)
    if isinstance(recorded, dict):
        return recorded.get("args", {}).get("settings", {})
    try:
        with open(os.path.join(folder, "config.json")) as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return {}
    # A keep-rate schedule changes the config's keep_rate from step to step: only a constant one is comparable.
    constant_keep_rate = not (settings["keep_rate_warmup"] or settings["keep_rate_shrink"])
    config = config.get("vision_config") or config  # CLIP-style: the vision tower's settings
    return {
        name: config[name]
        for name in settings
        if name in config and (name != "keep_rate" or constant_keep_rate) and not name.startswith("keep_rate_")
    }


def settings_differences(folder: str, settings: dict) -> list[str]:
    """How this run's `settings` differ from those of the run that wrote `folder`: 'name: X there, Y here'."""
    recorded = recorded_settings(folder, settings)
    return [
        f"{name} {recorded[name]!r} there, {value!r} here"
        for name, value in settings.items()
        if name in recorded and recorded[name] != value
    ]


def check_same_settings(folder: str, settings: dict, what: str) -> None:
    differences = settings_differences(folder, settings)
    if differences:
        raise ValueError(
            f"{what} {folder} was trained with other EViT settings than this run's: {'; '.join(differences)}. Pass "
            "its settings to continue it, --overwrite_output_dir to start over (deleting the earlier run), or "
            "another --output_dir."
        )


@dataclass
class TrainingStart:
    """Where training starts. `finished`: `output_dir` holds a finished run that already reached this run's step
    count; nothing is trained or written. `checkpoint_at_end`: `checkpoint` is at this run's last step (a run killed
    after saving it); its weights end the run, with no step trained."""

    checkpoint: str | None = None
    finished: bool = False
    checkpoint_at_end: bool = False


def training_start(trainer: Trainer, training_args: TrainingArguments, settings: dict) -> TrainingStart:
    """Where training starts (see `TrainingStart`); a refusal when the folder's run had other settings than
    `settings`, or holds a model that no run there trained."""
    output_dir = training_args.output_dir
    # The step count Trainer will aim for, from --max_steps or the epochs over this data.
    target_steps = trainer.set_initial_training_values(training_args, trainer.get_train_dataloader())[-1]
    if training_args.resume_from_checkpoint is not None:
        checkpoint = training_args.resume_from_checkpoint
        problem = checkpoint_problem(checkpoint, training_args.world_size)
        if problem is not None:
            raise ValueError(f"--resume_from_checkpoint {checkpoint}: {problem}. Pass another checkpoint.")
    else:
        checkpoint = last_complete_checkpoint(output_dir, training_args.world_size)
        trained_steps = finished_training_steps(output_dir)
        if trained_steps is not None:
            check_same_settings(output_dir, settings, "The finished run in")
            if target_steps <= trained_steps:
                return TrainingStart(finished=True)
            if checkpoint is None:
                raise ValueError(
                    f"{output_dir} holds a model trained for {trained_steps} steps, and this run asks for "
                    f"{target_steps}, but there is no checkpoint to continue from (--save_strategy no). Pass "
                    "--overwrite_output_dir to train again from --model_name_or_path, replacing it, or choose "
                    "another --output_dir."
                )
        elif checkpoint is None and holds_model(output_dir):
            raise ValueError(
                f"{output_dir} already holds a model, and no checkpoint or finished training of a run here. Choose "
                "another --output_dir, or pass --overwrite_output_dir to replace it."
            )
    if checkpoint is None:
        return TrainingStart()
    check_same_settings(checkpoint, settings, "The checkpoint")
    checkpoint_step = read_trainer_state(checkpoint)["global_step"]
    if checkpoint_step > target_steps:
        raise ValueError(
            f"{checkpoint} is past the end of this run ({checkpoint_step} steps, this run asks for {target_steps}): "
            f"pass --max_steps {checkpoint_step} or more to continue it, or --overwrite_output_dir to start over."
        )
    if checkpoint_step == target_steps:
        logger.info(f"{checkpoint} is at this run's last step ({target_steps}): finishing the run with its weights.")
        return TrainingStart(checkpoint, checkpoint_at_end=True)
    logger.info(f"Resuming from {checkpoint}.")
    return TrainingStart(checkpoint)


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


def main(args=None) -> dict:
    model_args, data_args, training_args, distillation_args, run_args = parse_arguments(args)
    check_arguments(model_args, data_args, training_args, distillation_args, run_args)
    # One run at a time in --output_dir, for the whole run: the processes that write into it hold the lock (in a job
    # of several processes, the one that saves), and the system releases it when the process ends, killed or not.
    output_lock = OutputDirLock(training_args.output_dir)
    if training_args.should_save:
        output_lock.acquire()
    try:
        return run(model_args, data_args, training_args, distillation_args, run_args)
    finally:
        output_lock.release()


def run(model_args, data_args, training_args, distillation_args, run_args) -> dict:
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        handlers=[logging.StreamHandler(sys.stdout)],
        level=logging.INFO if training_args.should_log else logging.WARNING,
    )
    datasets.utils.logging.set_verbosity_warning()
    transformers.utils.logging.set_verbosity_warning()
    transformers.set_seed(training_args.seed)

    # Examples carry PIL images, which the transforms turn into pixel values: keep every column.
    training_args.remove_unused_columns = False
    if training_args.ddp_find_unused_parameters is None:
        training_args.ddp_find_unused_parameters = False  # every parameter takes part in every step
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False  # published at the end, see below

    output_dir = training_args.output_dir
    if run_args.overwrite_output_dir and training_args.do_train:
        with training_args.main_process_first(desc="clearing the earlier run"):
            if training_args.should_save:
                clear_earlier_run(output_dir)
    # An evaluation-only run leaves a model already in the folder, and the results of its runs, as they are.
    keeps_folder_model = training_args.do_eval and not training_args.do_train and holds_model(output_dir)

    # Clear errors before anything heavy.
    evit_class, checkpoint_config = evit_class_for(model_args.model_name_or_path, model_args)
    config = evit_classifier_config(model_args, checkpoint_config, evit_class)
    check_image_size(model_args, config)
    if model_args.match_macs_of_image_size is not None:
        model_args.keep_rate = keep_rate_matching_macs(
            config, model_args.image_size, model_args.match_macs_of_image_size
        )
        config.keep_rate = model_args.keep_rate
        size = model_args.image_size or settings_config(config).image_size
        logger.info(
            f"Keep rate {model_args.keep_rate}: the largest whose MACs at {size} px "
            f"({count_macs(config, image_size=size):,}) do not exceed the unreduced model's at "
            f"{model_args.match_macs_of_image_size} px "
            f"({count_macs(config, image_size=model_args.match_macs_of_image_size, keep_rate=1.0):,})."
        )
    distilling = training_args.do_train and distillation_args.distillation_alpha > 0
    if model_args.keep_rate_warmup or model_args.keep_rate_shrink:
        keep_rate_scheduler = evit_hf.KeepRateScheduler(
            model_args.target_keep_rate,
            warmup=model_args.keep_rate_warmup,
            shrink=model_args.keep_rate_shrink,
            unit=model_args.keep_rate_schedule_unit,
        )
    else:
        keep_rate_scheduler = None

    dataset = load_data(data_args, model_args, training_args.seed)
    labels = label_names(dataset, data_args.label_column_name)
    check_labels_match_head(
        checkpoint_config, labels, model_args.ignore_mismatched_sizes, model_args.model_name_or_path
    )
    if distilling:
        check_teacher_predicts_labels(checkpoint_config, labels, model_args.model_name_or_path)

    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    model = load_evit_classifier(model_args, config, evit_class, checkpoint_config)
    resize_to_image_size(model, model_args.image_size)
    image_processor = load_image_processor(model_args, model.config)
    settings = run_settings(model.config, model_args, distillation_args)
    # The teacher is the starting checkpoint, unreduced and frozen; a resumed run rebuilds it the same way, before
    # Trainer loads the checkpoint's weights into the student.
    teacher = None
    if distilling:
        teacher = copy.deepcopy(model)
        teacher.config.keep_rate = 1.0

    # Each sample's crop and flip come from (seed, epoch, sample index): resumed runs augment as uninterrupted ones.
    augmentation_randomness = AugmentationRandomness(training_args.seed)
    train_transform, eval_transform = image_transforms(
        image_processor,
        data_args.image_column_name,
        crop_scale=(data_args.crop_scale_min, 1.0),
        random_flip=data_args.random_flip,
        randomness=augmentation_randomness,
    )
    train_dataset = eval_dataset = None
    if training_args.do_train:
        if "train" not in dataset:
            raise ValueError("--do_train needs a train split: pass --train_dir or a dataset with a 'train' split.")
        train_dataset = dataset["train"]
        if data_args.max_train_samples is not None:
            count = min(data_args.max_train_samples, len(train_dataset))
            train_dataset = train_dataset.shuffle(seed=training_args.seed).select(range(count))
        train_dataset = with_sample_index(train_dataset)
        train_dataset.set_transform(train_transform)
    if training_args.do_eval:
        if "validation" not in dataset:
            raise ValueError("--do_eval needs a validation split: pass --validation_dir or --train_val_split > 0.")
        eval_dataset = dataset["validation"]
        if data_args.max_eval_samples is not None:
            eval_dataset = eval_dataset.select(range(min(data_args.max_eval_samples, len(eval_dataset))))
        eval_dataset.set_transform(eval_transform)

    def collate(examples):
        return collate_images(examples, data_args.label_column_name)

    trainer = DistillationTrainer(
        model=model,
        teacher_model=teacher,
        distillation_alpha=distillation_args.distillation_alpha if distilling else 0.0,
        distillation_temperature=distillation_args.distillation_temperature,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        compute_metrics=evit_hf.classification_metrics(len(labels)),
        processing_class=image_processor,
        data_collator=collate,
        callbacks=[augmentation_randomness, EViTRunSettings(settings)]
        + ([keep_rate_scheduler] if keep_rate_scheduler is not None else []),
    )

    start = training_start(trainer, training_args, settings) if training_args.do_train else TrainingStart()
    if start.finished:
        results = finished_run_results(output_dir, training_args.do_eval)
    else:
        results = train_and_evaluate(trainer, model_args, training_args, start)
        if trainer.is_world_process_zero():
            write_results(
                trainer,
                results,
                model_args,
                data_args,
                training_args,
                distillation_args,
                push_to_hub,
                keeps_folder_model,
            )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        leave_process_group(trainer)
    return results


def leave_process_group(trainer: Trainer) -> None:
    """Waits for the main process to write its files, then leaves the process group, in an order that cannot hang.

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


def finished_run_results(output_dir: str, do_eval: bool) -> dict:
    """A rerun of a finished command: nothing is trained or written; the results of the run are returned."""
    message = (
        f"{output_dir} holds a finished run of this length: nothing to train, nothing is overwritten. Pass a higher "
        "--max_steps (or --num_train_epochs) to continue it from its last checkpoint, or --overwrite_output_dir to "
        "start over."
    )
    results_file = os.path.join(output_dir, "all_results.json")
    results = {}
    if os.path.isfile(results_file):
        with open(results_file) as handle:
            results = json.load(handle)
    if do_eval and not any(key.startswith("eval_") for key in results):
        message += (
            f" Its evaluation did not finish: evaluate it with --do_eval alone and --model_name_or_path {output_dir}."
        )
    logger.warning(message)
    return results


def finish_from_checkpoint(trainer: Trainer, checkpoint: str) -> dict:
    """A checkpoint at the run's last step ends the run: its weights and state, no step trained. (Trainer, resumed
    there, would train one step past the end when the last step falls inside an epoch.)"""
    trainer._load_from_checkpoint(checkpoint)
    trainer.state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE))
    return {"epoch": trainer.state.epoch, "total_flos": trainer.state.total_flos}


def train_and_evaluate(trainer, model_args, training_args, start: TrainingStart) -> dict:
    results = {}
    if training_args.do_train:
        if start.checkpoint_at_end:
            train_metrics = finish_from_checkpoint(trainer, start.checkpoint)
        else:
            train_metrics = trainer.train(resume_from_checkpoint=start.checkpoint).metrics
        trainer.model.config.keep_rate = model_args.target_keep_rate  # the target, whatever the schedule ended on
        trainer.save_model()
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        results.update(train_metrics)
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        if training_args.do_train:  # an evaluation-only run writes its own file, see write_results
            trainer.save_metrics("eval", metrics)
        results.update(metrics)
    return results


def write_results(
    trainer, results, model_args, data_args, training_args, distillation_args, push_to_hub, keeps_folder_model
) -> None:
    """The main process's files: keep-rate table, model card, the model of an evaluation-only run, the upload."""
    output_dir = training_args.output_dir
    evaluation_only = not training_args.do_train
    model = trainer.model
    keep_rate_rows = None
    if training_args.do_eval and data_args.card_keep_rates:
        keep_rates = card_keep_rates(data_args.card_keep_rates, model.config.keep_rate)
        keep_rate_rows = evit_hf.evaluate_keep_rates(
            model,
            trainer.eval_dataset,
            keep_rates,
            training_args.per_device_eval_batch_size,
            trainer.data_collator,
        )
    if evaluation_only:
        # Never over a trained run's model, results or card: its own file, naming the model it evaluated.
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, EVALUATION_ONLY_RESULTS), "w") as handle:
            evaluated = {"model_name_or_path": model_args.model_name_or_path, "metrics": results}
            json.dump({**evaluated, "keep_rate_results": keep_rate_rows}, handle, indent=2)
        if keeps_folder_model:
            logger.info(
                f"{output_dir} already holds a model: left as it is; the results are in {EVALUATION_ONLY_RESULTS}."
            )
            return
        trainer.save_model()  # an empty folder gets the model its results describe
    elif keep_rate_rows is not None:
        with open(os.path.join(output_dir, "keep_rate_results.json"), "w") as handle:
            json.dump(keep_rate_rows, handle, indent=2)
    repo_id = training_args.hub_model_id or os.path.basename(os.path.abspath(output_dir))
    card = evit_hf.create_model_card(
        model,
        repo_id=repo_id,
        base_model=model_args.model_name_or_path if not os.path.isdir(model_args.model_name_or_path) else None,
        dataset_name=data_args.dataset_display_name or data_args.dataset_name or _folder_dataset_name(data_args),
        dataset_id=data_args.dataset_name,
        results=keep_rate_rows,
        results_note="Accuracy on the evaluation split; images/s of the forward pass on the evaluation machine.",
        training_settings=card_training_settings(model_args, distillation_args, training_args.do_train),
    )
    card.save(os.path.join(output_dir, "README.md"))
    if push_to_hub:
        publish(output_dir, repo_id, model_args.token, training_args.hub_private_repo)


def card_keep_rates(keep_rates: list[float], target) -> list:
    """The keep rates of the card's table: the requested ones and the model's target (a per-layer list is one row),
    highest first."""
    uniform = sorted({float(rate) for rate in keep_rates} | ({target} if not isinstance(target, list) else set()))
    return ([target] if isinstance(target, list) else []) + uniform[::-1]


def card_training_settings(model_args: ModelArguments, distillation_args: DistillationArguments, trained: bool):
    """Rows of the card's settings table for the cost-budget options this run used."""
    rows = {}
    if model_args.match_macs_of_image_size is not None:
        rows["keep rate chosen for the MACs of"] = f"the unreduced model at {model_args.match_macs_of_image_size} px"
    if trained and distillation_args.distillation_alpha > 0:
        rows["distillation from the unreduced model"] = (
            f"alpha {distillation_args.distillation_alpha}, temperature {distillation_args.distillation_temperature}"
        )
    return rows


def _folder_dataset_name(data_args: DataTrainingArguments) -> str:
    if data_args.train_dir or data_args.validation_dir:
        return "imagefolder"
    return "scikit-learn digits"


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


if __name__ == "__main__":
    main()
