"""Accuracy and speed of one model at several keep rates: the shape of the paper's Table 1.

The data is read once: each batch is decoded and transformed once (in data-loader workers) and run through the model
at every keep rate, so a table of six keep rates costs about one pass over the data where decoding dominates.
"""

import contextlib
import logging
import os
import time

import torch
from tqdm.auto import tqdm

from .configuration_evit_base import format_keep_rate
from .families import (
    FAMILIES,
    IMAGE_CLASSIFICATION,
    PIPELINE_AUTO_CLASSES,
    ZERO_SHOT_IMAGE_CLASSIFICATION,
    family_for_model,
    family_for_model_type,
)
from .macs import count_macs
from .messages import one_line
from .modeling_evit_base import stock_class


logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_num_workers() -> int:
    """Data-loader workers per process: the CPUs this process may use, shared among the processes of the machine
    (`LOCAL_WORLD_SIZE`, set by torchrun and accelerate launch), at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def resolve_dtype(dtype, device) -> torch.dtype:
    """The autocast dtype for `dtype` (a `torch.dtype`, its name, or None for float32) on `device`.

    float16 is refused on CPU: CPU kernels for it are slow or missing, and CPU runs in half precision use bfloat16."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, not {dtype!r}.")
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of {list(DTYPES.values())}, not {dtype}.")
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        raise ValueError("float16 is for CUDA devices; on CPU evaluate in bfloat16 (--dtype bfloat16) or float32.")
    return dtype


def _shard_for_this_process(dataset, rank: int, world_size: int):
    """This process's part of `dataset` as `(dataset, sampler)`: for a map-style dataset, a contiguous block of indices
    as the sampler (the blocks differ in size by at most one; no sample is repeated to even them out); for a
    `datasets.IterableDataset`, its shards (or every `world_size`-th example) for this process, and no sampler."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        import datasets
        from datasets.distributed import split_dataset_by_node

        if not isinstance(dataset, datasets.IterableDataset):
            raise ValueError(
                f"Cannot split a {type(dataset).__name__} among processes: pass a map-style dataset or a "
                "datasets.IterableDataset (load_dataset(..., streaming=True)), or evaluate in one process."
            )
        if dataset.num_shards >= world_size:
            # Whole shards per process (some get one more): each process reads and transforms only its own data.
            return split_dataset_by_node(dataset, rank, world_size, strategy="shards"), None
        logger.warning(
            f"The dataset has {dataset.num_shards} shard(s) for {world_size} processes: each process reads every "
            f"example and keeps one in {world_size}, transforming examples it then skips. Pass a dataset with more "
            "shards (datasets.IterableDataset.reshard() splits Parquet files by row group)."
        )
        return split_dataset_by_node(dataset, rank, world_size, strategy="examples"), None
    size = len(dataset)
    start, stop = rank * size // world_size, (rank + 1) * size // world_size
    return dataset, range(start, stop)


# The prompt of each class for zero-shot accuracy, as in CLIP's ImageNet evaluation: one per label name.
ZERO_SHOT_PROMPT = "a photo of a {label}."
CLASSIFIER, ZERO_SHOT = "classifier", "zero-shot"  # the kinds of accuracy a row reports


def accuracy_kind(model) -> str:
    """`"zero-shot"` for a model (or a model class) that its family (`evit_hf.FAMILIES`) loads as a zero-shot image
    classifier (image and text towers, no classifier: CLIP, MetaCLIP 2), `"classifier"` for an image classifier and
    for models of no family.

    Raises a `ValueError` for a family's model that is neither, such as a vision tower or a base model."""
    model_class = model if isinstance(model, type) else type(model)
    family = family_for_model(model_class)
    if family is None:
        return CLASSIFIER
    if model_class in family.auto_classes.get(PIPELINE_AUTO_CLASSES[ZERO_SHOT_IMAGE_CLASSIFICATION], ()):
        return ZERO_SHOT
    if model_class in family.auto_classes.get(PIPELINE_AUTO_CLASSES[IMAGE_CLASSIFICATION], ()):
        return CLASSIFIER
    zero_shot = ZERO_SHOT_IMAGE_CLASSIFICATION in family.pipelines
    raise ValueError(
        f"A {model_class.__name__} has no classification head, so it has no accuracy: evaluate a "
        f"{family.display_name} image classifier{' or zero-shot model' if zero_shot else ''}, or "
        "fine-tune one first (examples/run_image_classification.py)."
    )


def _named_by(config, model_classes) -> type | None:
    """The one of `model_classes` (EViT classes) that `config.architectures` names, by its own or its stock name."""
    architectures = set(getattr(config, "architectures", None) or [])
    return next(
        (each for each in model_classes if architectures & {each.__name__, stock_class(each).__name__}),
        None,
    )


def evaluation_model_class(config, name: str = "The checkpoint") -> type:
    """The EViT class that evaluates a checkpoint with configuration `config` (stock or EViT), from its family's
    record in `evit_hf.FAMILIES`: the zero-shot model where `config.architectures` names one (a CLIP or MetaCLIP 2
    model with both towers), else the family's image classifier (the first listed: DeiT's class head).

    Raises a one-line `ValueError` naming the families that can be evaluated for a checkpoint of any other kind."""
    classifier_auto_class = PIPELINE_AUTO_CLASSES[IMAGE_CLASSIFICATION]
    zero_shot_auto_class = PIPELINE_AUTO_CLASSES[ZERO_SHOT_IMAGE_CLASSIFICATION]
    family = family_for_model_type(getattr(config, "model_type", None))
    if family is not None:
        zero_shot_model = _named_by(config, family.auto_classes.get(zero_shot_auto_class, ()))
        if zero_shot_model is not None:
            return zero_shot_model
        classifiers = family.auto_classes.get(classifier_auto_class, ())
        if classifiers:
            return classifiers[0]
    evaluated = ", ".join(
        f"{each.display_name}" + (" (also zero-shot)" if zero_shot_auto_class in each.auto_classes else "")
        for each in FAMILIES
        if classifier_auto_class in each.auto_classes or zero_shot_auto_class in each.auto_classes
    )
    what = f"a {family.display_name} checkpoint, a family without" if family else "not a checkpoint of a family with"
    raise ValueError(
        f"{name} (model_type {getattr(config, 'model_type', None)!r}) is {what} an image classifier: accuracy is "
        f"measured for image classifiers of {evaluated}; pass a checkpoint of one of them."
    )


def zero_shot_text_embeddings(model, tokenizer, label_names, prompt: str = ZERO_SHOT_PROMPT) -> torch.Tensor:
    """The normalized text embeddings `[labels, projection]` of `prompt` for each label name (`{label}` stands for
    it), from `model`'s text tower: the class weights of zero-shot classification. `tokenizer` is the checkpoint's
    tokenizer or processor."""
    if "{label}" not in prompt:
        raise ValueError(f"The zero-shot prompt must hold {{label}}, where each label name goes; got {prompt!r}.")
    device = next(model.parameters()).device
    texts = [prompt.format(label=label) for label in label_names]
    tokens = _prompt_tokens(tokenizer, texts)
    _check_prompts_apart(tokenizer, tokens, label_names)
    inputs = {name: tokens[name].to(device) for name in ("input_ids", "attention_mask") if name in tokens}
    with torch.inference_mode():
        embeddings = model.get_text_features(**inputs).pooler_output.float()  # [labels, projection]
    return embeddings / embeddings.norm(dim=-1, keepdim=True)


def _prompt_tokens(tokenizer, texts: list[str]):
    """The tokenized prompts, or a one-line `ValueError` for a `tokenizer` that tokenizes no text: an image processor
    (what `AutoProcessor` gives for a folder without tokenizer files), or anything else."""
    try:
        tokens = tokenizer(text=texts, padding=True, truncation=True, return_tensors="pt")
    except (TypeError, ValueError, AttributeError) as error:
        problem = one_line(error)
    else:
        if "input_ids" in tokens:
            return tokens
        problem = f"it gives {', '.join(tokens)}, no input_ids"
    raise ValueError(
        f"tokenizer= ({type(tokenizer).__name__}) does not tokenize the class prompts ({problem}): zero-shot accuracy "
        "embeds them with the text tower; pass the checkpoint's tokenizer (AutoTokenizer.from_pretrained of a folder "
        "that holds its tokenizer files; tokenizer.save_pretrained writes them)."
    )


def _check_prompts_apart(tokenizer, tokens, label_names) -> None:
    """A one-line `ValueError` naming the labels whose prompts the tokenizer turns into the same tokens: cut to its
    maximum length, or made of words it does not know (its unknown token). Such classes get one text embedding, so
    zero-shot classification could never tell them apart."""
    masks = tokens.get("attention_mask")
    labels_by_tokens: dict[tuple[int, ...], list[str]] = {}
    for index, label in enumerate(label_names):
        ids = tokens["input_ids"][index]
        if masks is not None:
            ids = ids[masks[index].bool()]  # padding is no part of the prompt
        labels_by_tokens.setdefault(tuple(ids.tolist()), []).append(label)
    alike = [labels for labels in labels_by_tokens.values() if len(labels) > 1]
    if not alike:
        return
    groups = "; ".join(", ".join(repr(label) for label in labels) for labels in alike)
    max_length = getattr(tokenizer, "model_max_length", None)
    cut = f"cut at {max_length} tokens" if isinstance(max_length, int) and max_length < 10**6 else "cut"
    raise ValueError(
        f"The tokenizer ({type(tokenizer).__name__}) turns the class prompts of labels {groups} into the same tokens "
        f"(prompts are {cut}; words it does not know become its unknown token): zero-shot classification cannot tell "
        "these classes apart. Pass the checkpoint's own tokenizer, a shorter prompt, or label names that differ "
        "early and in words the tokenizer knows."
    )


def _zero_shot_logits(model, pixel_values, keep_rate, text_embeddings) -> torch.Tensor:
    """Cosine similarities `[batch, labels]` of the images (the vision tower at `keep_rate`) to the label prompts."""
    image_embeddings = model.get_image_features(pixel_values, keep_rate=keep_rate).pooler_output.float()
    image_embeddings = image_embeddings / image_embeddings.norm(dim=-1, keepdim=True)
    return image_embeddings @ text_embeddings.t()


def _hits(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """How many labels are among the `k` highest logits; ties go to the lower class, as in `evit_hf.TopKAccuracy`
    (and `argmax` for k = 1). logits: (batch, classes), labels: (batch,)."""
    if k == 1:
        return (logits.argmax(dim=1) == labels).sum()
    top_k = torch.argsort(logits, dim=1, descending=True, stable=True)[:, :k]  # (batch, k)
    return (top_k == labels[:, None]).any(dim=1).sum()


def evaluate_keep_rates(
    model,
    dataset,
    keep_rates=(1.0, 0.9, 0.8, 0.7, 0.6, 0.5),
    batch_size: int = 64,
    collate_fn=None,
    progress: bool = True,
    num_workers: int = 0,
    dtype: torch.dtype | str | None = None,
    distributed: bool = False,
    tokenizer=None,
    label_names=None,
    prompt: str = ZERO_SHOT_PROMPT,
) -> list[dict]:
    """Runs `model` over `dataset` once, each batch at every keep rate, and returns one row per keep rate.

    Each image is decoded and transformed once, however many keep rates there are. Top-1 follows `argmax` and top-5
    `evit_hf.TopKAccuracy` (ties go to the lower class).

    An image classifier's accuracy is that of its logits. A zero-shot model (CLIP's and MetaCLIP 2's image and text
    towers, `EViTCLIPModel`, `EViTMetaClip2Model`) is scored zero-shot: each class is `prompt` with its label name,
    embedded once by the text tower; an image's prediction is the class whose embedding is most similar (cosine) to
    the image's, from the vision tower at the row's keep rate. Only the vision tower is reduced.

    Args:
        model (an EViT image classifier or zero-shot model of any family in `evit_hf.FAMILIES`):
            The model, on the device to evaluate on; it is put in eval mode, its `config.keep_rate` is left alone.
        dataset (`torch.utils.data.Dataset` or `IterableDataset`):
            Items with "pixel_values" and "labels" after `collate_fn`: a map-style dataset (a list, a
            `datasets.Dataset` with `set_transform`) or an iterable one (`load_dataset(..., streaming=True)` with the
            transform in `.map`; a `datasets.IterableDataset` gives its shards to the data-loader workers).
        keep_rates (`Sequence[float]`): the keep rates, one row each, in this order.
        batch_size (`int`, *optional*, defaults to 64): images per forward pass.
        collate_fn (`Callable`, *optional*): makes a batch of items; defaults to `evit_hf.data.collate_images`.
        progress (`bool`, *optional*, defaults to `True`): a progress bar with images/s (on the main process only).
        num_workers (`int`, *optional*, defaults to 0):
            Data-loader worker processes that decode and transform (0: the calling process does). Items and
            `collate_fn` must be picklable where workers are spawned rather than forked (macOS, Windows).
        dtype (`torch.dtype` or `str`, *optional*):
            float32 (default), bfloat16 or float16 (CUDA only). Half precisions run under `torch.autocast`, on CPU
            as on CUDA, rather than casting the model: the weights stay float32, the matrix products run in half
            precision, and the residual stream stays float32 (a float32 input plus a half-precision branch is
            float32). CUDA autocast also keeps softmax and layer norm in float32; EViT scores tokens in float32.
        distributed (`bool`, *optional*, defaults to `False`):
            Every process of the initialized `torch.distributed` group calls this with the same arguments; each runs
            its part of the data (no sample is repeated to even out the parts) and every process gets the rows of the
            whole dataset. Leave it off when one process evaluates alone while a group is up.
        tokenizer (*optional*):
            A zero-shot model's tokenizer (or processor): it tokenizes the prompts. Needed for zero-shot models only.
        label_names (`Sequence[str]`, *optional*):
            A zero-shot model's classes, in the order of the dataset's labels (label 0 first). Zero-shot only.
        prompt (`str`, *optional*, defaults to `"a photo of a {label}."`):
            The text of each class for zero-shot accuracy; `{label}` stands for the label name.

    Returns:
        `list[dict]`: per keep rate, `keep_rate`, `accuracy_kind` (`"classifier"` or `"zero-shot"`: what `accuracy`
        is the accuracy of), `accuracy`, `top5_accuracy` (more than 5 classes), `images_per_s`
        (the forward passes only, CUDA synchronized around them; across processes, all images over the slowest
        process's time), `macs` (one image, from the configuration) and `samples` (the images evaluated).
    """
    from .data import collate_images

    keep_rates = list(keep_rates)
    if not keep_rates:
        raise ValueError("keep_rates is empty: pass at least one keep rate.")
    kind = accuracy_kind(model)
    if kind == ZERO_SHOT:
        if tokenizer is None or not label_names:
            raise ValueError(
                f"Zero-shot accuracy of a {type(model).__name__} needs tokenizer= (the checkpoint's tokenizer, for "
                "the prompts) and label_names= (the dataset's class names, label 0 first)."
            )
        num_labels = len(label_names)
    else:
        num_labels = model.config.num_labels
    collate_fn = collate_fn or collate_images
    model.eval()
    device = next(model.parameters()).device
    dtype = resolve_dtype(dtype, device)
    text_embeddings = zero_shot_text_embeddings(model, tokenizer, label_names, prompt) if kind == ZERO_SHOT else None
    rank, world_size = 0, 1
    if distributed:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ValueError(
                "distributed=True needs an initialized torch.distributed process group "
                "(torch.distributed.init_process_group under torchrun or accelerate launch)."
            )
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()

    sampler = None
    if distributed and world_size > 1:
        dataset, sampler = _shard_for_this_process(dataset, rank, world_size)
    is_iterable = isinstance(dataset, torch.utils.data.IterableDataset)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    total = None if is_iterable else len(sampler if sampler is not None else dataset)

    top_ks = [1, 5] if num_labels > 5 else [1]
    # Counts on the CPU (int64, exact): per keep rate, the top-1 and top-5 hits.
    hits = torch.zeros(len(keep_rates), len(top_ks), dtype=torch.int64)
    seconds = [0.0] * len(keep_rates)
    samples = 0
    image_size = (0, 0)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def precision():
        return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    bar = tqdm(total=total, unit="img", desc="evaluating", disable=not progress or rank != 0)
    start_time = time.perf_counter()
    with torch.inference_mode():
        for batch in loader:
            pixel_values = batch["pixel_values"].to(device, non_blocking=True)  # (batch, channels, height, width)
            labels = batch["labels"].to(device, non_blocking=True)  # (batch,)
            image_size = tuple(pixel_values.shape[-2:])
            batch_hits = []
            for index, keep_rate in enumerate(keep_rates):
                synchronize()  # the copy and the previous pass are not this pass's time
                start = time.perf_counter()
                with precision():
                    if text_embeddings is None:
                        logits = model(pixel_values, keep_rate=keep_rate).logits  # (batch, num_labels)
                    else:
                        logits = _zero_shot_logits(model, pixel_values, keep_rate, text_embeddings)
                synchronize()
                seconds[index] += time.perf_counter() - start
                logits = logits.float()
                batch_hits.append(torch.stack([_hits(logits, labels, k) for k in top_ks]))
            hits += torch.stack(batch_hits).cpu()
            samples += len(labels)
            bar.update(len(labels))
            bar.set_postfix({"images/s": f"{samples / (time.perf_counter() - start_time):.1f}"})
    bar.close()

    samples = torch.tensor([samples], dtype=torch.int64)
    timing = torch.tensor([*seconds, *image_size], dtype=torch.float64)
    if distributed and world_size > 1:
        # Sums of counts, the slowest process's forward time, and the image size (a process without data has none).
        on = device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
        counts = torch.cat([hits.flatten(), samples]).to(on)
        torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM)
        timing = timing.to(on)
        torch.distributed.all_reduce(timing, op=torch.distributed.ReduceOp.MAX)
        counts, timing = counts.cpu(), timing.cpu()
        hits, samples = counts[:-1].view_as(hits), counts[-1:]
    samples = int(samples.item())
    if samples == 0:
        raise ValueError("The dataset is empty: there is nothing to evaluate.")
    seconds, image_size = timing[: len(keep_rates)].tolist(), tuple(int(side) for side in timing[len(keep_rates) :])

    rows = []
    for index, keep_rate in enumerate(keep_rates):
        row = {"keep_rate": keep_rate, "accuracy_kind": kind, "accuracy": hits[index, 0].item() / samples}
        if len(top_ks) > 1:
            row["top5_accuracy"] = hits[index, 1].item() / samples
        row["images_per_s"] = samples / seconds[index]
        row["macs"] = count_macs(model.config, image_size=image_size, keep_rate=keep_rate)
        row["samples"] = samples
        rows.append(row)
    return rows


def results_markdown(rows: list[dict], title_column: str = "keep rate") -> str:
    """A markdown table of `evaluate_keep_rates` rows. Zero-shot accuracy says so in its header ("zero-shot
    accuracy"), or in a column of its own where the rows mix kinds."""
    has_top5 = any("top5_accuracy" in row for row in rows)
    kinds = {row.get("accuracy_kind", CLASSIFIER) for row in rows}
    mixed = len(kinds) > 1
    prefix = "zero-shot " if kinds == {ZERO_SHOT} else ""
    header = (
        f"| {title_column} |"
        + (" kind |" if mixed else "")
        + f" {prefix}accuracy |"
        + (f" {prefix}top-5 |" if has_top5 else "")
        + " images/s | MACs |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        cells = [format_keep_rate(row["keep_rate"]) + (" (the model's own)" if row.get("own_schedule") else "")]
        if mixed:
            cells.append(row.get("accuracy_kind", CLASSIFIER))
        cells.append(f"{100 * row['accuracy']:.2f}")
        if has_top5:
            cells.append(f"{100 * row.get('top5_accuracy', float('nan')):.2f}")
        cells += [f"{row['images_per_s']:.1f}", f"{row['macs'] / 1e6:.2f} M"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = [
    "ZERO_SHOT_PROMPT",
    "accuracy_kind",
    "evaluate_keep_rates",
    "evaluation_model_class",
    "results_markdown",
    "zero_shot_text_embeddings",
]
