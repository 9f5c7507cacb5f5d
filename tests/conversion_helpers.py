"""Random timm-layout ViT/DeiT state dicts (the layout of the reference's training checkpoints and of timm and DeiT
releases) and their tiny shapes, shared by the tests of conversion and of the commands that convert."""

import torch


WIDTH, DEPTH, HEADS, MLP, PATCH, GRID = 32, 4, 2, 64, 4, 8
IMAGE_SIZE = PATCH * GRID


def timm_state_dict(seed=0, width=WIDTH, classes=5, distilled=False, grid=GRID, extra=()):
    """A random timm-layout ViT/DeiT state dict. The residual stream is small (as at timm's initialization), so that
    LayerNorm's epsilon matters, and the qkv weights are large, so that attention is peaked and scores do not tie."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, std):
        return torch.randn(*shape, generator=generator) * std

    prefix = 2 if distilled else 1
    width_scale = (WIDTH / width) ** 0.5  # the same attention sharpness and logit scale at every width
    sd = {
        "cls_token": randn(1, 1, width, std=0.01),
        "pos_embed": randn(1, prefix + grid * grid, width, std=0.01),
        "patch_embed.proj.weight": randn(width, 3, PATCH, PATCH, std=0.003),
        "patch_embed.proj.bias": randn(width, std=0.003),
    }
    if distilled:
        sd["dist_token"] = randn(1, 1, width, std=0.01)
    for index in range(DEPTH):
        block = f"blocks.{index}"
        sd.update(
            {
                f"{block}.norm1.weight": 1 + randn(width, std=0.1),
                f"{block}.norm1.bias": randn(width, std=0.1),
                f"{block}.attn.qkv.weight": randn(3 * width, width, std=0.4 * width_scale),
                f"{block}.attn.qkv.bias": randn(3 * width, std=0.1),
                f"{block}.attn.proj.weight": randn(width, width, std=0.02),
                f"{block}.attn.proj.bias": randn(width, std=0.002),
                f"{block}.norm2.weight": 1 + randn(width, std=0.1),
                f"{block}.norm2.bias": randn(width, std=0.1),
                f"{block}.mlp.fc1.weight": randn(MLP, width, std=0.2 * width_scale),
                f"{block}.mlp.fc1.bias": randn(MLP, std=0.1),
                f"{block}.mlp.fc2.weight": randn(width, MLP, std=0.02),
                f"{block}.mlp.fc2.bias": randn(width, std=0.002),
            }
        )
    sd.update({"norm.weight": 1 + randn(width, std=0.1), "norm.bias": randn(width, std=0.1)})
    sd.update({"head.weight": randn(classes, width, std=0.5 * width_scale), "head.bias": randn(classes, std=0.1)})
    if distilled:
        sd.update(
            {
                "head_dist.weight": randn(classes, width, std=0.5 * width_scale),
                "head_dist.bias": randn(classes, std=0.1),
            }
        )
    for key in extra:
        sd[key] = randn(width, std=0.1)
    return sd
