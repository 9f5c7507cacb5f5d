#!/usr/bin/env python
"""Accuracy and images/s of one model at several keep rates, on one dataset: the shape of the paper's Table 1.

    python examples/evaluate_keep_rates.py --model_name_or_path facebook/deit-small-patch16-224 \
        --dataset_name imagenet-1k --split validation --keep_rates 1.0 0.9 0.8 0.7 0.6 0.5 --output_dir outputs/table

Works on an image classifier of every family in evit_hf.FAMILIES that has one (ViT, DeiT, CLIP, MetaCLIP 2, DINOv2
with and without registers), used off the shelf (turned into EViT, no fine-tuning) or fine-tuned as EViT. A CLIP or
MetaCLIP 2 model with both towers (CLIPModel, MetaClip2Model) is scored zero-shot: each class is the prompt
--zero_shot_prompt ("a photo of a {label}.") with the dataset's label name, embedded once by the text tower with the
checkpoint's tokenizer; only the vision tower runs at the keep rates. With no dataset argument it evaluates on the
validation split of scikit-learn's bundled digits. Writes keep_rates.json and keep_rates.md to --output_dir and prints
the markdown table; each row says whether its accuracy is the classifier's or zero-shot.

    python examples/evaluate_keep_rates.py --model_name_or_path openai/clip-vit-base-patch16 \
        --dataset_name imagenet-1k --split validation --streaming --output_dir outputs/clip-zero-shot

Each image is decoded and transformed once, in --num_workers data-loader workers, and every batch runs at all keep
rates. A row is one keep rate for every reduction layer (0.7) or one per layer (0.9/0.7/0.5); an EViT folder's own
schedule (its saved keep rates) is always a row, marked "the model's own", so that a calibrated model is measured
as saved. --streaming reads a Hub split as it downloads (ImageNet-1k validation without the training set), --dtype
bfloat16 or float16 runs under autocast. Several processes split the data among them:

    torchrun --nproc_per_node 8 examples/evaluate_keep_rates.py --model_name_or_path ... --streaming ...

A refusal prints one line and exits with status 2 (`main(args)` raises it as a `ValueError`); --output_dir follows
the output policy of `evit_hf.outputs` (docs/output_folders.md).
"""

import functools
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Literal

import torch
from datasets import load_dataset
from transformers import AutoConfig, AutoTokenizer, HfArgumentParser

import evit_hf
from evit_hf.configuration_evit_base import check_keep_rate, default_reduction_layers, vision_config_of
from evit_hf.data import collate_images, image_transforms
from evit_hf.evaluation import (
    ZERO_SHOT,
    ZERO_SHOT_PROMPT,
    accuracy_kind,
    default_num_workers,
    evaluation_model_class,
    resolve_dtype,
)
from evit_hf.fine_tuning import (
    DataTrainingArguments,
    ModelArguments,
    check_data_arguments,
    check_image_size,
    head_label_mismatch,
    keep_rate_flag_check,
    keep_rate_matching_macs,
    label_names,
    load_data,
    load_image_processor,
    own_keep_rate,
    resize_to_image_size,
    run_script,
)
from evit_hf.outputs import OutputFolder, check_outputs_apart_from_inputs


# What an evaluation writes into --output_dir (see evit_hf.outputs).
OUTPUT_CLAIMS = ["keep_rates.json", "keep_rates.md"]


@dataclass
class EvaluationArguments:
    output_dir: str = field(metadata={"help": "Where keep_rates.json and keep_rates.md go."})
    keep_rates: list[str] = field(
        default_factory=lambda: ["1.0", "0.9", "0.8", "0.7", "0.6", "0.5"],
        metadata={
            "help": "Rows to evaluate: a keep rate for every reduction layer (0.7), or one per reduction layer "
            "separated by / (0.9/0.7/0.5). An EViT folder's own schedule is always added."
        },
    )
    split: str = field(default="validation", metadata={"help": "Dataset split to evaluate on."})
    batch_size: int = field(default=64, metadata={"help": "Images per forward pass."})
    seed: int = field(default=0, metadata={"help": "Seed of the train/validation split where one is made."})
    device: str = field(
        default="cuda" if torch.cuda.is_available() else "cpu",
        metadata={"help": "cpu or cuda (each process of a multi-process run takes the GPU of its local rank)."},
    )
    num_workers: int = field(
        default=default_num_workers(),
        metadata={"help": "Data-loader workers that decode and transform (default: the CPUs per process, at most 8)."},
    )
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32",
        metadata={"help": "Precision of the forward passes: bfloat16 and float16 (CUDA only) run under autocast."},
    )
    zero_shot_prompt: str = field(
        default=ZERO_SHOT_PROMPT,
        metadata={"help": "The text of each class for zero-shot models (CLIP, MetaCLIP 2); {label} is its name."},
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream the --split of the Hub dataset --dataset_name instead of downloading the whole dataset."
        },
    )


def load_streaming_split(data_args: DataTrainingArguments, model_args: ModelArguments, split: str):
    """The --split of the Hub dataset --dataset_name as a `datasets.IterableDataset`, read as it downloads, and its
    label names (from the dataset's features)."""
    if data_args.dataset_name is None:
        raise ValueError(
            "--streaming reads a Hub dataset: pass --dataset_name (image folders and the bundled digits are read "
            "without it)."
        )
    stream = load_dataset(
        data_args.dataset_name,
        data_args.dataset_config_name,
        split=split,
        streaming=True,
        cache_dir=model_args.cache_dir,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )
    if stream.features is None:
        raise ValueError(
            f"The stream of {data_args.dataset_name} declares no features, so its label names are unknown: evaluate "
            "it without --streaming."
        )
    for role, column in (("image", data_args.image_column_name), ("label", data_args.label_column_name)):
        if column not in stream.features:
            raise ValueError(
                f"The dataset has no {role} column {column!r}; its columns are {list(stream.features)}. "
                f"Pass --{role}_column_name with one of them."
            )
    return stream, label_names({split: stream}, data_args.label_column_name)


def keep_rate_rows(values) -> list:
    """The --keep_rates rows as keep rates: `0.7` -> 0.7, `0.9/0.7/0.5` -> [0.9, 0.7, 0.5] (a JSON file may give
    numbers and lists), each checked as the configurations check a keep rate, with one line naming the flag."""
    rows = []
    for value in values:
        if isinstance(value, str):
            try:
                parts = [float(part) for part in value.split("/")]
            except ValueError:
                raise ValueError(
                    f"--keep_rates: {value!r} is not a keep rate; give numbers in (0, 1] such as 0.7, or one per "
                    "reduction layer separated by / such as 0.9/0.7/0.5."
                ) from None
            value = parts[0] if len(parts) == 1 else parts
        rows.append(keep_rate_flag_check("--keep_rates", value))
    return rows


def reduction_layers_of(checkpoint_config, model_args: ModelArguments) -> list[int]:
    """The reduction layers the evaluated model will have: --reduction_layers, an EViT folder's own, or the paper's."""
    vision_config = vision_config_of(checkpoint_config)
    if model_args.reduction_layers is not None:
        return list(model_args.reduction_layers)
    own = getattr(vision_config, "reduction_layers", None)
    return list(own) if own is not None else default_reduction_layers(vision_config.num_hidden_layers)


def main(args=None) -> list[dict]:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, EvaluationArguments))
    args = sys.argv[1:] if args is None else list(args)
    if len(args) == 1 and args[0].endswith(".json"):
        model_args, data_args, eval_args = parser.parse_json_file(json_file=os.path.abspath(args[0]))
    else:
        model_args, data_args, eval_args = parser.parse_args_into_dataclasses(args=args)
    # Impossible arguments, refused before any data or model is loaded.
    check_data_arguments(data_args)
    if model_args.keep_rate is not None:
        raise ValueError(
            f"--keep_rate {model_args.keep_rate} sets the fine-tuning example's target; this script evaluates the "
            "keep rates of --keep_rates (and the one --match_macs_of_image_size chooses)."
        )
    if eval_args.batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1; got {eval_args.batch_size}.")
    if "{label}" not in eval_args.zero_shot_prompt:
        raise ValueError(
            f"--zero_shot_prompt must hold {{label}}, where each class name goes; got {eval_args.zero_shot_prompt!r}."
        )
    eval_args.keep_rates = keep_rate_rows(eval_args.keep_rates)
    check_outputs_apart_from_inputs(
        [("--output_dir", eval_args.output_dir)],
        [
            ("--model_name_or_path", model_args.model_name_or_path),
            ("--image_processor_name", model_args.image_processor_name),
            ("--dataset_name", data_args.dataset_name),
            ("--train_dir", data_args.train_dir),
            ("--validation_dir", data_args.validation_dir),
        ],
    )
    # The main process writes the results: it holds --output_dir for the whole evaluation (see evit_hf.outputs),
    # from before any work, so that a second evaluation into it, or one into a folder of a user's files, is refused.
    output_folder = OutputFolder(eval_args.output_dir, "--output_dir", claims=OUTPUT_CLAIMS)
    if int(os.environ.get("RANK", "0")) == 0:
        output_folder.acquire()
    try:
        return evaluate(model_args, data_args, eval_args)
    finally:
        output_folder.release()


def evaluate(model_args, data_args, eval_args) -> list[dict]:
    # torchrun and accelerate launch set WORLD_SIZE; each process evaluates its part of the data.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(eval_args.device)
    if world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    resolve_dtype(eval_args.dtype, device)  # refuses float16 on CPU before anything loads

    hub_kwargs = dict(cache_dir=model_args.cache_dir, revision=model_args.model_revision, token=model_args.token)
    try:
        checkpoint_config = AutoConfig.from_pretrained(
            model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code, **hub_kwargs
        )
    except OSError as error:
        raise ValueError(
            f"--model_name_or_path {model_args.model_name_or_path}: no configuration loads "
            f"({' '.join(str(error).split())}): pass a folder written by save_pretrained, or a Hub id."
        ) from None
    # Per-layer rows against the layers the model will have, before it loads; then the folder's own schedule.
    reduction_layers = reduction_layers_of(checkpoint_config, model_args)
    for row in eval_args.keep_rates:
        if isinstance(row, list):
            try:
                check_keep_rate(row, reduction_layers)
            except ValueError as error:
                raise ValueError(f"--keep_rates {'/'.join(f'{rate:g}' for rate in row)}: {error}") from None
    own = own_keep_rate(checkpoint_config)
    own_layers = getattr(vision_config_of(checkpoint_config), "reduction_layers", None)
    if own is not None and own_layers is not None and list(own_layers) != reduction_layers:
        own = None  # --reduction_layers replaced the folder's layers: its schedule is not what runs
    # The family table picks the class: the zero-shot model for a CLIP-style checkpoint of both towers, else the
    # family's image classifier.
    evit_class = evaluation_model_class(checkpoint_config, model_args.model_name_or_path)
    check_image_size(model_args, checkpoint_config)
    zero_shot = accuracy_kind(evit_class) == ZERO_SHOT
    tokenizer = None
    if zero_shot:
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, **hub_kwargs)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"{model_args.model_name_or_path} has no tokenizer that loads ({' '.join(str(error).split())}): "
                "zero-shot accuracy embeds the class prompts with its text tower; save the model's tokenizer into "
                "the folder (tokenizer.save_pretrained)."
            ) from None
    if eval_args.streaming:
        split, labels = load_streaming_split(data_args, model_args, eval_args.split)
    else:
        dataset = load_data(data_args, model_args, eval_args.seed)
        if eval_args.split not in dataset:
            raise ValueError(f"The dataset has no split {eval_args.split!r}; it has {list(dataset)}. Pass --split.")
        labels = label_names(dataset, data_args.label_column_name)
        split = dataset[eval_args.split]
    # A zero-shot model has no head: its classes are the dataset's label names.
    mismatch = None if zero_shot else head_label_mismatch(checkpoint_config, labels)
    if mismatch is not None:
        # Same count, other names: the accuracy would compare unrelated classes.
        raise ValueError(
            f"{model_args.model_name_or_path} {mismatch}: evaluate a model fine-tuned on this dataset "
            "(examples/run_image_classification.py), or a dataset with the model's labels in its order."
        )

    started_group = False
    if world_size > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        started_group = True
    is_main_process = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0

    settings = {"fuse_inattentive_tokens": model_args.fuse_inattentive_tokens}
    if model_args.reduction_layers is not None:
        settings["reduction_layers"] = model_args.reduction_layers
    model = evit_class.from_pretrained(
        model_args.model_name_or_path, cache_dir=model_args.cache_dir, token=model_args.token, **settings
    )
    # --image_size: positions resized once, as the fine-tuning example does; the processor resizes and crops to it.
    resize_to_image_size(model, model_args.image_size)
    keep_rates = list(eval_args.keep_rates)
    if own is not None and own not in keep_rates:
        keep_rates.append(own)
    if model_args.match_macs_of_image_size is not None:
        # The paper's setting: the keep rate at which this size costs what the unreduced model costs at the other.
        matched = keep_rate_matching_macs(model.config, None, model_args.match_macs_of_image_size)
        if matched not in keep_rates:
            keep_rates.append(matched)
    model.to(device)
    # A model of image and text towers describes its images in the vision tower's configuration.
    image_processor = load_image_processor(model_args, vision_config_of(model.config))
    _, eval_transform = image_transforms(image_processor, data_args.image_column_name)
    if eval_args.streaming:
        readers = world_size * max(1, eval_args.num_workers)
        if split.num_shards < readers:
            # Processes and workers each read whole shards: Parquet files split into row groups give more of them.
            split = split.reshard()
        if data_args.max_eval_samples is not None:
            # Split among the shards that the readers get: which examples depends on the processes and workers.
            split = split.take(data_args.max_eval_samples)
        # In the data-loader workers, a few images at a time; the decoded images are not passed on.
        split = split.map(eval_transform, batched=True, batch_size=16, remove_columns=[data_args.image_column_name])
    else:
        if data_args.max_eval_samples is not None:
            split = split.select(range(min(data_args.max_eval_samples, len(split))))
        split.set_transform(eval_transform)

    rows = evit_hf.evaluate_keep_rates(
        model,
        split,
        keep_rates,
        eval_args.batch_size,
        # A partial, unlike a lambda, pickles: workers that are spawned (macOS) get it too.
        collate_fn=functools.partial(collate_images, label_column=data_args.label_column_name),
        num_workers=eval_args.num_workers,
        dtype=eval_args.dtype,
        distributed=world_size > 1,
        tokenizer=tokenizer,
        label_names=labels if zero_shot else None,
        prompt=eval_args.zero_shot_prompt,
    )
    for row in rows:
        if own is not None and row["keep_rate"] == own:
            row["own_schedule"] = True  # the keep rates the folder was saved with
    if is_main_process:
        os.makedirs(eval_args.output_dir, exist_ok=True)
        markdown = evit_hf.results_markdown(rows)
        summary = {
            "model": model_args.model_name_or_path,
            "device": str(device),
            "processes": world_size,
            "dtype": eval_args.dtype,
            "accuracy_kind": rows[0]["accuracy_kind"],
            "image_size": vision_config_of(model.config).image_size,
            **(
                {"match_macs_of_image_size": model_args.match_macs_of_image_size}
                if model_args.match_macs_of_image_size is not None
                else {}
            ),
            **({"zero_shot_prompt": eval_args.zero_shot_prompt} if zero_shot else {}),
            "rows": rows,
        }
        with open(os.path.join(eval_args.output_dir, "keep_rates.json"), "w") as handle:
            json.dump(summary, handle, indent=2)
        with open(os.path.join(eval_args.output_dir, "keep_rates.md"), "w") as handle:
            handle.write(markdown + "\n")
        print(markdown)
    if started_group:
        # Every process waits for the main one to write its files, then leaves the group (gloo can abort at exit
        # with the group still up).
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return rows


if __name__ == "__main__":
    run_script(main)
