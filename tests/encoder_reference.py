"""A literal, slow implementation of EViT for CLIP vision towers and DINOv2, as ../shared/EVIT_SPEC.md states it
("Other encoders"), to test the fast one against.

One image at a time, full attention matrices, Python sorting; it reads the weights of a stock transformers model.
Prefix tokens (the class token, and DINOv2's registers) are kept in place and never scored; they are keys of the
class-token softmax like every token.
"""

import math

import torch


def _attention(x, q_proj, k_proj, v_proj, out_proj, heads):
    """Multi-head attention of one image's tokens `x` [tokens, dim]: (output [tokens, dim], probs [heads, N, N])."""
    head_dim = q_proj.out_features // heads
    q, k, v = (proj(x).view(-1, heads, head_dim).transpose(0, 1) for proj in (q_proj, k_proj, v_proj))
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
    if fuse:
        tokens.append(sum(scores[j] * x[prefix + j] for j in rest))
        positions.append(-1)
    return torch.stack(tokens), kept, positions


def reference_clip_vision(vision_model, pixel_values, keep_rate, reduction_layers, fuse):
    """CLIP's vision tower (a `CLIPVisionModel`). Returns (final tokens per image, pooled output [batch, dim], kept
    patch indices per image and reduction layer)."""
    embeddings = vision_model.pre_layrnorm(vision_model.embeddings(pixel_values))  # pre_layrnorm as in CLIP
    finals, pooled, kept_per_image = [], [], []
    for x in embeddings:  # [tokens, dim]
        positions = list(range(x.shape[0] - 1))
        kept_per_layer = []
        for index, layer in enumerate(vision_model.encoder.layers):
            attention = layer.self_attn
            out, probs = _attention(
                layer.layer_norm1(x),
                attention.q_proj,
                attention.k_proj,
                attention.v_proj,
                attention.out_proj,
                attention.num_heads,
            )
            x = x + out
            if index in reduction_layers:
                x, kept, positions = _reorganize(x, probs, 1, keep_rate, fuse, positions)
                kept_per_layer.append(kept)
            x = x + layer.mlp(layer.layer_norm2(x))
        finals.append(x)  # no final norm on the sequence
        pooled.append(vision_model.post_layernorm(x[0]))
        kept_per_image.append(kept_per_layer)
    return finals, torch.stack(pooled), kept_per_image


def reference_dinov2(base_model, pixel_values, keep_rate, reduction_layers, fuse):
    """A `Dinov2Model` or `Dinov2WithRegistersModel`. Returns (final tokens per image after the final norm, kept patch
    indices per image and reduction layer, number of prefix tokens)."""
    prefix = 1 + getattr(base_model.config, "num_register_tokens", 0)
    embeddings = base_model.embeddings(pixel_values)  # class token, registers, patches
    finals, kept_per_image = [], []
    for x in embeddings:
        positions = list(range(x.shape[0] - prefix))
        kept_per_layer = []
        for index, layer in enumerate(base_model.encoder.layer):
            attention = layer.attention
            out, probs = _attention(
                layer.norm1(x),
                attention.q_proj,
                attention.k_proj,
                attention.v_proj,
                attention.o_proj,
                attention.num_attention_heads,
            )
            x = x + out * layer.layer_scale1.lambda1
            if index in reduction_layers:
                x, kept, positions = _reorganize(x, probs, prefix, keep_rate, fuse, positions)
                kept_per_layer.append(kept)
            x = x + layer.mlp(layer.norm2(x)) * layer.layer_scale2.lambda1
        finals.append(base_model.layernorm(x))
        kept_per_image.append(kept_per_layer)
    return finals, kept_per_image, prefix


def _rotate(x, cos, sin):
    """The rotary embedding of one token's query or key ([heads, head_dim]) by its patch's cos and sin: the second
    half of the dimensions, negated, in front of the first half."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def reference_dinov3(base_model, pixel_values, keep_rate, reduction_layers, fuse, rotations=None):
    """A `DINOv3ViTModel`, as the spec's "Rotary position embeddings" states it. `rotations` is the (cos, sin) per
    patch ([patches, head_dim]); by default the model's own (not augmented in eval mode). Returns (final tokens per
    image after the final norm, kept patch indices per image and reduction layer, number of prefix tokens).

    Each candidate carries its patch index (-1 once fused); a token with a patch index is rotated by that patch's
    cos and sin in every layer, the class token, the registers and a fused token never are."""
    prefix = 1 + base_model.config.num_register_tokens
    embeddings = base_model.embeddings(pixel_values)  # class token, registers, patches
    cos, sin = rotations if rotations is not None else base_model.rope_embeddings(pixel_values)
    finals, kept_per_image = [], []
    for x in embeddings:
        positions = list(range(x.shape[0] - prefix))
        kept_per_layer = []
        for index, layer in enumerate(base_model.model.layer):
            attention = layer.attention
            heads = attention.num_heads
            h = layer.norm1(x)
            q, k, v = (
                proj(h).view(-1, heads, attention.head_dim).transpose(0, 1)
                for proj in (attention.q_proj, attention.k_proj, attention.v_proj)
            )  # [heads, tokens, head_dim]
            q, k = q.clone(), k.clone()
            for candidate, patch in enumerate(positions):
                if patch >= 0:
                    token = prefix + candidate
                    q[:, token] = _rotate(q[:, token], cos[patch], sin[patch])
                    k[:, token] = _rotate(k[:, token], cos[patch], sin[patch])
            probs = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(attention.head_dim), dim=-1)
            out = attention.o_proj((probs @ v).transpose(0, 1).reshape(x.shape[0], -1))
            x = x + out * layer.layer_scale1.lambda1
            if index in reduction_layers:
                x, kept, positions = _reorganize(x, probs, prefix, keep_rate, fuse, positions)
                kept_per_layer.append(kept)
            x = x + layer.mlp(layer.norm2(x)) * layer.layer_scale2.lambda1
        finals.append(base_model.norm(x))
        kept_per_image.append(kept_per_layer)
    return finals, kept_per_image, prefix


def reference_outputs(family, stock, pixel_values, keep_rate, reduction_layers, fuse, input_ids=None):
    """The spec's outputs of `stock` (a stock model of `family`), by output field name, and the kept patch indices per
    image and reduction layer.

    CLIP vision tower: the final tokens and `post_layernorm` of the class token; with projection: the image
    embeddings; CLIP classifier: the logits of the mean of the non-prefix tokens; CLIP: the image embeddings and the
    logits per image; DINOv2 base models: the final tokens after the final norm and the class token among them; DINOv2
    classifiers: the logits of `[class token, mean of the other non-prefix tokens]`.
    """
    if family.startswith(("clip", "metaclip-2")):  # MetaCLIP 2's vision tower is CLIP's
        vision_model = stock.vision_model if hasattr(stock, "vision_model") else stock
        finals, pooled, kept = reference_clip_vision(vision_model, pixel_values, keep_rate, reduction_layers, fuse)
        if family.endswith("-vision"):
            return {"last_hidden_state": torch.stack(finals), "pooler_output": pooled}, kept
        if family.endswith("-classifier"):  # the mean of the non-prefix tokens (kept and fused), no post_layernorm
            return {"logits": stock.classifier(torch.stack([x[1:].mean(0) for x in finals]))}, kept
        image_embeds = stock.visual_projection(pooled)
        if family.endswith("-vision-projection"):
            return {"image_embeds": image_embeds}, kept
        text_embeds = stock.get_text_features(input_ids=input_ids).pooler_output
        image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
        logits_per_image = stock.logit_scale.exp() * image_embeds @ text_embeds.T
        return {"image_embeds": image_embeds, "logits_per_image": logits_per_image}, kept
    if family.startswith("dinov3"):  # the final tokens after the final norm, and the class token among them
        finals, kept, _ = reference_dinov3(stock, pixel_values, keep_rate, reduction_layers, fuse)
        return {"last_hidden_state": torch.stack(finals), "pooler_output": torch.stack([x[0] for x in finals])}, kept
    finals, kept, prefix = reference_dinov2(stock.base_model, pixel_values, keep_rate, reduction_layers, fuse)
    if hasattr(stock, "classifier"):
        features = [torch.cat([x[0], x[prefix:].mean(0)]) for x in finals]
        return {"logits": stock.classifier(torch.stack(features))}, kept
    return {"last_hidden_state": torch.stack(finals), "pooler_output": torch.stack([x[0] for x in finals])}, kept
