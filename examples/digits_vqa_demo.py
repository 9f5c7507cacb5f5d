#!/usr/bin/env python
"""EViT for a vision-language model, offline, in a few minutes on a CPU: a small LLaVA learns to answer "what digit is
this ?" about scikit-learn's handwritten digits, then answers with fewer image tokens.

1. builds a small LLaVA (a CLIP vision tower, a projector, a Llama language model; random weights) and trains it with
   `Trainer` at keep rate 1.0 (the stock model), the loss on the answer tokens only;
2. optionally fine-tunes it with reduction (`--finetune_keep_rate`): the projector and LoRA adapters on the language
   model (`--lora`, needs peft), the vision tower frozen;
3. prints the answer accuracy (`generate`, exact match) and the prefill time per prompt at keep rates 1.0, 0.7 and
   0.5 (default reduction layers) and at one reduction in the feature layer only.

    python examples/digits_vqa_demo.py --output_dir outputs/digits_vqa
"""

from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser

from evit_hf import default_reduction_layers
from evit_hf.vision_language_training import (
    add_lora_adapters,
    build_digits_llava,
    digits_vqa_dataset,
    evaluate_answers,
    freeze_all_but_projector,
    train_vision_language,
)


@dataclass
class DemoArguments:
    output_dir: str = field(default="outputs/digits_vqa", metadata={"help": "where Trainer writes (no checkpoints)"})
    epochs: float = field(default=12.0, metadata={"help": "training epochs at keep rate 1.0"})
    learning_rate: float = field(default=2e-3)
    batch_size: int = field(default=32)
    keep_rates: list[float] = field(default_factory=lambda: [1.0, 0.7, 0.5], metadata={"help": "evaluated rates"})
    feature_layer_keep_rate: float = field(default=0.5, metadata={"help": "the one reduction in the feature layer"})
    finetune_keep_rate: float | None = field(default=None, metadata={"help": "then fine-tune at this keep rate"})
    finetune_epochs: float = field(default=2.0)
    lora: bool = field(default=False, metadata={"help": "fine-tune LoRA adapters on the language model (peft)"})
    limit: int | None = field(default=None, metadata={"help": "use the first N examples of each split (quick runs)"})
    threads: int | None = field(default=None, metadata={"help": "torch threads (default: torch's)"})
    seed: int = field(default=0)


def schedules(arguments: DemoArguments, feature_layer: int) -> list[tuple[str, dict]]:
    """(name, EViT settings) of each evaluated row."""
    rows = [(f"keep {rate:g}, default layers", dict(keep_rate=rate, reduction_layers=None))
            for rate in arguments.keep_rates]  # fmt: skip
    rate = arguments.feature_layer_keep_rate
    rows.append((f"keep {rate:g}, layer {feature_layer} only", dict(keep_rate=rate, reduction_layers=[feature_layer])))
    return rows


def evaluate_schedules(model, processor, dataset, arguments: DemoArguments) -> list[dict]:
    feature_layer = min(model.config.feature_hidden_states) - 1
    results = []
    for name, settings in schedules(arguments, feature_layer):
        model.config.keep_rate = 1.0
        depth = model.config.vision_config.num_hidden_layers
        model.config.reduction_layers = settings["reduction_layers"] or default_reduction_layers(depth)
        model.config.keep_rate = settings["keep_rate"]
        results.append({"schedule": name, **evaluate_answers(model, processor, dataset)})
    return results


def print_table(title: str, results: list[dict]) -> None:
    print(f"\n{title}\n| schedule | image tokens | accuracy | prefill ms / prompt |\n|---|---|---|---|")
    for row in results:
        print(f"| {row['schedule']} | {row['image_tokens']} | {row['accuracy']:.3f} | {row['prefill_ms']:.2f} |")


def main(argv=None) -> dict:
    (arguments,) = HfArgumentParser(DemoArguments).parse_args_into_dataclasses(args=argv)
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    data = digits_vqa_dataset(seed=arguments.seed, limit=arguments.limit)
    model, processor = build_digits_llava(seed=arguments.seed)
    train_vision_language(
        model,
        processor,
        data["train"],
        arguments.output_dir,
        num_train_epochs=arguments.epochs,
        learning_rate=arguments.learning_rate,
        per_device_train_batch_size=arguments.batch_size,
        seed=arguments.seed,
        lr_scheduler_type="cosine",
        warmup_steps=10,
    )
    results = {"trained at keep 1.0": evaluate_schedules(model, processor, data["validation"], arguments)}
    print_table("Trained at keep rate 1.0 (validation)", results["trained at keep 1.0"])

    if arguments.finetune_keep_rate is not None:
        model.config.keep_rate = 1.0
        model.config.reduction_layers = default_reduction_layers(model.config.vision_config.num_hidden_layers)
        model.config.keep_rate = arguments.finetune_keep_rate
        processor.use_model_config(model.config)
        if arguments.lora:
            tuned = add_lora_adapters(model)
        else:
            freeze_all_but_projector(model)
            tuned = model
        train_vision_language(
            tuned,
            processor,
            data["train"],
            arguments.output_dir,
            num_train_epochs=arguments.finetune_epochs,
            learning_rate=arguments.learning_rate,
            per_device_train_batch_size=arguments.batch_size,
            seed=arguments.seed,
        )
        model = tuned.merge_and_unload() if arguments.lora else tuned
        name = f"fine-tuned at keep {arguments.finetune_keep_rate:g}{' (LoRA)' if arguments.lora else ''}"
        results[name] = evaluate_schedules(model, processor, data["validation"], arguments)
        print_table(f"{name[0].upper()}{name[1:]} (validation)", results[name])
    return results


if __name__ == "__main__":
    main()
