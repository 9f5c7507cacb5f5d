"""The layout of timm's ViT/DeiT checkpoints and its mapping onto transformers' ViT/DeiT: the architecture read
from the weights (`timm_architecture`), the renamed and split state dict (`timm_to_hf_state_dict`), and the EViT
settings of the reference's training `args` (`settings_from_args`, `parse_drop_loc`). Dicts and tensors only, no
I/O: `evit_hf.conversion` reads the files and writes the folder."""

import argparse
import ast
import math
import re
from collections.abc import Mapping, Sequence

import torch


# timm's ViT/DeiT LayerNorm epsilon; transformers' ViT/DeiT configurations default to 1e-12, which moves the logits.
TIMM_LAYER_NORM_EPS = 1e-6
# Heads cannot be read from the weights; every ViT/DeiT of the paper and of timm's releases uses 64 per head.
HEAD_DIM = 64

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
# timm block parameters and their names in the transformers ViT/DeiT layers (qkv is split separately).
_BLOCK_RENAMES = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.o_proj",
    "norm2": "layernorm_after",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


class CheckpointConversionError(ValueError):
    """A checkpoint that `convert_timm_checkpoint` refuses: the message says what is wrong and what to do."""


def listed_names(names: list[str], shown: int = 10) -> str:
    """The first `shown` of `names`, comma-separated, and how many more there are."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def parse_drop_loc(drop_loc) -> list[int]:
    """The reduction layers of the reference's `--drop_loc` argument: 0-based layer indices given as a string such as
    `"(3, 6, 9)"` (also a list, a tuple or a single index)."""
    value = drop_loc
    if isinstance(drop_loc, str):
        try:
            value = ast.literal_eval(drop_loc.strip())
        except (ValueError, SyntaxError):
            value = None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(index, int) and not isinstance(index, bool) for index in value
    ):
        raise CheckpointConversionError(
            f"the checkpoint's args.drop_loc is {drop_loc!r}; expected 0-based layer indices such as '(3, 6, 9)'. "
            "Pass --reduction-layers (reduction_layers=...) to set the layers yourself."
        )
    return list(value)


def settings_from_args(args) -> dict:
    """The EViT settings and shapes recorded in a reference training checkpoint's `args` (an `argparse.Namespace`).

    Returns a dict with `keep_rate`, `reduction_layers`, `fuse_inattentive_tokens`, `input_size` and `num_labels`,
    holding only the ones `args` has.
    """
    names = {
        "base_keep_rate": "keep_rate",
        "drop_loc": "reduction_layers",
        "fuse_token": "fuse_inattentive_tokens",
        "input_size": "input_size",
        "nb_classes": "num_labels",
    }
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    settings = {ours: values[theirs] for theirs, ours in names.items() if values.get(theirs) is not None}
    if "reduction_layers" in settings:
        settings["reduction_layers"] = parse_drop_loc(settings["reduction_layers"])
    return settings


def _square_side(count: int) -> int | None:
    side = math.isqrt(count)
    return side if side * side == count else None


def _block_indices(state_dict: Mapping) -> list[int]:
    return sorted({int(match.group(1)) for key in state_dict if (match := _BLOCK_KEY.match(key))})


def _required(state_dict: Mapping, keys: Sequence[str]) -> None:
    missing = [key for key in keys if key not in state_dict]
    if missing:
        raise CheckpointConversionError(
            f"the checkpoint lacks weights a timm VisionTransformer has: {', '.join(missing)}. Give a ViT/DeiT state "
            "dict in timm's layout (cls_token, pos_embed, patch_embed.proj.*, blocks.N.*, norm.*, head.*)."
        )


def _check_dimensions(state_dict: Mapping, layouts: Mapping[str, str]) -> None:
    """Each named tensor has as many dimensions as its `layout` (such as "[1, 1, width]") lists, and no side of 0."""
    for key, layout in layouts.items():
        shape = list(state_dict[key].shape)
        if len(shape) != layout.count(",") + 1 or 0 in shape:
            raise CheckpointConversionError(
                f"{key} has shape {shape}; a timm VisionTransformer's {key} is {layout}. Is the file a ViT/DeiT "
                "state dict?"
            )


def _check_shapes(state_dict: Mapping, architecture: dict, distilled: bool) -> None:
    """Every weight has the shape the architecture read from the others gives it: one error lists all that do not."""
    width, classes = architecture["hidden_size"], architecture["num_labels"]
    patch, mlp = architecture["patch_size"], architecture["intermediate_size"]
    grid, depth = architecture["image_size"] // patch, architecture["num_hidden_layers"]
    expected = {
        "cls_token": [1, 1, width],
        "dist_token": [1, 1, width],
        "pos_embed": [1, (2 if distilled else 1) + grid * grid, width],
        "patch_embed.proj.weight": [width, architecture["num_channels"], patch, patch],
        "patch_embed.proj.bias": [width],
        "norm.weight": [width],
        "norm.bias": [width],
        "head.weight": [classes, width],
        "head.bias": [classes],
        "head_dist.weight": [classes, width],
        "head_dist.bias": [classes],
    }
    block_shapes = {
        "norm1": ([width], [width]),
        "attn.qkv": ([3 * width, width], [3 * width]),
        "attn.proj": ([width, width], [width]),
        "norm2": ([width], [width]),
        "mlp.fc1": ([mlp, width], [mlp]),
        "mlp.fc2": ([width, mlp], [width]),
    }
    for index in range(depth):
        for name, (weight, bias) in block_shapes.items():
            expected[f"blocks.{index}.{name}.weight"] = weight
            expected[f"blocks.{index}.{name}.bias"] = bias
    wrong = [
        f"{key} {list(tensor.shape)} (expected {expected[key]})"
        for key, tensor in state_dict.items()
        if key in expected and list(tensor.shape) != expected[key]
    ]
    if wrong:
        raise CheckpointConversionError(
            f"{len(wrong)} weight(s) do not fit a {depth}-layer ViT/DeiT of width {width} with {classes} classes "
            f"(read from cls_token, blocks.N, blocks.0.mlp.fc1 and head): {listed_names(wrong)}."
        )
    with_bias = [index for index in range(depth) if f"blocks.{index}.attn.qkv.bias" in state_dict]
    if with_bias and len(with_bias) != depth:
        without = sorted(set(range(depth)) - set(with_bias))
        raise CheckpointConversionError(
            f"blocks {', '.join(map(str, with_bias))} have a qkv bias (attn.qkv.bias) and blocks "
            f"{', '.join(map(str, without))} do not; transformers' ViT/DeiT use one setting (qkv_bias) for all layers."
        )


def timm_architecture(state_dict: Mapping[str, torch.Tensor], num_attention_heads: int | None = None) -> dict:
    """The transformers configuration fields of a timm-layout ViT/DeiT state dict, read from the weights' shapes.

    Width, depth, patch size, channels, image size (a square grid of patches from `pos_embed`), MLP width and qkv bias
    come from the weights; heads are `width / 64` unless `num_attention_heads` is given. LayerNorm epsilon and GELU
    are timm's (1e-6, exact GELU). Returns the configuration fields plus `distilled` (a `dist_token` is present).
    """
    _required(state_dict, ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "head.weight"))
    depth_indices = _block_indices(state_dict)
    if not depth_indices:
        raise CheckpointConversionError("the checkpoint has no transformer blocks (blocks.N.*); is it a timm ViT?")
    if depth_indices != list(range(len(depth_indices))):
        raise CheckpointConversionError(
            f"the checkpoint's blocks are numbered {depth_indices}; expected 0 to {len(depth_indices) - 1} with no "
            "gaps."
        )
    _check_dimensions(
        state_dict,
        {
            "cls_token": "[1, 1, width]",
            "pos_embed": "[1, positions, width]",
            "patch_embed.proj.weight": "[width, channels, patch, patch]",
            "head.weight": "[classes, width]",
        },
    )
    hidden_size = state_dict["cls_token"].shape[-1]
    projection = state_dict["patch_embed.proj.weight"]  # [width, channels, patch, patch]
    if projection.shape[2] != projection.shape[3]:
        raise CheckpointConversionError(
            f"patch_embed.proj.weight has shape {list(projection.shape)}; only square patches "
            "([width, channels, p, p]) map to transformers' ViT/DeiT."
        )
    distilled = "dist_token" in state_dict
    num_prefix_tokens = 2 if distilled else 1
    positions = state_dict["pos_embed"].shape[1]
    grid = _square_side(positions - num_prefix_tokens)
    if grid is None or grid == 0:
        raise CheckpointConversionError(
            f"pos_embed has {positions} positions, which is not {num_prefix_tokens} prefix token(s) plus a square "
            "grid of patches; non-square grids and position embeddings without the prefix tokens' positions have no "
            "transformers ViT/DeiT equivalent."
        )
    if num_attention_heads is None:
        num_attention_heads = hidden_size // HEAD_DIM
        if num_attention_heads == 0 or hidden_size % HEAD_DIM:
            raise CheckpointConversionError(
                f"the width {hidden_size} is not a multiple of {HEAD_DIM}, so the number of attention heads cannot be "
                "inferred; pass --num-attention-heads (num_attention_heads=...)."
            )
    elif (
        isinstance(num_attention_heads, bool)
        or not isinstance(num_attention_heads, int)
        or num_attention_heads < 1
        or hidden_size % num_attention_heads
    ):
        raise CheckpointConversionError(
            f"num_attention_heads={num_attention_heads!r} does not divide the width {hidden_size}; give a divisor "
            f"of {hidden_size} (timm's ViT/DeiT use width / {HEAD_DIM})."
        )
    _required(state_dict, ("blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight"))
    _check_dimensions(state_dict, {"blocks.0.mlp.fc1.weight": "[mlp width, width]"})
    patch_size = projection.shape[-1]
    architecture = {
        "hidden_size": hidden_size,
        "num_hidden_layers": len(depth_indices),
        "num_attention_heads": num_attention_heads,
        "intermediate_size": state_dict["blocks.0.mlp.fc1.weight"].shape[0],
        "hidden_act": "gelu",
        "layer_norm_eps": TIMM_LAYER_NORM_EPS,
        "image_size": grid * patch_size,
        "patch_size": patch_size,
        "num_channels": projection.shape[1],
        "qkv_bias": "blocks.0.attn.qkv.bias" in state_dict,
        "num_labels": state_dict["head.weight"].shape[0],
        "distilled": distilled,
    }
    _check_shapes(state_dict, architecture, distilled)
    return architecture


def timm_to_hf_state_dict(state_dict: Mapping[str, torch.Tensor], distilled: bool) -> dict[str, torch.Tensor]:
    """Renames a timm-layout ViT/DeiT state dict to the keys of transformers' `ViTForImageClassification` (or, when
    `distilled`, `DeiTForImageClassificationWithTeacher`), splitting each fused qkv projection into q, k and v (its
    rows are q, then k, then v).

    Raises a `CheckpointConversionError` listing every key it cannot map (layer scale, `fc_norm`, register tokens,
    relative position tables, ...): no weight is dropped.
    """
    base = "deit" if distilled else "vit"
    top_level = {
        "cls_token": f"{base}.embeddings.cls_token",
        "pos_embed": f"{base}.embeddings.position_embeddings",
        "patch_embed.proj.weight": f"{base}.embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": f"{base}.embeddings.patch_embeddings.projection.bias",
        "norm.weight": f"{base}.layernorm.weight",
        "norm.bias": f"{base}.layernorm.bias",
        "head.weight": "cls_classifier.weight" if distilled else "classifier.weight",
        "head.bias": "cls_classifier.bias" if distilled else "classifier.bias",
    }
    if distilled:
        top_level.update(
            {
                "dist_token": "deit.embeddings.distillation_token",
                "head_dist.weight": "distillation_classifier.weight",
                "head_dist.bias": "distillation_classifier.bias",
            }
        )
    converted, unmapped = {}, []
    for key, tensor in state_dict.items():
        if key in top_level:
            converted[top_level[key]] = tensor
            continue
        match = _BLOCK_KEY.match(key)
        name, _, kind = (match.group(2) if match else "").rpartition(".")
        if match is None or kind not in ("weight", "bias"):
            unmapped.append(key)
        elif name == "attn.qkv":
            if tensor.shape[0] % 3:
                raise CheckpointConversionError(f"{key} has {tensor.shape[0]} rows; a fused qkv has 3 x width.")
            # .clone(): the three parts must not share storage, or safetensors refuses to save them.
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0), strict=True):
                converted[f"{base}.layers.{match.group(1)}.attention.{part}.{kind}"] = chunk.clone()
        elif name in _BLOCK_RENAMES:
            converted[f"{base}.layers.{match.group(1)}.{_BLOCK_RENAMES[name]}.{kind}"] = tensor
        else:
            unmapped.append(key)
    if unmapped:
        raise CheckpointConversionError(
            f"the checkpoint has {len(unmapped)} weight(s) with no place in transformers' ViT/DeiT: "
            f"{', '.join(unmapped)}. Models with layer scale (ls1/ls2), fc_norm, register tokens, relative position "
            "tables or other timm extras cannot be converted without changing what they compute; nothing was written."
        )
    return converted
