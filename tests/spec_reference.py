"""A literal, slow implementation of EViT as ../shared/EVIT_SPEC.md states it, to test the fast one against.

One image at a time, full attention matrices, Python sorting; it reads the weights of a stock transformers model.
"""

import math

import torch


def reference_forward(
    stock_model, pixel_values, keep_rate, reduction_layers, fuse, num_prefix_tokens, bool_masked_pos=None
):
    """Returns (final hidden states per image, kept patch indices per image and reduction layer).

    `bool_masked_pos` ([batch, patches]) replaces those patches' embeddings by the model's mask token.
    """
    base = stock_model.base_model
    embeddings = base.embeddings(pixel_values, bool_masked_pos=bool_masked_pos, interpolate_pos_encoding=True)
    finals, kept_per_image = [], []
    for x in embeddings:  # [tokens, dim]
        positions = list(range(x.shape[0] - num_prefix_tokens))
        kept_per_layer = []
        for index, layer in enumerate(base.layers):
            attention = layer.attention
            heads, head_dim = attention.num_attention_heads, attention.head_dim
            h = layer.layernorm_before(x)
            q, k, v = (
                proj(h).view(-1, heads, head_dim).transpose(0, 1)
                for proj in (attention.q_proj, attention.k_proj, attention.v_proj)
            )
            probs = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(head_dim), dim=-1)  # [heads, tokens, tokens]
            x = x + attention.o_proj((probs @ v).transpose(0, 1).reshape(x.shape[0], -1))
            if index in reduction_layers:
                n = x.shape[0] - num_prefix_tokens
                k_keep = max(1, min(n, math.ceil(keep_rate * n)))
                if k_keep < n:
                    scores = probs[:, 0, num_prefix_tokens:].mean(0).tolist()
                    order = sorted(range(n), key=lambda j: -scores[j])
                    keep, rest = order[:k_keep], order[k_keep:]
                    tokens = [x[i] for i in range(num_prefix_tokens)]
                    tokens += [x[num_prefix_tokens + j] for j in keep]
                    kept_per_layer.append([positions[j] for j in keep])
                    positions = [positions[j] for j in keep]
                    if fuse:
                        tokens.append(sum(scores[j] * x[num_prefix_tokens + j] for j in rest))
                        positions.append(-1)
                    x = torch.stack(tokens)
                else:
                    kept_per_layer.append(list(positions))
            x = x + layer.mlp(layer.layernorm_after(x))
        finals.append(base.layernorm(x))
        kept_per_image.append(kept_per_layer)
    return finals, kept_per_image


def reference_timm_logits(
    state_dict, pixel_values, num_heads, keep_rate, reduction_layers, fuse, layer_norm_eps=1e-6
) -> torch.Tensor:
    """Logits of EViT run on a timm-layout ViT/DeiT state dict (`cls_token`, `blocks.N.attn.qkv.*`, ...), as the
    spec states it: one image at a time, the fused qkv split by hand, full attention, Python sorting, exact GELU.

    A `dist_token` makes two prefix tokens, and the logits are the mean of `head` on the class token and `head_dist`
    on the distillation token.
    """
    import torch.nn.functional as F

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
        for index in range(depth):
            block = f"blocks.{index}"
            qkv = linear(layer_norm(x, f"{block}.norm1"), f"{block}.attn.qkv")  # [tokens, 3 * dim]: q, k, v
            q, k, v = (qkv[:, part * dim : (part + 1) * dim] for part in range(3))
            q, k, v = (t.reshape(-1, num_heads, head_dim).transpose(0, 1) for t in (q, k, v))
            probs = torch.softmax(q @ k.transpose(1, 2) * head_dim**-0.5, dim=-1)  # [heads, tokens, tokens]
            x = x + linear((probs @ v).transpose(0, 1).reshape(x.shape[0], dim), f"{block}.attn.proj")
            if index in reduction_layers:
                n = x.shape[0] - num_prefix_tokens
                k_keep = max(1, min(n, math.ceil(keep_rate * n)))
                if k_keep < n:
                    scores = probs[:, 0, num_prefix_tokens:].mean(0).tolist()
                    order = sorted(range(n), key=lambda j: -scores[j])
                    tokens = [x[i] for i in range(num_prefix_tokens)]
                    tokens += [x[num_prefix_tokens + j] for j in order[:k_keep]]
                    if fuse:
                        tokens.append(sum(scores[j] * x[num_prefix_tokens + j] for j in order[k_keep:]))
                    x = torch.stack(tokens)
            hidden = F.gelu(linear(layer_norm(x, f"{block}.norm2"), f"{block}.mlp.fc1"), approximate="none")
            x = x + linear(hidden, f"{block}.mlp.fc2")
        x = layer_norm(x, "norm")
        image_logits = linear(x[0], "head")
        if num_prefix_tokens == 2:
            image_logits = (image_logits + linear(x[1], "head_dist")) / 2
        logits.append(image_logits)
    return torch.stack(logits)
