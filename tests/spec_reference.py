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
