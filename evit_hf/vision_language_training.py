"""Fine-tuning and evaluating EViT LLaVA models with `Trainer`: prompts with an image and an answer, the loss on the
answer tokens only, LoRA adapters on the language model (peft, optional), exact-match answer accuracy with `generate`
and the prefill time per keep rate. The machinery of `examples/digits_vqa_demo.py`, which builds a small LLaVA and
trains it on scikit-learn's digits to answer "what digit is this ?"."""

import math
import random
import time
from dataclasses import dataclass, field

import torch


IGNORED_LABEL = -100  # positions the loss skips (the prompt, the image placeholders, padding)
SCHEDULE_KEY = "evit_schedule"  # the batch entry that names its (reduction layers, keep rate) when they vary
DIGITS_QUESTION = "USER: <image> what digit is this ? ASSISTANT:"
DIGITS_WORDS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "USER:", "ASSISTANT:", "what", "digit", "is", "this", "?"]
DIGITS_WORDS += [str(digit) for digit in range(10)]


def word_level_tokenizer(words=DIGITS_WORDS, image_token: str = "<image>"):
    """A tokenizer of whole words split on spaces, built offline: `<pad>`, `<s>`, `</s>`, `<unk>` and the image token
    among `words`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": image_token},
    )


def answer_only_labels(input_ids: torch.Tensor, answer_lengths) -> torch.Tensor:
    """Labels for causal-LM training that score only the answers: each row's last `answer_lengths[i]` tokens keep their
    ids, every other position is -100 (`IGNORED_LABEL`). The model shifts labels itself (token t predicts t + 1)."""
    labels = torch.full_like(input_ids, IGNORED_LABEL)
    for row, length in enumerate(answer_lengths):
        if length > 0:
            labels[row, -length:] = input_ids[row, -length:]
    return labels


@dataclass
class ImageQuestionCollator:
    """Batches of `{"image", "answer"}` examples: the processor's prompt (question, image placeholders) followed by the
    answer and the end-of-sequence token, with labels on the answer tokens only.

    With `schedules`, a list of `(reduction_layers, keep_rate)`, each batch is drawn one of them at random (seeded by
    `seed`): its placeholders are that schedule's count, and the batch names it under `SCHEDULE_KEY`, for the trainer
    of `train_vision_language` to run the model with it (a batch may be collated ahead of the step before it)."""

    processor: object
    question: str = DIGITS_QUESTION
    schedules: list | None = None
    seed: int = 0
    _random: random.Random = field(init=False, repr=False)

    def __post_init__(self):
        self._random = random.Random(self.seed)

    def __call__(self, examples) -> dict:
        if not self.schedules:
            return self._collate(examples)
        reduction_layers, keep_rate = self._random.choice(self.schedules)
        model_schedule = self.processor.evit_schedule
        self.processor.evit_schedule = {**model_schedule, "reduction_layers": list(reduction_layers),
                                        "keep_rate": keep_rate}  # fmt: skip
        try:
            batch = self._collate(examples)
        finally:
            self.processor.evit_schedule = model_schedule
        batch[SCHEDULE_KEY] = (list(reduction_layers), keep_rate)
        return batch

    def _collate(self, examples) -> dict:
        eos = self.processor.tokenizer.eos_token
        texts = [f"{self.question} {example['answer']} {eos}" for example in examples]
        images = [example["image"] for example in examples]
        batch = self.processor(images=images, text=texts, return_tensors="pt")
        tokenizer = self.processor.tokenizer
        answer_lengths = [len(tokenizer(f"{example['answer']} {eos}", add_special_tokens=False).input_ids)
                          for example in examples]  # fmt: skip
        batch["labels"] = answer_only_labels(batch["input_ids"], answer_lengths)
        return dict(batch)


def pretrain_vision_tower(model, processor, train_dataset, epochs: float = 15, learning_rate: float = 2e-3,
                          batch_size: int = 64, seed: int = 0) -> list[float]:  # fmt: skip
    """Trains the vision tower of a LLaVA model to name the answer of each `{"image", "answer"}` example from its class
    token (a linear head on the pooled output, dropped afterwards), with the tower's whole depth at keep rate 1: a
    stand-in for the pretrained CLIP tower a real LLaVA starts from, whose class token summarises the image, so that
    its attention (which EViT keeps tokens by) points at what matters. Returns the mean loss of each epoch."""
    tower = model.kept_token_picture_tower
    answers = sorted(set(train_dataset["answer"]))
    labels = torch.tensor([answers.index(answer) for answer in train_dataset["answer"]])
    pixel_values = processor.image_processor(list(train_dataset["image"]), return_tensors="pt")["pixel_values"]
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(tower.config.hidden_size, len(answers))
    parameters = [parameter for parameter in tower.parameters() if parameter.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate)
    batches_per_epoch = math.ceil(len(labels) / batch_size)
    total_steps = max(1, round(epochs * batches_per_epoch))
    learning_rate_schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=learning_rate, total_steps=total_steps
    )
    device = next(tower.parameters()).device
    was_training, epoch_losses, step = tower.training, [], 0
    tower.train()
    vision = tower.config
    model_schedule = (list(vision.reduction_layers), vision.keep_rate)
    vision.set_schedule(keep_rate=1.0)
    try:
        while step < total_steps:
            order, losses = torch.randperm(len(labels), generator=generator), []
            for start in range(0, len(labels), batch_size):
                if step == total_steps:
                    break
                batch = order[start : start + batch_size]
                pooled = tower(pixel_values[batch].to(device)).pooler_output  # [batch, hidden]
                loss = torch.nn.functional.cross_entropy(head(pooled), labels[batch].to(device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                learning_rate_schedule.step()
                losses.append(loss.item())
                step += 1
            epoch_losses.append(sum(losses) / len(losses))
    finally:
        vision.set_schedule(*model_schedule)
        tower.train(was_training)
    return epoch_losses


def add_lora_adapters(model, rank: int = 8, alpha: int = 16, train_projector: bool = True):
    """LoRA adapters on the language model's attention projections (peft), with the projector trained in full when
    `train_projector`; everything else frozen. Returns the peft model."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ImportError("LoRA adapters need peft: pip install 'evit-hf[vlm]'.") from error
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)",
        modules_to_save=["multi_modal_projector"] if train_projector else None,
    )
    return get_peft_model(model, config)


def freeze_all_but_projector(model) -> None:
    """Trains only the projector (the vision tower and the language model stay as they are)."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad = ".multi_modal_projector." in f".{name}"


def _vision_config(model):
    """The EViT tower configuration of a LLaVA model, also through peft's and accelerate's wrappers."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return model.config.vision_config


def _schedule_switching_trainer():
    from transformers import Trainer

    class ScheduleSwitchingTrainer(Trainer):
        """A `Trainer` that runs each batch with the (reduction layers, keep rate) its collator drew."""

        def compute_loss(self, model, inputs, *args, **kwargs):
            schedule = inputs.pop(SCHEDULE_KEY, None)
            if schedule is not None:
                reduction_layers, keep_rate = schedule
                _vision_config(model).set_schedule(reduction_layers, keep_rate)
            return super().compute_loss(model, inputs, *args, **kwargs)

    return ScheduleSwitchingTrainer


def freeze_vision_tower(model) -> None:
    """Freezes the vision tower (LLaVA trains its projector and language model over a pretrained tower)."""
    for name, parameter in model.named_parameters():
        if ".vision_tower." in f".{name}":
            parameter.requires_grad = False


def train_vision_language(model, processor, train_dataset, output_dir: str, schedules=None, seed: int = 0,
                          **training_arguments):  # fmt: skip
    """Fine-tunes `model` on `{"image", "answer"}` examples with `Trainer` (loss on the answer tokens); returns the
    trainer's `TrainOutput`. `training_arguments` go to `TrainingArguments` (epochs, learning rate, batch size...).

    `schedules`, a list of `(reduction_layers, keep_rate)`, trains each batch at one of them drawn at random, so that
    one model answers at each (the model's own schedule is restored afterwards); by default every batch runs the
    model's schedule."""
    from transformers import TrainingArguments

    defaults = dict(report_to=[], save_strategy="no", logging_strategy="no", remove_unused_columns=False,
                    use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0)  # fmt: skip
    arguments = TrainingArguments(output_dir=output_dir, seed=seed, **{**defaults, **training_arguments})
    if schedules:
        from .processing_evit_llava import EViTLlavaProcessor

        if not isinstance(processor, EViTLlavaProcessor):
            raise ValueError("training at several schedules needs an EViTLlavaProcessor, which writes each one's "
                             f"placeholder count; got {type(processor).__name__}")  # fmt: skip
        processor.use_model_config(model.config)
    vision_config = _vision_config(model)
    model_schedule = (list(vision_config.reduction_layers), vision_config.keep_rate)
    trainer = _schedule_switching_trainer()(
        model=model,
        args=arguments,
        train_dataset=train_dataset,
        data_collator=ImageQuestionCollator(processor, schedules=schedules, seed=seed),
    )
    try:
        return trainer.train()
    finally:
        vision_config.set_schedule(*model_schedule)


def evaluate_answers(model, processor, dataset, batch_size: int = 64, max_new_tokens: int = 2) -> dict:
    """Exact-match accuracy of the first word `generate` answers with (greedy), and the prefill time per prompt (the
    forward pass over the prompt: vision tower, projector, language model), in ms, median over batches."""
    from .processing_evit_llava import EViTLlavaProcessor

    if isinstance(processor, EViTLlavaProcessor):
        processor.use_model_config(model.config)
    model.eval()
    correct, prefill_seconds = 0, []
    for start in range(0, len(dataset), batch_size):
        examples = dataset[start : start + batch_size]
        images, answers = examples["image"], examples["answer"]
        inputs = processor(images=images, text=[DIGITS_QUESTION] * len(images), return_tensors="pt")
        with torch.inference_mode():
            began = time.perf_counter()
            model(**inputs, logits_to_keep=1)
            prefill_seconds.append((time.perf_counter() - began) / len(images))
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        for tokens, answer in zip(processor.batch_decode(new_tokens, skip_special_tokens=True), answers, strict=True):
            words = tokens.split()
            correct += bool(words) and words[0] == str(answer)
    prefill_seconds.sort()
    return {
        "accuracy": correct / len(dataset),
        "prefill_ms": 1000 * prefill_seconds[len(prefill_seconds) // 2],
        "image_tokens": model.config.image_feature_count(),
    }


def digits_vqa_dataset(validation_fraction: float = 0.2, seed: int = 0, size: int = 32, limit: int | None = None):
    """scikit-learn's digits as `{"image": RGB PIL image of `size` px, "answer": "3"}` examples: a `DatasetDict` with
    "train" and "validation" (stratified). `limit` keeps the first examples of each split (quick runs)."""
    from PIL import Image

    from .data import digits_dataset

    digits = digits_dataset(validation_fraction=validation_fraction, seed=seed)

    def convert(batch):
        images = [image.convert("RGB").resize((size, size), Image.NEAREST) for image in batch["image"]]
        return {"image": images, "answer": [str(label) for label in batch["label"]]}

    splits = {}
    for name, split in digits.items():
        if limit is not None:
            split = split.select(range(min(limit, len(split))))
        splits[name] = split.map(convert, batched=True, remove_columns=["label"])
    from datasets import DatasetDict

    return DatasetDict(splits)


def build_digits_llava(
    image_size: int = 32,
    patch_size: int = 4,
    vision_layers: int = 4,
    vision_hidden: int = 64,
    text_layers: int = 2,
    text_hidden: int = 64,
    seed: int = 0,
):
    """A small randomly initialised EViT LLaVA (keep rate 1: the stock model) and its processor, for the digits
    questions: a CLIP tower of `vision_layers` layers on `patch_size`-px patches, a Llama language model of the digits'
    words."""
    try:  # the PIL backend by name (CLIPImageProcessor falls back to it without torchvision, with a warning)
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    from .configuration_evit_llava import EViTLlavaConfig
    from .modeling_evit_llava import EViTLlavaForConditionalGeneration
    from .processing_evit_llava import EViTLlavaProcessor

    tokenizer = word_level_tokenizer()
    config = EViTLlavaConfig(
        vision_config=dict(
            hidden_size=vision_hidden,
            num_hidden_layers=vision_layers,
            num_attention_heads=4,
            intermediate_size=2 * vision_hidden,
            image_size=image_size,
            patch_size=patch_size,
        ),
        text_config=dict(
            model_type="llama",
            hidden_size=text_hidden,
            num_hidden_layers=text_layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=2 * text_hidden,
            vocab_size=len(tokenizer),
            max_position_embeddings=4 * (image_size // patch_size) ** 2,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        keep_rate=1.0,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = EViTLlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = EViTLlavaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    processor.use_model_config(model.config)
    return model, processor


__all__ = [
    "DIGITS_QUESTION",
    "IGNORED_LABEL",
    "ImageQuestionCollator",
    "SCHEDULE_KEY",
    "add_lora_adapters",
    "answer_only_labels",
    "build_digits_llava",
    "digits_vqa_dataset",
    "evaluate_answers",
    "freeze_all_but_projector",
    "freeze_vision_tower",
    "pretrain_vision_tower",
    "train_vision_language",
    "word_level_tokenizer",
]
