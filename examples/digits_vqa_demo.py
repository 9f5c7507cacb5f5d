#!/usr/bin/env python
"""EViT for a vision-language model, offline, in a few minutes on a CPU: a small LLaVA learns to answer "what digit is
this ?" about scikit-learn's handwritten digits, then answers with fewer image tokens.

1. builds a small LLaVA (a CLIP vision tower, a projector, a Llama language model; random weights) and trains its
   vision tower to name the digit from its class token: LLaVA starts from a pretrained CLIP tower, whose class token
   summarises the image, and EViT keeps the patches that class token attends to;
2. trains the projector and the language model with `Trainer` at keep rate 1.0 (the stock model), the tower frozen as
   LLaVA's is, the loss on the answer tokens only;
3. prints the answer accuracy (`generate`, exact match) and the prefill time per prompt at keep rates 1.0, 0.7 and
   0.5 (default reduction layers) and at one reduction in the feature layer only, without fine-tuning;
4. fine-tunes it with reduction, as EViT is trained: each batch at one of those schedules drawn at random, so that one
   model answers at each (`--finetune_keep_rate` fine-tunes at one keep rate instead; `--lora` trains LoRA adapters
   on the language model and the projector (needs peft), `--projector_only` the projector alone), and prints the
   table again.

    python examples/digits_vqa_demo.py --output_dir outputs/digits_vqa
"""

import importlib.util
import json
import os
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser

from evit_hf import default_reduction_layers
from evit_hf.configuration_evit_base import check_keep_rate
from evit_hf.fine_tuning import run_script
from evit_hf.outputs import OutputFolder
from evit_hf.vision_language_training import (
    add_lora_adapters,
    build_digits_llava,
    digits_vqa_dataset,
    evaluate_answers,
    freeze_all_but_projector,
    freeze_vision_tower,
    pretrain_vision_tower,
    train_vision_language,
)


@dataclass
class DemoArguments:
    output_dir: str = field(default="outputs/digits_vqa", metadata={"help": "where the results go (digits_vqa.md)"})
    tower_epochs: float = field(default=15.0, metadata={"help": "epochs of the vision tower's digit naming"})
    epochs: float = field(default=10.0, metadata={"help": "training epochs at keep rate 1.0"})
    learning_rate: float = field(default=2e-3)
    batch_size: int = field(default=32)
    keep_rates: list[float] = field(default_factory=lambda: [1.0, 0.7, 0.5], metadata={"help": "evaluated rates"})
    feature_layer_keep_rate: float = field(default=0.5, metadata={"help": "the one reduction in the feature layer"})
    finetune: bool = field(default=True, metadata={"help": "then fine-tune with reduction (--no_finetune: skip)"})
    finetune_keep_rate: float | None = field(
        default=None, metadata={"help": "fine-tune at this keep rate (default layers), not at each evaluated schedule"}
    )
    finetune_epochs: float = field(default=3.0)
    finetune_learning_rate: float = field(default=1e-3)
    lora: bool = field(default=False, metadata={"help": "fine-tune LoRA adapters on the language model (peft)"})
    projector_only: bool = field(default=False, metadata={"help": "fine-tune the projector alone"})
    limit: int | None = field(default=None, metadata={"help": "use the first N examples of each split (quick runs)"})
    threads: int | None = field(default=None, metadata={"help": "torch threads (default: torch's)"})
    seed: int = field(default=0)


OUTPUT_CLAIMS = ["digits_vqa.json", "digits_vqa.md"]


def check_arguments(arguments: DemoArguments) -> None:
    """Refuses impossible arguments, one line each, before any data or model is loaded."""
    for flag, rates in (("--keep_rates", arguments.keep_rates), ("--feature_layer_keep_rate",
                        [arguments.feature_layer_keep_rate]), ("--finetune_keep_rate",
                        [] if arguments.finetune_keep_rate is None else [arguments.finetune_keep_rate])):  # fmt: skip
        for rate in rates:
            try:
                check_keep_rate(rate)
            except ValueError as error:
                raise ValueError(f"{flag}: {error}") from None
    for flag, value in (("--tower_epochs", arguments.tower_epochs), ("--epochs", arguments.epochs),
                        ("--finetune_epochs", arguments.finetune_epochs), ("--learning_rate", arguments.learning_rate),
                        ("--finetune_learning_rate", arguments.finetune_learning_rate)):  # fmt: skip
        if not value > 0:
            raise ValueError(f"{flag} must be a positive number; got {value}.")
    for flag, value in (("--batch_size", arguments.batch_size), ("--limit", arguments.limit),
                        ("--threads", arguments.threads)):  # fmt: skip
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1; got {value}.")
    if arguments.lora and arguments.projector_only:
        raise ValueError("--lora trains LoRA adapters and the projector, --projector_only the projector alone: "
                         "pass one of them.")  # fmt: skip
    given = {"--finetune_keep_rate": arguments.finetune_keep_rate is not None, "--lora": arguments.lora,
             "--projector_only": arguments.projector_only}  # fmt: skip
    fine_tuning_flags = [flag for flag, was_given in given.items() if was_given]
    if not arguments.finetune and fine_tuning_flags:
        raise ValueError(
            f"{fine_tuning_flags[0]} sets the fine-tuning that --no_finetune skips: leave out one of them."
        )
    if arguments.lora and arguments.finetune and importlib.util.find_spec("peft") is None:
        raise ValueError("--lora needs peft: pip install 'evit-hf[vlm]', or leave out --lora.")


def schedules(model, arguments: DemoArguments) -> list[tuple[str, list[int], float]]:
    """(name, reduction layers, keep rate) of each evaluated row: each keep rate at the default layers, then one
    reduction in the feature layer (the 0-based layer whose output the language model reads)."""
    depth = model.config.vision_config.num_hidden_layers
    rows = [(f"keep {rate:g}, default layers", default_reduction_layers(depth), rate) for rate in arguments.keep_rates]
    feature_layer, rate = min(model.config.feature_hidden_states) - 1, arguments.feature_layer_keep_rate
    rows.append((f"keep {rate:g}, layer {feature_layer} only", [feature_layer], rate))
    return rows


def evaluate_schedules(model, processor, dataset, arguments: DemoArguments) -> list[dict]:
    results = []
    for name, reduction_layers, keep_rate in schedules(model, arguments):
        model.config.vision_config.set_schedule(reduction_layers, keep_rate)
        results.append({"schedule": name, **evaluate_answers(model, processor, dataset)})
    return results


def markdown_table(title: str, results: list[dict]) -> str:
    lines = [f"{title}\n", "| schedule | image tokens | accuracy | prefill ms / prompt |", "|---|---|---|---|"]
    for row in results:
        lines.append(
            f"| {row['schedule']} | {row['image_tokens']} | {row['accuracy']:.3f} | {row['prefill_ms']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    (arguments,) = HfArgumentParser(DemoArguments).parse_args_into_dataclasses(args=argv)
    check_arguments(arguments)
    # The demo holds --output_dir (see evit_hf.outputs) from before any work: it writes its results there.
    output_folder = OutputFolder(arguments.output_dir, "--output_dir", claims=OUTPUT_CLAIMS)
    output_folder.acquire()
    try:
        return run_demo(arguments)
    finally:
        output_folder.release()


def run_demo(arguments: DemoArguments) -> dict:
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    data = digits_vqa_dataset(seed=arguments.seed, limit=arguments.limit)
    model, processor = build_digits_llava(seed=arguments.seed)
    pretrain_vision_tower(model, processor, data["train"], epochs=arguments.tower_epochs, seed=arguments.seed)
    freeze_vision_tower(model)
    training = dict(per_device_train_batch_size=arguments.batch_size, seed=arguments.seed, lr_scheduler_type="cosine")
    train_vision_language(model, processor, data["train"], arguments.output_dir, num_train_epochs=arguments.epochs,
                          learning_rate=arguments.learning_rate, warmup_steps=10, **training)  # fmt: skip
    tables = {"trained at keep 1.0": evaluate_schedules(model, processor, data["validation"], arguments)}
    titles = {"trained at keep 1.0": "Trained at keep rate 1.0, then reduced without fine-tuning (validation)"}

    if arguments.finetune:
        if arguments.finetune_keep_rate is not None:
            depth = model.config.vision_config.num_hidden_layers
            finetune_schedules = [(default_reduction_layers(depth), arguments.finetune_keep_rate)]
            name = f"fine-tuned at keep {arguments.finetune_keep_rate:g}"
        else:
            finetune_schedules = [(layers, rate) for _, layers, rate in schedules(model, arguments)]
            name = "fine-tuned with reduction"
        if arguments.lora:
            tuned, name = add_lora_adapters(model), f"{name} (LoRA)"
        elif arguments.projector_only:
            freeze_all_but_projector(model)
            tuned, name = model, f"{name} (projector)"
        else:
            tuned = model
        train_vision_language(tuned, processor, data["train"], arguments.output_dir, schedules=finetune_schedules,
                              num_train_epochs=arguments.finetune_epochs,
                              learning_rate=arguments.finetune_learning_rate, **training)  # fmt: skip
        model = tuned.merge_and_unload() if arguments.lora else tuned
        tables[name] = evaluate_schedules(model, processor, data["validation"], arguments)
        drawn = ", each batch at one of these schedules" if arguments.finetune_keep_rate is None else ""
        titles[name] = f"{name[0].upper()}{name[1:]}{drawn} (validation)"

    markdown = "\n\n".join(markdown_table(titles[name], rows) for name, rows in tables.items())
    print("\n" + markdown)
    with open(os.path.join(arguments.output_dir, "digits_vqa.json"), "w") as handle:
        json.dump(tables, handle, indent=1)
    with open(os.path.join(arguments.output_dir, "digits_vqa.md"), "w") as handle:
        handle.write(markdown + "\n")
    return tables


if __name__ == "__main__":
    run_script(main)
