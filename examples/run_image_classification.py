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
`--deepspeed` / `--fsdp` flags. The machinery lives in the package: `evit_hf.fine_tuning` (arguments, models,
labels, run settings), `evit_hf.checkpoints` (where training starts) and `evit_hf.outputs` (the output folder's lock
and list of this project's files, see docs/output_folders.md). A refusal prints one line and exits with status 2;
`main(args)` raises it as a `ValueError`.
"""

import copy
import json
import logging
import os
import sys
from dataclasses import dataclass, field

import datasets
import torch
import transformers
from transformers import HfArgumentParser, TrainingArguments

import evit_hf
from evit_hf.checkpoints import (
    EVALUATION_ONLY_RESULTS,
    EViTRunSettings,
    TrainingStart,
    finish_from_checkpoint,
    finished_run_results,
    holds_model,
    training_start,
)
from evit_hf.data import AugmentationRandomness, collate_images, image_transforms, with_sample_index
from evit_hf.distillation import DistillationTrainer
from evit_hf.fine_tuning import (
    DataTrainingArguments,
    DistillationArguments,
    ModelArguments,
    card_keep_rates,
    check_data_arguments,
    check_distillation_arguments,
    check_image_size,
    check_labels_match_head,
    check_model_arguments,
    check_teacher_predicts_labels,
    default_keep_rate,
    evit_class_for,
    evit_classifier_config,
    keep_rate_matching_macs,
    label_names,
    leave_process_group,
    load_data,
    load_evit_classifier,
    load_image_processor,
    publish,
    resize_to_image_size,
    run_script,
    run_settings,
    settings_config,
)
from evit_hf.macs import count_macs
from evit_hf.outputs import OutputFolder, check_outputs_apart_from_inputs


logger = logging.getLogger(__name__)

# The top-level names a run writes into --output_dir (Trainer's checkpoints and logs, the model folder, results and
# card), claimed before any work so that the rerun of a killed run finds them listed as this project's; whatever
# else appears during a run (remote-code files) is listed when it ends. See evit_hf.outputs.
OUTPUT_CLAIMS = [
    "checkpoint-[0-9]*",
    "runs",
    "trainer_state.json",
    "training_args.bin",
    "all_results.json",
    "train_results.json",
    "eval_results.json",
    "keep_rate_results.json",
    EVALUATION_ONLY_RESULTS,
    "config.json",
    "preprocessor_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-[0-9]*-of-[0-9]*.safetensors",
    "README.md",
]


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
    # The run's inputs (its starting model is also the teacher of a distillation) never overlap its output folder;
    # a checkpoint inside it is resumed from, unless --overwrite_output_dir would delete it first.
    inputs = [
        ("--model_name_or_path", model_args.model_name_or_path),
        ("--image_processor_name", model_args.image_processor_name),
        ("--dataset_name", data_args.dataset_name),
        ("--train_dir", data_args.train_dir),
        ("--validation_dir", data_args.validation_dir),
    ]
    if run_args.overwrite_output_dir and training_args.do_train:
        inputs.append(("--resume_from_checkpoint", training_args.resume_from_checkpoint))
    check_outputs_apart_from_inputs([("--output_dir", training_args.output_dir)], inputs)


def main(args=None) -> dict:
    model_args, data_args, training_args, distillation_args, run_args = parse_arguments(args)
    check_arguments(model_args, data_args, training_args, distillation_args, run_args)
    # One run at a time in --output_dir, for the whole run, and only into a folder of this project's files: the
    # process that writes (in a job of several processes, the one that saves) holds it; see evit_hf.outputs.
    output_folder = OutputFolder(training_args.output_dir, "--output_dir", claims=OUTPUT_CLAIMS)
    if training_args.should_save:
        output_folder.acquire()
    try:
        return run(model_args, data_args, training_args, distillation_args, run_args, output_folder)
    finally:
        output_folder.release()


def run(model_args, data_args, training_args, distillation_args, run_args, output_folder: OutputFolder) -> dict:
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
                for path in output_folder.clear():  # only what earlier runs of this project wrote
                    logger.info(f"--overwrite_output_dir: deleted {path}.")
    # An evaluation-only run leaves a model already in the folder, and the results of its runs, as they are.
    keeps_folder_model = training_args.do_eval and not training_args.do_train and holds_model(output_dir)

    # Clear errors before anything heavy.
    evit_class, checkpoint_config = evit_class_for(model_args.model_name_or_path, model_args)
    default_keep_rate(model_args, checkpoint_config)  # an EViT checkpoint's own schedule, unless flags name another
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


if __name__ == "__main__":
    run_script(main)
