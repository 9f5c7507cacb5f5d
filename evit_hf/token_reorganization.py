"""The tensor math of EViT's token reorganization, as plain torch functions.

Shapes: `batch` images, `tokens` = prefix tokens (class, and distillation for DeiT) + `candidates`, `heads` attention
heads, `dim` hidden size. Everything here is free of model state so that it can be checked on hand-made tensors.

This file is copied next to the weights by `save_pretrained`, so it only uses relative imports.
"""

import math

import torch


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors in float32; float32 and float64 as they are."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def num_kept_tokens(num_candidates: int, keep_rate: float) -> int:
    """How many of `num_candidates` tokens a reduction layer keeps: `ceil(keep_rate * n)`, at least 1, at most n.

    Computed from the Python float in double precision, as the reference does: a float32 keep rate gives another
    count in some cases (0.3 x 50 gives 16 in float32 and 15 in float64).
    """
    return max(1, min(num_candidates, math.ceil(keep_rate * num_candidates)))


def class_token_attention(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """The attention probabilities of the class-token query against every key, in float32 (or float64).

    Only the first query row is computed, so this costs O(tokens * head_dim) per head: backends that do not return
    attention weights (SDPA, flash) never build the tokens x tokens matrix for it.

    Args:
        query (`torch.Tensor` of shape `[batch, heads, tokens, head_dim]`): the layer's queries; only row 0 is read.
        key (`torch.Tensor` of shape `[batch, heads, tokens, head_dim]`): the layer's keys.
        scaling (`float`): the factor the layer multiplies the logits by (`head_dim ** -0.5`).

    Returns:
        `torch.Tensor` of shape `[batch, heads, tokens]`: softmax over all keys, prefix keys included.
    """
    class_query = _at_least_float32(query[:, :, :1])  # [batch, heads, 1, head_dim]
    logits = torch.matmul(class_query, _at_least_float32(key).transpose(-1, -2)) * scaling  # [batch, heads, 1, tokens]
    return logits.softmax(dim=-1).squeeze(2)


def candidate_scores(class_attention: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Score of each candidate token: its class-token attention probability, averaged over heads.

    Args:
        class_attention (`torch.Tensor` of shape `[batch, heads, tokens]`): class-token attention probabilities.
        num_prefix_tokens (`int`): tokens in front that are never candidates (1 for ViT, 2 for distilled DeiT).

    Returns:
        `torch.Tensor` of shape `[batch, candidates]` in float32.
    """
    return _at_least_float32(class_attention[:, :, num_prefix_tokens:]).mean(dim=1)


def select_attentive_tokens(scores: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Indices of the `num_keep` highest-scoring candidates, highest first: `[batch, num_keep]` (LongTensor)."""
    return scores.topk(num_keep, dim=1, largest=True, sorted=True).indices


def gather_tokens(tokens: torch.Tensor, indices: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Rows `offset + indices` (`[batch, k]`) of `tokens` (`[batch, n, ...]`): `[batch, k, ...]`.

    One `index_select` over the batch's rows laid end to end: it copies whole rows, where `gather` with an index
    expanded over the feature dimension reads one index per element (ten times slower on CPU for 384-wide tokens).
    `offset` selects among the rows after it (the candidates after the prefix) without slicing `tokens`, so that a
    contiguous `tokens` is never copied.
    """
    batch, num_tokens = tokens.shape[:2]
    row_starts = torch.arange(0, batch * num_tokens, num_tokens, device=indices.device) + offset  # [batch]
    rows = (indices + row_starts.unsqueeze(1)).reshape(-1)  # [batch * k]
    selected = tokens.reshape(batch * num_tokens, *tokens.shape[2:]).index_select(0, rows)
    return selected.view(batch, indices.shape[1], *tokens.shape[2:])


def fuse_inattentive_tokens(
    candidates: torch.Tensor, scores: torch.Tensor, kept_indices: torch.Tensor
) -> torch.Tensor:
    """One token made of the candidates that were not kept: the sum of those tokens weighted by their raw scores.

    Accumulated in float32 whatever the input dtype, then cast back.

    Args:
        candidates (`torch.Tensor` of shape `[batch, candidates, dim]`): the candidate tokens.
        scores (`torch.Tensor` of shape `[batch, candidates]`): their scores (not renormalised).
        kept_indices (`torch.Tensor` of shape `[batch, k]`): the candidates that were kept.

    Returns:
        `torch.Tensor` of shape `[batch, 1, dim]`.
    """
    # Zeroing the kept scores selects the complement without gathering it: one [1, n] x [n, dim] product per image.
    weights = _at_least_float32(scores).scatter(1, kept_indices, 0.0)  # [batch, candidates]
    fused = torch.bmm(weights.unsqueeze(1), candidates.to(weights.dtype))  # [batch, 1, dim]
    return fused.to(candidates.dtype)


def reorganize_tokens(
    hidden_states: torch.Tensor,
    class_attention: torch.Tensor,
    num_prefix_tokens: int,
    num_keep: int,
    fuse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """EViT's reorganization: keep the prefix and the `num_keep` most attended candidates, fuse (or drop) the rest.

    Args:
        hidden_states (`torch.Tensor` of shape `[batch, tokens, dim]`): the tokens after the attention block.
        class_attention (`torch.Tensor` of shape `[batch, heads, tokens]`): class-token attention probabilities.
        num_prefix_tokens (`int`): tokens in front that are always kept, in place.
        num_keep (`int`): candidates to keep, in [1, candidates].
        fuse (`bool`, *optional*, defaults to `True`): append the fused token of the others, or drop them.

    Returns:
        A tuple of the new tokens, `[batch, num_prefix_tokens + num_keep (+ 1 if fuse), dim]`, and the kept candidates'
        indices among the candidates, `[batch, num_keep]` (highest score first).
    """
    prefix = hidden_states[:, :num_prefix_tokens]  # [batch, prefix, dim]
    candidates = hidden_states[:, num_prefix_tokens:]  # [batch, candidates, dim]
    scores = candidate_scores(class_attention, num_prefix_tokens)  # [batch, candidates]
    kept_indices = select_attentive_tokens(scores, num_keep)  # [batch, num_keep]
    parts = [prefix, gather_tokens(hidden_states, kept_indices, offset=num_prefix_tokens)]
    if fuse:
        parts.append(fuse_inattentive_tokens(candidates, scores, kept_indices))
    return torch.cat(parts, dim=1), kept_indices


def track_token_positions(
    token_positions: torch.Tensor, kept_indices: torch.Tensor, fused: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Follows each candidate back to its patch through a reorganization.

    Args:
        token_positions (`torch.Tensor` of shape `[batch, candidates]`): the patch index (row-major in the patch grid)
            of each candidate before the reorganization, -1 for a fused token.
        kept_indices (`torch.Tensor` of shape `[batch, k]`): the kept candidates, as `reorganize_tokens` returns them.
        fused (`bool`): whether a fused token was appended.

    Returns:
        A tuple of the kept tokens' patch indices, `[batch, k]`, and the positions of the new candidates,
        `[batch, k (+ 1 if fused)]`, where the fused token is -1.
    """
    kept_positions = token_positions.gather(1, kept_indices)
    if not fused:
        return kept_positions, kept_positions
    fused_position = kept_positions.new_full((kept_positions.shape[0], 1), -1)
    return kept_positions, torch.cat([kept_positions, fused_position], dim=1)


def candidate_positions(
    kept_positions: torch.Tensor | None, num_candidates: int, batch: int, device: torch.device | None = None
) -> torch.Tensor:
    """The patch index of each candidate token in a sequence, from the kept positions of the last reduction layer
    that ran before it.

    Args:
        kept_positions (`torch.Tensor` of shape `[batch, k]`, *optional*): that layer's kept tokens' patch indices (-1
            for a fused token an earlier layer made), as `track_token_positions` returns them; `None` when no
            reduction layer ran (the candidates are then every patch, in raster order).
        num_candidates (`int`): the candidates in the sequence: `k`, or `k + 1` when that layer appended a fused token.
        batch (`int`), device (`torch.device`): of the sequence, for the case without a reduction layer.

    Returns:
        `torch.Tensor` of shape `[batch, num_candidates]` (LongTensor), -1 for fused tokens.
    """
    if kept_positions is None:
        return torch.arange(num_candidates, device=device).expand(batch, -1)
    kept = kept_positions.shape[1]
    if num_candidates == kept:
        return kept_positions
    if num_candidates == kept + 1:  # the fused token that layer appended
        return torch.cat([kept_positions, kept_positions.new_full((kept_positions.shape[0], 1), -1)], dim=1)
    raise ValueError(f"{num_candidates} candidate tokens cannot follow a reduction layer that kept {kept}.")


def raster_order(token_positions: torch.Tensor) -> torch.Tensor:
    """The order that puts candidate tokens in ascending patch index (raster order of the patch grid), followed by
    the fused tokens (-1) in the order they had.

    Args:
        token_positions (`torch.Tensor` of shape `[batch, candidates]`): each candidate's patch index, -1 if fused.

    Returns:
        `torch.Tensor` of shape `[batch, candidates]` (LongTensor): indices into the candidates, for `gather_tokens`.
    """
    # Fused tokens sort after every patch (patch indices are < the largest index + 1); a stable sort keeps their order.
    after_patches = token_positions.max().clamp(min=0) + 1
    keys = torch.where(token_positions >= 0, token_positions, after_patches)
    return torch.sort(keys, dim=1, stable=True).indices


def rotations_for_tokens(
    patch_cos: torch.Tensor, patch_sin: torch.Tensor, token_positions: torch.Tensor, num_prefix_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's rotary (cos, sin) after a reorganization: a kept token keeps its own patch's, the prefix tokens
    and a fused token are not rotated (cos 1, sin 0).

    Args:
        patch_cos, patch_sin (`torch.Tensor` of shape `[patches, rotary_dim]`): every patch's rotation, row-major in
            the patch grid (as the model's rotary embedding returns them; augmented coordinates in training).
        token_positions (`torch.Tensor` of shape `[batch, candidates]`): the patch index of each candidate token, -1
            for a fused one, as `track_token_positions` returns them.
        num_prefix_tokens (`int`): tokens in front, which are never rotated.

    Returns:
        A tuple of cos and sin, each `[batch, 1, num_prefix_tokens + candidates, rotary_dim]`: one row per token,
        broadcast over the attention heads.
    """
    batch, candidates = token_positions.shape
    rotary_dim = patch_cos.shape[-1]
    is_patch = (token_positions >= 0).unsqueeze(-1)  # [batch, candidates, 1]
    patch_index = token_positions.clamp(min=0)
    cos = torch.where(is_patch, patch_cos[patch_index], 1.0)  # [batch, candidates, rotary_dim]
    sin = torch.where(is_patch, patch_sin[patch_index], 0.0)
    prefix_cos = patch_cos.new_ones(batch, num_prefix_tokens, rotary_dim)
    prefix_sin = patch_sin.new_zeros(batch, num_prefix_tokens, rotary_dim)
    return (
        torch.cat([prefix_cos, cos.to(patch_cos.dtype)], dim=1).unsqueeze(1),
        torch.cat([prefix_sin, sin.to(patch_sin.dtype)], dim=1).unsqueeze(1),
    )


__all__ = [
    "candidate_positions",
    "candidate_scores",
    "class_token_attention",
    "fuse_inattentive_tokens",
    "gather_tokens",
    "num_kept_tokens",
    "raster_order",
    "reorganize_tokens",
    "rotations_for_tokens",
    "select_attentive_tokens",
    "track_token_positions",
]
