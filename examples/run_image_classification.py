#!/usr/bin/env python
"""Fine-tune a ViT, DeiT or EViT checkpoint as EViT for image classification with `Trainer`.

    # a Hub dataset
    python examples/run_image_classification.py --model_name_or_path facebook/deit-small-patch16-224 \
        --dataset_name beans --output_dir outputs/evit-beans --do_train --do_eval --keep_rate 0.7

    # folders of images, one sub-folder per class
    python examples/run_image_classification.py --model_name_or_path google/vit-base-patch16-224 \
        --train_dir data/train --validation_dir data/val --output_dir outputs/evit-folders --do_train --do_eval

    # no dataset argument: scikit-learn's bundled digits (offline)
    python examples/run_image_classification.py --model_name_or_path MODEL_FOLDER --output_dir outputs/digits \
        --do_train --do_eval

Arguments can also come from one JSON file: `python examples/run_image_classification.py args.json`. Multi-GPU and
multi-process runs go through `torchrun` or `accelerate launch`; DeepSpeed and FSDP through Trainer's own
`--deepspeed` / `--fsdp` flags.
"""

import json
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass, field

import datasets
import torch
import transformers
from datasets import ClassLabel, load_dataset
from huggingface_hub import HfApi
from huggingface_hub.utils import filter_repo_objects
from transformers import (
    AutoConfig,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
)

import evit_hf
from evit_hf.data import (
    AugmentationRandomness,
    collate_images,
    digits_dataset,
    image_folder_dataset,
    image_transforms,
    scan_image_folder,
    with_sample_index,
)
from evit_hf.visualization import load_image_processor_or_default


logger = logging.getLogger(__name__)

# Files a published folder holds: weights as safetensors, configs, remote code, the card and its figures; never the
# pickles Trainer writes (training_args.bin, optimizer.pt) nor the intermediate checkpoints.
PUBLISHED_PATTERNS = ["*.safetensors", "*.json", "*.py", "README.md", "*.png"]
UNPUBLISHED_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "runs/**", "*.bin", "*.pt", "*.pth", "*.pkl"]


@dataclass
class ModelArguments:
    """Which checkpoint to start from, and the EViT settings."""

    model_name_or_path: str = field(
        metadata={"help": "Hub id or folder of a ViT, DeiT or EViT image-classification checkpoint."}
    )
    keep_rate: float = field(default=0.7, metadata={"help": "Target share of tokens each reduction layer keeps."})
    reduction_layers: list[int] | None = field(
        default=None, metadata={"help": "0-based reduction layers (default: the checkpoint's, or the paper's)."}
    )
    fuse_inattentive_tokens: bool = field(
        default=True, metadata={"help": "Fuse the tokens that are not kept into one (--no_fuse_inattentive_tokens)."}
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


@dataclass
class DataTrainingArguments:
    """Which data to train and evaluate on. With no dataset argument, scikit-learn's bundled digits."""

    dataset_name: str | None = field(default=None, metadata={"help": "A dataset on the Hub."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration."})
    train_dir: str | None = field(default=None, metadata={"help": "A folder of training images (imagefolder)."})
    validation_dir: str | None = field(default=None, metadata={"help": "A folder of validation images."})
    train_val_split: float = field(
        default=0.15, metadata={"help": "Share of the training split held out when there is no validation split."}
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
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments, RunArguments))
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


def evit_class_for(model_name_or_path: str, model_args: ModelArguments):
    """The EViT classifier class for a ViT, DeiT or EViT checkpoint; an error for anything else."""
    config = AutoConfig.from_pretrained(
        model_name_or_path,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )
    if config.model_type in ("vit", "evit"):
        return evit_hf.EViTForImageClassification, config
    if config.model_type in ("deit", "evit_deit"):
        # The distillation head is inference-only in transformers: fine-tuning trains the class head.
        return evit_hf.EViTDeiTForImageClassification, config
    raise ValueError(
        f"{model_name_or_path} is a {config.model_type!r} model; this script fine-tunes ViT ('vit'), DeiT ('deit') "
        "and EViT ('evit', 'evit_deit') checkpoints."
    )


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


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint-N folder written to its end; newer ones that a killed run left half-written are skipped
    with a warning (Trainer writes trainer_state.json last)."""
    if not os.path.isdir(output_dir):
        return None
    steps = sorted(
        (int(match.group(1)), os.path.join(output_dir, name))
        for name in os.listdir(output_dir)
        if (match := re.fullmatch(r"checkpoint-(\d+)", name)) and os.path.isdir(os.path.join(output_dir, name))
    )
    for _, checkpoint in reversed(steps):
        if os.path.isfile(os.path.join(checkpoint, TRAINER_STATE)):
            return checkpoint
        logger.warning(f"Skipping {checkpoint}: it is incomplete (the run stopped while writing it).")
    return None


def finished_training_steps(output_dir: str) -> int | None:
    """The steps of the training that ended in `output_dir` (its model and final state are there), else None."""
    state_file = os.path.join(output_dir, TRAINER_STATE)
    if not (os.path.isfile(state_file) and holds_model(output_dir)):
        return None
    with open(state_file) as handle:
        return json.load(handle)["global_step"]


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


def training_start(trainer: Trainer, training_args: TrainingArguments) -> tuple[str | None, bool]:
    """Where training starts: `(checkpoint or None, finished)`. `finished` is True when `output_dir` holds a run that
    already reached this run's step count: there is nothing to train, and nothing is overwritten."""
    if training_args.resume_from_checkpoint is not None:
        return training_args.resume_from_checkpoint, False
    output_dir = training_args.output_dir
    checkpoint = last_complete_checkpoint(output_dir)
    trained_steps = finished_training_steps(output_dir)
    if trained_steps is not None:
        # The step count Trainer will aim for, from --max_steps or the epochs over this data.
        target_steps = trainer.set_initial_training_values(training_args, trainer.get_train_dataloader())[-1]
        if target_steps <= trained_steps:
            return None, True
        if checkpoint is None:
            raise ValueError(
                f"{output_dir} holds a model trained for {trained_steps} steps, and this run asks for "
                f"{target_steps}, but there is no checkpoint to continue from (--save_strategy no). Pass "
                "--overwrite_output_dir to train again from --model_name_or_path, replacing it, or choose another "
                "--output_dir."
            )
    elif checkpoint is None and holds_model(output_dir):
        raise ValueError(
            f"{output_dir} already holds a model, and no checkpoint or finished training of a run here. Choose "
            "another --output_dir, or pass --overwrite_output_dir to replace it."
        )
    if checkpoint is not None:
        logger.info(f"Resuming from {checkpoint}.")
    return checkpoint, False


def load_image_processor(model_args: ModelArguments, config):
    """The checkpoint's (or --image_processor_name's) image processor, or a default one at the model's size."""
    return load_image_processor_or_default(
        model_args.image_processor_name or model_args.model_name_or_path,
        config,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
    )


def main(args=None) -> dict:
    model_args, data_args, training_args, run_args = parse_arguments(args)
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
    if model_args.keep_rate_warmup or model_args.keep_rate_shrink:
        keep_rate_scheduler = evit_hf.KeepRateScheduler(
            model_args.keep_rate,
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

    evit_settings = {"keep_rate": model_args.keep_rate, "fuse_inattentive_tokens": model_args.fuse_inattentive_tokens}
    if model_args.reduction_layers is not None:
        evit_settings["reduction_layers"] = model_args.reduction_layers
    model = evit_class.from_pretrained(
        model_args.model_name_or_path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        **evit_settings,
    )
    image_processor = load_image_processor(model_args, model.config)

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

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        compute_metrics=evit_hf.classification_metrics(len(labels)),
        processing_class=image_processor,
        data_collator=collate,
        callbacks=[augmentation_randomness] + ([keep_rate_scheduler] if keep_rate_scheduler is not None else []),
    )

    checkpoint, finished = training_start(trainer, training_args) if training_args.do_train else (None, False)
    if finished:
        results = finished_run_results(output_dir, training_args.do_eval)
    else:
        results = train_and_evaluate(trainer, model_args, training_args, checkpoint)
        if trainer.is_world_process_zero():
            write_results(trainer, results, model_args, data_args, training_args, push_to_hub, keeps_folder_model)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Every process waits for the main one to write its files, then leaves the group: processes that exit with
        # the group still up can abort at shutdown (gloo).
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return results


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


def train_and_evaluate(trainer, model_args, training_args, checkpoint: str | None) -> dict:
    results = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.model.config.keep_rate = model_args.keep_rate  # the target, whatever the schedule ended on
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        results.update(train_result.metrics)
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        if training_args.do_train:  # an evaluation-only run writes its own file, see write_results
            trainer.save_metrics("eval", metrics)
        results.update(metrics)
    return results


def write_results(trainer, results, model_args, data_args, training_args, push_to_hub, keeps_folder_model) -> None:
    """The main process's files: keep-rate table, model card, the model of an evaluation-only run, the upload."""
    output_dir = training_args.output_dir
    evaluation_only = not training_args.do_train
    model = trainer.model
    keep_rate_rows = None
    if training_args.do_eval and data_args.card_keep_rates:
        keep_rates = sorted(set(data_args.card_keep_rates) | {model.config.keep_rate}, reverse=True)
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
    )
    card.save(os.path.join(output_dir, "README.md"))
    if push_to_hub:
        publish(output_dir, repo_id, model_args.token, training_args.hub_private_repo)


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
