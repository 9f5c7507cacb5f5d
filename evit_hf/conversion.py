"""Conversion of timm-layout ViT/DeiT checkpoints into evit_hf folders ready for the Hub.

Reads the EViT reference's training checkpoints (`{"model", "model_ema", "optimizer", "epoch", "args", ...}`), bare
timm `VisionTransformer` state dicts (`.pth`, `.bin` or `.safetensors`) and DeiT/timm releases that hold the state
dict under `"model"`. The mapping functions (`timm_architecture`, `timm_to_hf_state_dict`, `settings_from_args`,
`parse_drop_loc`) work on dicts and tensors only and live in `evit_hf.timm_layout`; here `read_checkpoint` and
`split_checkpoint` read a file, and `convert_timm_checkpoint` builds the model and writes the folder.
"""

import argparse
import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

import torch

from .image_processing_evit import EViTImageProcessor
from .model_card import create_conversion_model_card
from .timm_layout import (
    HEAD_DIM,
    CheckpointConversionError,
    listed_names,
    parse_drop_loc,
    settings_from_args,
    timm_architecture,
    timm_to_hf_state_dict,
)


# The reference's evaluation transform: resize the shorter side to int(input_size / crop share), center crop.
CROP_SHARE = 0.875
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet1k_labels() -> list[str]:
    """The 1000 ImageNet-1k class names in the standard class-index order ("tench, Tinca tinca" first), shipped with
    the package as `evit_hf/data_files/imagenet1k_labels.txt`."""
    text = resources.files("evit_hf").joinpath("data_files", "imagenet1k_labels.txt").read_text(encoding="utf-8")
    return text.splitlines()


def reference_image_processor(input_size: int, num_channels: int = 3):
    """The reference's evaluation transform as a transformers image processor: resize the shorter side to
    `int(input_size / 0.875)` (bicubic), center crop `input_size`, normalize with the ImageNet mean and std.

    [`EViTImageProcessor`]: DeiT's PIL image processor (no torchvision needed) with the reference's placement of the
    center crop, to the pixel. `save_pretrained` writes its code next to the configuration, so that
    `AutoImageProcessor` loads it with evit_hf imported, or with `trust_remote_code=True`.

    For a model that takes one input channel (`num_channels=1`), the processor converts images to grayscale (PIL's
    luma) and normalizes with the ImageNet mean and std averaged over the three channels. No other channel count
    comes from a picture: it raises a `CheckpointConversionError`.
    """
    from transformers.image_utils import PILImageResampling

    if num_channels not in (1, 3):
        raise CheckpointConversionError(
            f"the model takes {num_channels} input channels (patch_embed.proj.weight), but images have 3 (RGB) or 1 "
            "(grayscale), so no image processor can feed it. Convert without an output folder "
            "(evit_hf.convert_timm_checkpoint(path) returns the model) and save it with a processor of your own."
        )
    grayscale = num_channels == 1
    return EViTImageProcessor(
        do_convert_grayscale=grayscale,
        do_resize=True,
        size={"shortest_edge": int(input_size / CROP_SHARE)},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": input_size, "width": input_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[sum(IMAGENET_MEAN) / 3] if grayscale else list(IMAGENET_MEAN),
        image_std=[sum(IMAGENET_STD) / 3] if grayscale else list(IMAGENET_STD),
    )


# ---------------------------------------------------------------------------------------------------------------
# I/O
# ---------------------------------------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Reads a checkpoint file without running any code from it.

    `.safetensors` files are read with safetensors; anything else with `torch.load(weights_only=True)`, which accepts
    tensors, plain containers and, here, `argparse.Namespace` (the reference's `args`) and nothing else. A pickle that
    needs any other object is refused before that object is created.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist or is not a file; give a .pth, .bin or .safetensors checkpoint."
        )
    if path.stat().st_size == 0:
        raise CheckpointConversionError(f"{path} is empty (0 bytes); give a .pth, .bin or .safetensors checkpoint.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as error:  # any failure to parse means the file is not a safetensors file
            raise CheckpointConversionError(
                f"cannot read {path} as a safetensors file ({_error_text(error)}); it is damaged or not a safetensors "
                "file. A file written by torch.save needs a .pth or .bin name."
            ) from None
    import pickle

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL\s+(\S+)", str(error))
        if found is None:
            # Not an object the safe unpickler refused, but bytes it cannot parse: not a torch.save file.
            detail = str(error).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
            raise CheckpointConversionError(_not_a_torch_file(path, " ".join(detail.split()))) from None
        raise CheckpointConversionError(
            f"refusing to read {path}: it holds Python objects other than tensors, containers and argparse.Namespace "
            f"(it needs {found.group(1)}), and unpickling them could run code from the file. If you trust the file, "
            "load it yourself and save only its weights, e.g. torch.save(checkpoint['model'], 'weights.pth')."
        ) from None
    except Exception as error:  # the unpickler fails on foreign bytes with any kind of exception
        raise CheckpointConversionError(_not_a_torch_file(path, _error_text(error))) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointConversionError(
            f"{path} holds a {type(checkpoint).__name__}, not a state dict or a training checkpoint (a dict)."
        )
    return checkpoint


def _not_a_torch_file(path: Path, detail: str) -> str:
    with open(path, "rb") as file:
        head = file.read(9)
    hint = (
        " It looks like a safetensors file: give it a .safetensors name."
        if len(head) == 9 and head[8:9] == b"{"
        else ""
    )
    return (
        f"cannot read {path} as a PyTorch checkpoint ({detail}); it is damaged or not a file written by torch.save."
        + hint
    )


def _error_text(error: BaseException) -> str:
    """An exception's type and message on one line; only the type where the message says nothing (an empty
    EOFError, a KeyError's bare key)."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text and not isinstance(error, KeyError) else type(error).__name__


def _state_dict_problem(value, where: str) -> str | None:
    """Why `value` is not a state dict (parameter names to floating-point tensors with data), or None."""
    if not isinstance(value, Mapping):
        return f"{where} is a {type(value).__name__}, not a state dict (a dict of parameter names to tensors)"
    if not value:
        return f"{where} is empty: it holds no weights"
    not_names = [repr(key) for key in value if not isinstance(key, str)]
    if not_names:
        return (
            f"{where} has keys that are not parameter names: {listed_names(not_names)}; a state dict maps names such "
            "as 'blocks.0.norm1.weight' to tensors"
        )
    not_tensors = [
        f"{key} ({type(item).__name__})" for key, item in value.items() if not isinstance(item, torch.Tensor)
    ]
    if not_tensors:
        return f"{where} has entries that are not tensors: {listed_names(not_tensors)}"
    without_data = [key for key, tensor in value.items() if tensor.is_meta]
    if without_data:
        return f"{where} has tensors without data (on the meta device): {listed_names(without_data)}"
    not_float = [f"{key} ({tensor.dtype})" for key, tensor in value.items() if not tensor.is_floating_point()]
    if not_float:
        return f"{where} has weights that are not floating-point numbers: {listed_names(not_float)}"
    return None


def _nested_state_dicts(value, path: str = "checkpoint", depth: int = 3) -> list[str]:
    """Where state dicts sit inside `value` (as `checkpoint['state_dict']`), looking `depth` levels down."""
    if depth == 0 or not isinstance(value, Mapping):
        return []
    found = []
    for key, item in value.items():
        inner = f"{path}[{key!r}]"
        if isinstance(item, Mapping) and _state_dict_problem(item, inner) is None:
            found.append(inner)
        else:
            found += _nested_state_dicts(item, inner, depth - 1)
    return found


def _nested_hint(value, path: str = "checkpoint") -> str:
    found = _nested_state_dicts(value, path)
    if not found:
        return ""
    return (
        f" It holds a state dict at {found[0]}: save that alone, e.g. torch.save({found[0]}, 'weights.pth'), and "
        "convert that file."
    )


def split_checkpoint(checkpoint: Mapping, use_ema: bool = False) -> tuple[dict, argparse.Namespace | None, str]:
    """The state dict to convert, the training arguments (or None) and a description of what was taken.

    A training checkpoint holds the state dict under `"model"` (and the EMA weights under `"model_ema"`); a bare
    state dict is taken as it is. Anything else raises a `CheckpointConversionError` that says what the file holds.
    """
    if "model" in checkpoint and not isinstance(checkpoint["model"], torch.Tensor):
        key = "model_ema" if use_ema else "model"
        if use_ema and checkpoint.get("model_ema") is None:
            raise CheckpointConversionError(
                "--use-ema (use_ema=True) asks for the EMA weights, but the checkpoint has no 'model_ema' entry "
                f"(it has: {', '.join(map(str, checkpoint))}). Leave out --use-ema to convert 'model'."
            )
        state_dict = checkpoint[key]
        problem = _state_dict_problem(state_dict, f"the checkpoint's {key!r} entry")
        if problem:
            raise CheckpointConversionError(f"{problem}.{_nested_hint(state_dict, f'checkpoint[{key!r}]')}")
        args = checkpoint.get("args")
        if args is not None and not isinstance(args, argparse.Namespace):
            raise CheckpointConversionError(
                f"the checkpoint's 'args' is a {type(args).__name__}, not the argparse.Namespace the reference saves."
            )
        kind = "training checkpoint" if args is not None else "checkpoint"
        epoch = checkpoint.get("epoch")
        description = f"{key!r} of a {kind}" + (f" (epoch {epoch})" if isinstance(epoch, int) else "")
        return dict(state_dict), args, description
    if use_ema:
        raise CheckpointConversionError(
            "--use-ema (use_ema=True) asks for the EMA weights, but the file is a bare state dict with no "
            "'model_ema' entry. Leave out --use-ema."
        )
    if not any(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        raise CheckpointConversionError(
            "the file is neither a state dict of tensors nor a checkpoint holding one under 'model' "
            f"(its entries: {listed_names([str(key) for key in checkpoint]) or 'none'}).{_nested_hint(checkpoint)}"
        )
    problem = _state_dict_problem(checkpoint, "the state dict")
    if problem:
        raise CheckpointConversionError(f"{problem}.")
    return dict(checkpoint), None, "state dict"


def _read_id2label(id2label, num_labels: int) -> dict[int, str]:
    """Label names from a JSON file or a mapping/list: `{"0": "cat", ...}` or `["cat", ...]`."""
    source = id2label
    if isinstance(id2label, (str, os.PathLike)):
        try:
            with open(id2label, encoding="utf-8") as file:
                id2label = json.load(file)
        except OSError as error:
            raise CheckpointConversionError(f"cannot read the id2label file {source}: {error.strerror}") from None
        except json.JSONDecodeError as error:
            raise CheckpointConversionError(f"the id2label file {source} is not valid JSON ({error})") from None
        except UnicodeDecodeError:
            raise CheckpointConversionError(
                f"the id2label file {source} is not UTF-8 text; save it as UTF-8 JSON"
            ) from None
    if isinstance(id2label, list):
        id2label = dict(enumerate(id2label))
    try:
        items = dict(id2label).items()
        # Names are text (numbers are taken as their text); a list or a mapping in a name's place is a layout error.
        labels = {int(index): str(name) for index, name in items if isinstance(name, (str, int, float))}
        labels = labels if len(labels) == len(items) else None
    except (TypeError, ValueError):
        labels = None
    if labels is None or sorted(labels) != list(range(len(labels))):
        raise CheckpointConversionError(
            f"the id2label {source if isinstance(source, (str, os.PathLike)) else 'mapping'} must map the class "
            'indices 0 to N-1 to names, as {"0": "tench", "1": "goldfish", ...} or a list of names.'
        )
    if len(labels) != num_labels:
        raise CheckpointConversionError(
            f"the id2label {source if isinstance(source, (str, os.PathLike)) else 'mapping'} has {len(labels)} "
            f"names, but the checkpoint's head has {num_labels} classes; give one name per class."
        )
    return labels


def _check_output_dir(output_dir, overwrite: bool, inputs) -> None:
    if output_dir is None:
        return
    from .outputs import POLICY_FILES, check_outputs_apart_from_inputs

    try:
        # Written where the checkpoint is, the converted weights would replace it.
        check_outputs_apart_from_inputs([("output_dir", str(output_dir))], inputs)
    except ValueError as error:
        raise CheckpointConversionError(str(error)) from None
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise CheckpointConversionError(f"the output folder {output_dir} is a file; give a folder name.")
    # The lock and the list of this project's files, which `evit-hf convert` keeps there while it runs, are no content.
    if output_dir.is_dir() and any(entry.name not in POLICY_FILES for entry in output_dir.iterdir()) and not overwrite:
        raise CheckpointConversionError(
            f"the output folder {output_dir} is not empty; give a new folder, or pass --overwrite "
            "(overwrite=True) to write into it."
        )


def convert_timm_checkpoint(
    checkpoint,
    output_dir: str | os.PathLike | None = None,
    *,
    keep_rate: float | None = None,
    reduction_layers: Sequence[int] | None = None,
    fuse_inattentive_tokens: bool | None = None,
    use_ema: bool = False,
    num_attention_heads: int | None = None,
    id2label=None,
    overwrite: bool = False,
):
    """Converts a timm-layout ViT/DeiT checkpoint (the EViT reference's training checkpoints, timm and DeiT releases)
    into an EViT model, and writes it as a complete folder when `output_dir` is given.

    Args:
        checkpoint (`str`, `os.PathLike` or `dict`):
            A `.pth`/`.bin` file (read with `torch.load(weights_only=True)`, allowing `argparse.Namespace` only), a
            `.safetensors` file, or such a checkpoint already in memory: a reference training checkpoint (`model`,
            `model_ema`, `args`, ...), a dict with the state dict under `model`, or a bare state dict.
        output_dir (`str` or `os.PathLike`, *optional*):
            Folder to write: `model.safetensors`, `config.json` with `auto_map` and the model code, the image
            processor and a model card (`README.md`). Created only once the conversion has succeeded.
        keep_rate (`float`, *optional*):
            Overrides the checkpoint's `args.base_keep_rate` (default without args: 0.7).
        reduction_layers (`list[int]`, *optional*):
            0-based reduction layers; overrides `args.drop_loc` (default without args: the paper's for the depth).
        fuse_inattentive_tokens (`bool`, *optional*):
            Overrides `args.fuse_token` (default without args: `True`).
        use_ema (`bool`, *optional*, defaults to `False`):
            Convert the checkpoint's `model_ema` instead of `model`.
        num_attention_heads (`int`, *optional*):
            Heads per layer; defaults to width / 64.
        id2label (`str`, `os.PathLike`, `dict` or `list`, *optional*):
            Class names (a JSON file or the names themselves). Defaults to the ImageNet-1k names for a 1000-way head
            and to `LABEL_i` otherwise (with a warning).
        overwrite (`bool`, *optional*, defaults to `False`):
            Write into an `output_dir` that is not empty.

    Returns:
        [`EViTForImageClassification`], or [`EViTDeiTForImageClassificationWithTeacher`] for distilled checkpoints,
        in eval mode.

    Raises:
        `CheckpointConversionError` (a `ValueError`) for a checkpoint or setting it cannot convert faithfully (keys
        it cannot map, unsafe pickles, ...), `FileNotFoundError` for a missing file. Nothing is written then.
    """
    from .configuration_evit import EViTConfig, check_keep_rate, default_reduction_layers
    from .configuration_evit_deit import EViTDeiTConfig
    from .modeling_evit import EViTForImageClassification
    from .modeling_evit_deit import EViTDeiTForImageClassificationWithTeacher

    _check_output_dir(
        output_dir,
        overwrite,
        inputs=[
            ("checkpoint", str(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else None),
            ("id2label", str(id2label) if isinstance(id2label, (str, os.PathLike)) else None),
        ],
    )
    source = str(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "a checkpoint in memory"
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = read_checkpoint(checkpoint)
    if not isinstance(checkpoint, Mapping):
        raise CheckpointConversionError(f"checkpoint must be a path or a dict, got {type(checkpoint).__name__}.")
    state_dict, args, source_kind = split_checkpoint(checkpoint, use_ema=use_ema)
    from_args = settings_from_args(args) if args is not None else {}

    architecture = timm_architecture(state_dict, num_attention_heads=num_attention_heads)
    distilled = architecture.pop("distilled")
    # The folder's image processor must make the pixels the model takes: made (and refused) before any work.
    image_processor = (
        reference_image_processor(architecture["image_size"], architecture["num_channels"])
        if output_dir is not None
        else None
    )
    hf_state_dict = timm_to_hf_state_dict(state_dict, distilled=distilled)
    depth, num_labels, image_size = (architecture[k] for k in ("num_hidden_layers", "num_labels", "image_size"))
    if from_args.get("num_labels", num_labels) != num_labels:
        raise CheckpointConversionError(
            f"the checkpoint's args.nb_classes is {from_args['num_labels']!r}, but its head has {num_labels} classes; "
            "the checkpoint is inconsistent."
        )
    if from_args.get("input_size", image_size) != image_size:
        raise CheckpointConversionError(
            f"the checkpoint's args.input_size is {from_args['input_size']!r}, but its position embeddings are for "
            f"{image_size} px images ({image_size // architecture['patch_size']} x "
            f"{image_size // architecture['patch_size']} patches); the checkpoint is inconsistent."
        )

    def choose(name, override, default):
        if override is not None:
            return override, "override"
        if name in from_args:
            return from_args[name], "checkpoint args"
        return default, "default"

    keep_rate, keep_rate_from = choose("keep_rate", keep_rate, 0.7)
    reduction_layers, layers_from = choose("reduction_layers", reduction_layers, default_reduction_layers(depth))
    fuse, fuse_from = choose("fuse_inattentive_tokens", fuse_inattentive_tokens, True)
    if isinstance(fuse, int) and not isinstance(fuse, bool) and fuse in (0, 1):
        fuse = bool(fuse)  # an args value saved as 0/1
    try:
        check_keep_rate(keep_rate)
    except ValueError as error:
        raise CheckpointConversionError(f"{error} (from the {keep_rate_from})") from None

    label_warning = None
    if id2label is not None:
        labels, labels_from = _read_id2label(id2label, num_labels), "id2label"
    elif num_labels == 1000:
        labels, labels_from = dict(enumerate(imagenet1k_labels())), "ImageNet-1k names"
    else:
        labels, labels_from = {index: f"LABEL_{index}" for index in range(num_labels)}, "LABEL_i"
        label_warning = (
            f"the checkpoint's head has {num_labels} classes and no id2label was given; the classes are named "
            "LABEL_0, LABEL_1, ... Pass --id2label FILE.json (id2label=...) to name them."
        )

    config_class, model_class = (
        (EViTDeiTConfig, EViTDeiTForImageClassificationWithTeacher)
        if distilled
        else (EViTConfig, EViTForImageClassification)
    )
    try:
        config = config_class(
            **{**architecture, "num_labels": num_labels},
            id2label=labels,
            label2id={name: index for index, name in labels.items()},
            keep_rate=keep_rate,
            reduction_layers=reduction_layers,
            fuse_inattentive_tokens=fuse,
            architectures=[model_class.__name__],
        )
    except ValueError as error:
        raise CheckpointConversionError(
            f"{' '.join(str(error).split())} (reduction layers from the {layers_from}, fusion from the {fuse_from})"
        ) from None
    model = model_class(config)
    try:
        model.load_state_dict(hf_state_dict, strict=True)
    except RuntimeError as error:
        raise CheckpointConversionError(
            f"the checkpoint's weights do not fit a {depth}-layer ViT/DeiT of width {architecture['hidden_size']}: "
            f"{' '.join(str(error).split())}"
        ) from None
    model.eval()
    if label_warning is not None:  # only for a conversion that goes through
        warnings.warn(label_warning, UserWarning, stacklevel=2)

    if output_dir is not None:
        output_dir = Path(output_dir)
        model.save_pretrained(output_dir)
        image_processor.save_pretrained(output_dir)
        create_conversion_model_card(
            model,
            repo_id=output_dir.resolve().name,
            source=Path(source).name if source != "a checkpoint in memory" else source,
            source_kind=source_kind,
            resize=int(model.config.image_size / CROP_SHARE),
            origins={
                "keep_rate_from": keep_rate_from,
                "reduction_layers_from": layers_from,
                "fuse_from": fuse_from,
                "heads_from": "given" if num_attention_heads is not None else f"width / {HEAD_DIM}",
                "labels_from": labels_from,
            },
        ).save(output_dir / "README.md")
    return model


__all__ = [
    "CheckpointConversionError",
    "convert_timm_checkpoint",
    "imagenet1k_labels",
    "parse_drop_loc",
    "read_checkpoint",
    "reference_image_processor",
    "settings_from_args",
    "split_checkpoint",
    "timm_architecture",
    "timm_to_hf_state_dict",
]
