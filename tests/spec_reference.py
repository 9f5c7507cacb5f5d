"""A literal, slow implementation of EViT as ../shared/EVIT_SPEC.md states it, for every family, to test the fast one
against.

One image at a time, full attention matrices, Python sorting; it reads the weights of a stock transformers model.
Prefix tokens (the class token, DeiT's distillation token, registers) are kept in place and never scored; they are
keys of the class-token softmax like every token. Each tester in tests/model_builders.py names the function here that
gives its model's outputs: `(outputs by field name, kept patch indices per image and reduction layer)`.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


class Block(NamedTuple):
    """One transformer layer, in the order the spec runs it:

    x = x + attention_scale * attention(norm_before(x)); reorganize(x) in reduction layers;
    x = x + mlp_scale * mlp(norm_after(x))
    """

    norm_before: torch.nn.Module
    projections: tuple  # query, key, value, output
    heads: int
    attention_scale: torch.Tensor | float
    norm_after: torch.nn.Module
    mlp: torch.nn.Module
    mlp_scale: torch.Tensor | float


def _vit_block(layer) -> Block:
    attention = layer.attention
    projections = (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj)
    heads = attention.num_attention_heads
    return Block(layer.layernorm_before, projections, heads, 1.0, layer.layernorm_after, layer.mlp, 1.0)


def _clip_block(layer) -> Block:
    attention = layer.self_attn
    projections = (attention.q_proj, attention.k_proj, attention.v_proj, attention.out_proj)
    return Block(layer.layer_norm1, projections, attention.num_heads, 1.0, layer.layer_norm2, layer.mlp, 1.0)


def _dinov2_block(layer) -> Block:
    attention = layer.attention
    projections = (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj)
    heads = getattr(attention, "num_attention_heads", None) or attention.num_heads  # DINOv3 calls it num_heads
    scale1, scale2 = layer.layer_scale1.lambda1, layer.layer_scale2.lambda1
    return Block(layer.norm1, projections, heads, scale1, layer.norm2, layer.mlp, scale2)


def _rotate(x, cos, sin):
    """The rotary embedding of one token's query or key ([heads, head_dim]) by its patch's cos and sin: the second
    half of the dimensions, negated, in front of the first half."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def _attention(block, x, prefix, positions, rotations):
    """Multi-head attention of one image's tokens `x` [tokens, dim]: (output [tokens, dim], probs [heads, N, N]).

    With `rotations` (cos, sin per patch), a token that stands for a patch (its position >= 0) has its query and key
    rotated by that patch's cos and sin; prefix tokens and fused tokens are not rotated."""
    q_proj, k_proj, v_proj, out_proj = block.projections
    head_dim = q_proj.out_features // block.heads
    q, k, v = (proj(x).view(-1, block.heads, head_dim).transpose(0, 1) for proj in (q_proj, k_proj, v_proj))
    if rotations is not None:
        cos, sin = rotations
        q, k = q.clone(), k.clone()
        for candidate, patch in enumerate(positions):
            if patch >= 0:
                token = prefix + candidate
                q[:, token] = _rotate(q[:, token], cos[patch], sin[patch])
                k[:, token] = _rotate(k[:, token], cos[patch], sin[patch])
    probs = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(head_dim), dim=-1)  # [heads, tokens, tokens]
    return out_proj((probs @ v).transpose(0, 1).reshape(x.shape[0], -1)), probs


def _reorganize(x, probs, prefix, keep_rate, fuse, positions):
    """EViT's rule on one image: returns (new tokens, kept patch indices, positions of the new candidates)."""
    n = x.shape[0] - prefix
    k_keep = max(1, min(n, math.ceil(keep_rate * n)))
    if k_keep == n:
        return x, list(positions), positions
    scores = probs[:, 0, prefix:].mean(0).tolist()  # head mean of the class row, over the non-prefix keys
    order = sorted(range(n), key=lambda j: -scores[j])
    keep, rest = order[:k_keep], order[k_keep:]
    tokens = [x[i] for i in range(prefix)] + [x[prefix + j] for j in keep]
    kept = [positions[j] for j in keep]
    positions = list(kept)
    if fuse:  # the raw scores, not renormalised
        tokens.append(sum(scores[j] * x[prefix + j] for j in rest))
        positions.append(-1)
    return torch.stack(tokens), kept, positions


def _encode(blocks, embeddings, prefix, keep_rate, reduction_layers, fuse, rotations=None):
    """Runs `blocks` on each image's embeddings: (final tokens per image, kept patch indices per image and layer)."""
    finals, kept_per_image = [], []
    for x in embeddings:  # [tokens, dim]
        positions = list(range(x.shape[0] - prefix))
        kept_per_layer = []
        for index, block in enumerate(blocks):
            out, probs = _attention(block, block.norm_before(x), prefix, positions, rotations)
            x = x + out * block.attention_scale
            if index in reduction_layers:
                x, kept, positions = _reorganize(x, probs, prefix, keep_rate, fuse, positions)
                kept_per_layer.append(kept)
            x = x + block.mlp(block.norm_after(x)) * block.mlp_scale
        finals.append(x)
        kept_per_image.append(kept_per_layer)
    return finals, kept_per_image


# ViT and DeiT


def reference_forward(
    stock_model, pixel_values, keep_rate, reduction_layers, fuse, num_prefix_tokens, bool_masked_pos=None
):
    """A ViT or DeiT model: (final hidden states per image after the final norm, kept patch indices per image and
    reduction layer). `bool_masked_pos` ([batch, patches]) replaces those patches' embeddings by the mask token."""
    base = stock_model.base_model
    embeddings = base.embeddings(pixel_values, bool_masked_pos=bool_masked_pos, interpolate_pos_encoding=True)
    blocks = [_vit_block(layer) for layer in base.layers]
    finals, kept = _encode(blocks, embeddings, num_prefix_tokens, keep_rate, reduction_layers, fuse)
    return [base.layernorm(x) for x in finals], kept


def vit_base_outputs(stock, pixel_values, keep_rate, reduction_layers, fuse, prefix, input_ids=None):
    finals, kept = reference_forward(stock, pixel_values, keep_rate, reduction_layers, fuse, prefix)
    return {"last_hidden_state": torch.stack(finals)}, kept


def vit_classifier_outputs(stock, pixel_values, keep_rate, reduction_layers, fuse, prefix, input_ids=None):
    """The head on the class token."""
    finals, kept = reference_forward(stock, pixel_values, keep_rate, reduction_layers, fuse, prefix)
    return {"logits": stock.classifier(torch.stack([x[0] for x in finals]))}, kept


def deit_teacher_outputs(stock, pixel_values, keep_rate, reduction_layers, fuse, prefix, input_ids=None):
    """The mean of the class head on the class token and the distillation head on the distillation token."""
    finals, kept = reference_forward(stock, pixel_values, keep_rate, reduction_layers, fuse, prefix)
    logits = [(stock.cls_classifier(x[0]) + stock.distillation_classifier(x[1])) / 2 for x in finals]
    return {"logits": torch.stack(logits)}, kept


# CLIP and MetaCLIP 2 (the same vision tower)


def reference_clip_vision(vision_model, pixel_values, keep_rate, reduction_layers, fuse):
    """A CLIP vision tower: (final tokens per image, `post_layernorm` of each class token [batch, dim], kept patch
    indices per image and reduction layer). `pre_layrnorm` runs on the embeddings; no final norm on the sequence."""
    embeddings = vision_model.pre_layrnorm(vision_model.embeddings(pixel_values))
    blocks = [_clip_block(layer) for layer in vision_model.encoder.layers]
    finals, kept = _encode(blocks, embeddings, 1, keep_rate, reduction_layers, fuse)
    return finals, torch.stack([vision_model.post_layernorm(x[0]) for x in finals]), kept


def _vision_tower(stock):
    return stock.vision_model if hasattr(stock, "vision_model") else stock


def clip_vision_outputs(stock, pixel_values, keep_rate, reduction_layers, fuse, prefix, input_ids=None):
    finals, pooled, kept = reference_clip_vision(_vision_tower(stock), pixel_values, keep_rate, reduction_layers, fuse)
    return {"last_hidden_state": torch.stack(finals), "pooler_output": pooled}, kept


def clip_vision_projection_outputs(stock, pixel_values, keep_rate, reduction_layers, fuse, prefix, input_ids=None):
    _, pooled, kept = reference_clip_vision(_vision_tower(stock), pixel_values, keep_rate, reduction_layers, fuse)
    return {"image_embeds": stock.visual_projection(pooled)}, kept


def clip_outputs(stock, pixel_values, keep_rate, reduction_layers, fuse, prefix, input_ids=None):
    """Both towers: the normalised image embeddings and the logits per image against the (untouched) text tower."""
    _, pooled, kept = reference_clip_vision(stock.vision_model, pixel_values, keep_rate, reduction_layers, fuse)
    image_embeds = stock.visual_projection(pooled)
    text_embeds = stock.get_text_features(input_ids=input_ids).pooler_output
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    logits_per_image = stock.logit_scale.exp() * image_embeds @ text_embeds.T
    return {"image_embeds": image_embeds, "logits_per_image": logits_per_image}, kept


def clip_classifier_outputs(stock, pixel_values, keep_rate, reduction_layers, fuse, prefix, input_ids=None):
    """The head on the mean of the non-prefix tokens (kept and fused) of the last hidden state, no post_layernorm."""
    finals, _, kept = reference_clip_vision(stock.vision_model, pixel_values, keep_rate, reduction_layers, fuse)
    return {"logits": stock.classifier(torch.stack([x[1:].mean(0) for x in finals]))}, kept


# DINOv2 (with and without registers) and DINOv3 ViT


def reference_dinov2(base_model, pixel_values, keep_rate, reduction_layers, fuse, prefix):
    """A Dinov2Model or Dinov2WithRegistersModel: (final tokens per image after the final norm, kept patch indices)."""
    blocks = [_dinov2_block(layer) for layer in base_model.encoder.layer]
    finals, kept = _encode(blocks, base_model.embeddings(pixel_values), prefix, keep_rate, reduction_layers, fuse)
    return [base_model.layernorm(x) for x in finals], kept


def reference_dinov3(base_model, pixel_values, keep_rate, reduction_layers, fuse, rotations=None):
    """A DINOv3ViTModel, as the spec's "Rotary position embeddings" states it. `rotations` is the (cos, sin) per patch
    ([patches, head_dim]); by default the model's own (not augmented in eval mode). Returns (final tokens per image
    after the final norm, kept patch indices per image and reduction layer, number of prefix tokens).

    Each candidate carries its patch index (-1 once fused); a token with a patch index is rotated by that patch's
    cos and sin in every layer, the class token, the registers and a fused token never are."""
    prefix = 1 + base_model.config.num_register_tokens
    rotations = rotations if rotations is not None else base_model.rope_embeddings(pixel_values)
    blocks = [_dinov2_block(layer) for layer in base_model.model.layer]
    embeddings = base_model.embeddings(pixel_values)  # class token, registers, patches
    finals, kept = _encode(blocks, embeddings, prefix, keep_rate, reduction_layers, fuse, rotations)
    return [base_model.norm(x) for x in finals], kept, prefix


def dinov2_base_outputs(stock, pixel_values, keep_rate, reduction_layers, fuse, prefix, input_ids=None):
    """The final tokens after the final norm, and the class token among them."""
    finals, kept = reference_dinov2(stock, pixel_values, keep_rate, reduction_layers, fuse, prefix)
    return {"last_hidden_state": torch.stack(finals), "pooler_output": torch.stack([x[0] for x in finals])}, kept


def dinov2_classifier_outputs(stock, pixel_values, keep_rate, reduction_layers, fuse, prefix, input_ids=None):
    """The head on [class token, mean of the remaining non-prefix tokens (kept and fused)]."""
    finals, kept = reference_dinov2(stock.base_model, pixel_values, keep_rate, reduction_layers, fuse, prefix)
    features = [torch.cat([x[0], x[prefix:].mean(0)]) for x in finals]
    return {"logits": stock.classifier(torch.stack(features))}, kept


def dinov3_outputs(stock, pixel_values, keep_rate, reduction_layers, fuse, prefix, input_ids=None):
    """The final tokens after the final norm, and the class token among them."""
    finals, kept, _ = reference_dinov3(stock, pixel_values, keep_rate, reduction_layers, fuse)
    return {"last_hidden_state": torch.stack(finals), "pooler_output": torch.stack([x[0] for x in finals])}, kept


# timm-layout checkpoints (the reference code's)


def reference_timm_logits(
    state_dict, pixel_values, num_heads, keep_rate, reduction_layers, fuse, layer_norm_eps=1e-6
) -> torch.Tensor:
    """Logits of EViT run on a timm-layout ViT/DeiT state dict (`cls_token`, `blocks.N.attn.qkv.*`, ...), as the
    spec states it: one image at a time, the fused qkv split by hand, full attention, Python sorting, exact GELU.

    A `dist_token` makes two prefix tokens, and the logits are the mean of `head` on the class token and `head_dist`
    on the distillation token.
    """
    sd = state_dict
    dim = sd["cls_token"].shape[-1]
    head_dim = dim // num_heads
    prefix = [sd["cls_token"][0, 0]] + ([sd["dist_token"][0, 0]] if "dist_token" in sd else [])
    num_prefix_tokens = len(prefix)
    depth = len({key.split(".")[1] for key in sd if key.startswith("blocks.")})

    def layer_norm(x, name):
        return F.layer_norm(x, (dim,), sd[f"{name}.weight"], sd[f"{name}.bias"], eps=layer_norm_eps)

    def linear(x, name):
        return x @ sd[f"{name}.weight"].T + (sd[f"{name}.bias"] if f"{name}.bias" in sd else 0)

    logits = []
    for image in pixel_values:
        patches = F.conv2d(
            image[None],
            sd["patch_embed.proj.weight"],
            sd["patch_embed.proj.bias"],
            stride=sd["patch_embed.proj.weight"].shape[-1],
        )[0]  # [dim, rows, cols]
        patches = patches.flatten(1).T  # row-major patch order
        x = torch.cat([torch.stack(prefix), patches]) + sd["pos_embed"][0]
        positions = list(range(x.shape[0] - num_prefix_tokens))
        for index in range(depth):
            block = f"blocks.{index}"
            qkv = linear(layer_norm(x, f"{block}.norm1"), f"{block}.attn.qkv")  # [tokens, 3 * dim]: q, k, v
            q, k, v = (qkv[:, part * dim : (part + 1) * dim] for part in range(3))
            q, k, v = (t.reshape(-1, num_heads, head_dim).transpose(0, 1) for t in (q, k, v))
            probs = torch.softmax(q @ k.transpose(1, 2) * head_dim**-0.5, dim=-1)  # [heads, tokens, tokens]
            x = x + linear((probs @ v).transpose(0, 1).reshape(x.shape[0], dim), f"{block}.attn.proj")
            if index in reduction_layers:
                x, _, positions = _reorganize(x, probs, num_prefix_tokens, keep_rate, fuse, positions)
            hidden = F.gelu(linear(layer_norm(x, f"{block}.norm2"), f"{block}.mlp.fc1"), approximate="none")
            x = x + linear(hidden, f"{block}.mlp.fc2")
        x = layer_norm(x, "norm")
        image_logits = linear(x[0], "head")
        if num_prefix_tokens == 2:
            image_logits = (image_logits + linear(x[1], "head_dist")) / 2
        logits.append(image_logits)
    return torch.stack(logits)


# LLaVA and VipLLaVA (a CLIP vision tower, a projector, a language model)


def reference_llava_image_features(stock, pixel_values, keep_rates, fuse, hidden_state_indices, keep_class_token):
    """The image features of a stock LLaVA-style model (`LlavaForConditionalGeneration` or VipLLaVA's) with EViT in
    its vision tower, as the spec orders them: per image, the class token (strategy "full"), the kept patches in
    ascending patch index, then the fused tokens in tower order; the selected hidden states (0: the embeddings after
    `pre_layrnorm`, i: the output of layer i - 1) concatenated along features, then projected.

    `keep_rates` maps each reduction layer (0-based) to its keep rate. Returns a list of `[features, text dim]`."""
    base = stock.model
    tower = base.vision_tower
    blocks = [_clip_block(layer) for layer in tower.encoder.layers]
    features = []
    for x in tower.pre_layrnorm(tower.embeddings(pixel_values)):
        positions = list(range(x.shape[0] - 1))
        states = {0: (x, list(positions))}
        for index, block in enumerate(blocks[: max(hidden_state_indices)]):
            out, probs = _attention(block, block.norm_before(x), 1, positions, None)
            x = x + out
            if index in keep_rates:
                x, _, positions = _reorganize(x, probs, 1, keep_rates[index], fuse, positions)
            x = x + block.mlp(block.norm_after(x))
            states[index + 1] = (x, list(positions))
        per_layer = []
        for index in hidden_state_indices:
            tokens, token_positions = states[index]
            patches = sorted((p, 1 + j) for j, p in enumerate(token_positions) if p >= 0)
            fused = [1 + j for j, p in enumerate(token_positions) if p < 0]
            rows = ([0] if keep_class_token else []) + [row for _, row in patches] + fused
            per_layer.append(tokens[rows])
        features.append(base.multi_modal_projector(torch.cat(per_layer, dim=-1)))
    return features


def reference_llava_logits(stock, input_ids, image_features, image_token_id):
    """The stock language model and head on the prompt whose placeholders hold `image_features` (in order)."""
    embeds = stock.model.language_model.get_input_embeddings()(input_ids).clone()
    flat = torch.cat(image_features)
    rows = (input_ids == image_token_id).nonzero()
    assert len(rows) == len(flat), f"{len(rows)} placeholders for {len(flat)} image features"
    for (batch, position), feature in zip(rows.tolist(), flat, strict=True):
        embeds[batch, position] = feature
    hidden = stock.model.language_model(inputs_embeds=embeds).last_hidden_state
    return stock.lm_head(hidden)
