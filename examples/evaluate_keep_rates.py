#!/usr/bin/env python
"""Accuracy and images/s of one model at several keep rates, on one dataset: the shape of the paper's Table 1.

    python examples/evaluate_keep_rates.py --model_name_or_path facebook/deit-small-patch16-224 \
        --dataset_name imagenet-1k --split validation --keep_rates 1.0 0.9 0.8 0.7 0.6 0.5 --output_dir outputs/table

Works on a ViT/DeiT used off the shelf (turned into EViT, no fine-tuning) and on a fine-tuned EViT checkpoint. With no
dataset argument it evaluates on the validation split of scikit-learn's bundled digits. Writes keep_rates.json and
keep_rates.md to --output_dir and prints the markdown table.
"""

import json
import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser

import evit_hf
from evit_hf.data import collate_images, image_transforms


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_image_classification import (  # noqa: E402
    DataTrainingArguments,
    ModelArguments,
    evit_class_for,
    head_label_mismatch,
    label_names,
    load_data,
    load_image_processor,
)


@dataclass
class EvaluationArguments:
    output_dir: str = field(metadata={"help": "Where keep_rates.json and keep_rates.md go."})
    keep_rates: list[float] = field(
        default_factory=lambda: [1.0, 0.9, 0.8, 0.7, 0.6, 0.5], metadata={"help": "Keep rates to evaluate."}
    )
    split: str = field(default="validation", metadata={"help": "Dataset split to evaluate on."})
    batch_size: int = field(default=64, metadata={"help": "Images per forward pass."})
    seed: int = field(default=0, metadata={"help": "Seed of the train/validation split where one is made."})
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu", metadata={"help": "cpu or cuda."})


def main(args=None) -> list[dict]:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, EvaluationArguments))
    args = sys.argv[1:] if args is None else list(args)
    if len(args) == 1 and args[0].endswith(".json"):
        model_args, data_args, eval_args = parser.parse_json_file(json_file=os.path.abspath(args[0]))
    else:
        model_args, data_args, eval_args = parser.parse_args_into_dataclasses(args=args)

    evit_class, checkpoint_config = evit_class_for(model_args.model_name_or_path, model_args)
    dataset = load_data(data_args, model_args, eval_args.seed)
    if eval_args.split not in dataset:
        raise ValueError(f"The dataset has no split {eval_args.split!r}; it has {list(dataset)}. Pass --split.")
    labels = label_names(dataset, data_args.label_column_name)
    mismatch = head_label_mismatch(checkpoint_config, labels)
    if mismatch is not None:
        # Same count, other names: the accuracy would compare unrelated classes.
        raise ValueError(
            f"{model_args.model_name_or_path} {mismatch}: evaluate a model fine-tuned on this dataset "
            "(examples/run_image_classification.py), or a dataset with the model's labels in its order."
        )
    settings = {"fuse_inattentive_tokens": model_args.fuse_inattentive_tokens}
    if model_args.reduction_layers is not None:
        settings["reduction_layers"] = model_args.reduction_layers
    model = evit_class.from_pretrained(
        model_args.model_name_or_path, cache_dir=model_args.cache_dir, token=model_args.token, **settings
    )
    model.to(eval_args.device)
    image_processor = load_image_processor(model_args, model.config)
    _, eval_transform = image_transforms(image_processor, data_args.image_column_name)
    split = dataset[eval_args.split]
    if data_args.max_eval_samples is not None:
        split = split.select(range(min(data_args.max_eval_samples, len(split))))
    split.set_transform(eval_transform)

    rows = evit_hf.evaluate_keep_rates(
        model,
        split,
        eval_args.keep_rates,
        eval_args.batch_size,
        collate_fn=lambda examples: collate_images(examples, data_args.label_column_name),
    )
    os.makedirs(eval_args.output_dir, exist_ok=True)
    markdown = evit_hf.results_markdown(rows)
    with open(os.path.join(eval_args.output_dir, "keep_rates.json"), "w") as handle:
        json.dump({"model": model_args.model_name_or_path, "device": eval_args.device, "rows": rows}, handle, indent=2)
    with open(os.path.join(eval_args.output_dir, "keep_rates.md"), "w") as handle:
        handle.write(markdown + "\n")
    print(markdown)
    return rows


if __name__ == "__main__":
    main()
