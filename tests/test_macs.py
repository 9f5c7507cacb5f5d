import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import DeiTConfig, ViTConfig

from evit_hf import EViTConfig, EViTDeiTConfig, count_macs

from .model_builders import DEIT_SMALL, TESTERS, TINY


DEIT_S = {**DEIT_SMALL, "num_labels": 1000}


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)  # tiny models: one thread is fastest and steady on a busy machine; restored after


@pytest.mark.parametrize(
    "keep_rate, giga_macs",
    [(1.0, 4.60), (0.9, 4.02), (0.8, 3.48), (0.7, 3.03), (0.6, 2.64), (0.5, 2.31)],
    ids=lambda value: str(value),
)
def test_deit_small_macs_are_the_specs(keep_rate, giga_macs):
    assert round(count_macs(EViTConfig(**DEIT_S), keep_rate=keep_rate) / 1e9, 2) == giga_macs


def test_macs_bounds_of_the_speed_up():
    config = EViTConfig(**DEIT_S)
    full = count_macs(config, keep_rate=1.0)
    assert round(full / count_macs(config, keep_rate=0.7), 3) == 1.518
    assert round(full / count_macs(config, keep_rate=0.5), 3) == 1.992


def test_stock_model_by_hand():
    # 12 layers of 197 tokens: projections 4 N d^2, attention 2 N^2 d, MLP 2 N d m; patch embedding; head
    n, d, m = 197, 384, 1536
    expected = 12 * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m) + 196 * 3 * 16 * 16 * d + d * 1000
    assert count_macs(ViTConfig(**DEIT_S)) == expected
    assert count_macs(EViTConfig(**DEIT_S), keep_rate=1.0) == expected


def test_fusion_costs_a_little_and_keeps_a_token():
    fused = count_macs(EViTConfig(**DEIT_S), keep_rate=0.7)
    dropped = count_macs(EViTConfig(**DEIT_S, fuse_inattentive_tokens=False), keep_rate=0.7)
    assert dropped < fused < count_macs(EViTConfig(**DEIT_S), keep_rate=0.8)


@pytest.mark.parametrize("image_size", [224, 288, 384])
def test_any_resolution(image_size):
    config = EViTConfig(**DEIT_S)
    patches = (image_size // 16) ** 2
    stock = count_macs(config, image_size=image_size, keep_rate=1.0)
    n, d, m = patches + 1, 384, 1536
    assert stock == 12 * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m) + patches * 3 * 256 * d + d * 1000
    assert count_macs(config, image_size=image_size) < stock  # the config's keep rate, 0.7


def test_distilled_deit_counts_two_prefix_tokens_and_two_heads():
    config = EViTDeiTConfig(**DEIT_S, architectures=["EViTDeiTForImageClassificationWithTeacher"])
    vit = EViTConfig(**DEIT_S)
    assert count_macs(config, keep_rate=1.0) > count_macs(vit, keep_rate=1.0)
    assert count_macs(DeiTConfig(**DEIT_S)) == count_macs(EViTDeiTConfig(**DEIT_S), keep_rate=1.0)


def macs_by_hand(attention_tokens, mlp_tokens, fused_candidates, heads, dim, mlp_dim, patch_embedding_macs, labels):
    """Per layer: 4 N d^2 projections and 2 N^2 d attention products on the tokens it received, 2 N d m in the MLP on
    the tokens after its reorganization; `candidates x d` per fused token; `heads` linear heads on one token each."""
    layers = sum(4 * n * dim * dim + 2 * n * n * dim for n in attention_tokens)
    mlps = sum(2 * n * dim * mlp_dim for n in mlp_tokens)
    return patch_embedding_macs + layers + mlps + sum(c * dim for c in fused_candidates) + heads * dim * labels


# The tiny shape at keep 0.5 (4 layers, reduction layers 1, 2, 3; 64 patches; d 32, m 64; 5 labels), by hand:
# fused ViT: 64 candidates keep 32 (+1 fused) -> 33 candidates keep 17 (+1) -> 18 candidates keep 9 (+1);
# dropped ViT: 64 keep 32 -> 32 keep 16 -> 16 keep 8. Distilled DeiT: the same candidates, one more prefix token.
TINY_BY_HAND = {
    # (config class, architecture, fuse): (tokens into each layer's attention, into each MLP, fused candidates, heads)
    "vit-fused": (EViTConfig, None, True, ([65, 65, 34, 19], [65, 34, 19, 11], [64, 33, 18], 1)),
    "vit-dropped": (EViTConfig, None, False, ([65, 65, 33, 17], [65, 33, 17, 9], [], 1)),
    "deit-fused": (
        EViTDeiTConfig,
        "EViTDeiTForImageClassification",
        True,
        ([66, 66, 35, 20], [66, 35, 20, 12], [64, 33, 18], 1),
    ),
    "deit-dropped": (
        EViTDeiTConfig,
        "EViTDeiTForImageClassification",
        False,
        ([66, 66, 34, 18], [66, 34, 18, 10], [], 1),
    ),
    "deit-teacher-fused": (
        EViTDeiTConfig,
        "EViTDeiTForImageClassificationWithTeacher",
        True,
        ([66, 66, 35, 20], [66, 35, 20, 12], [64, 33, 18], 2),
    ),
    "deit-teacher-dropped": (
        EViTDeiTConfig,
        "EViTDeiTForImageClassificationWithTeacher",
        False,
        ([66, 66, 34, 18], [66, 34, 18, 10], [], 2),
    ),
}


def tiny_config(config_class, architecture, fuse, **overrides):
    architectures = [architecture] if architecture else None
    return config_class(**{**TINY, **overrides}, fuse_inattentive_tokens=fuse, architectures=architectures)


@pytest.mark.parametrize("setting", TINY_BY_HAND)
def test_tiny_macs_by_hand(setting):
    config_class, architecture, fuse, (attention_tokens, mlp_tokens, fused_candidates, heads) = TINY_BY_HAND[setting]
    config = tiny_config(config_class, architecture, fuse)
    assert config.reduction_layers == [1, 2, 3]
    patch_embedding = 64 * 3 * 4 * 4 * 32
    expected = macs_by_hand(attention_tokens, mlp_tokens, fused_candidates, heads, 32, 64, patch_embedding, 5)
    assert count_macs(config, keep_rate=0.5) == expected
    stock_tokens = [attention_tokens[0]] * 4  # keep 1: every layer sees every token
    assert count_macs(config, keep_rate=1.0) == macs_by_hand(
        stock_tokens, stock_tokens, [], heads, 32, 64, patch_embedding, 5
    )


# DeiT-S (196 patches, d 384, m 1536, 1000 labels, reduction layers 3, 6, 9) from the spec's token counts.
DEIT_S_PATCH_EMBEDDING = 196 * 3 * 16 * 16 * 384


def deit_small_tokens(prefix, after):
    """Tokens into each layer's attention and MLP when the reduction layers 3, 6, 9 leave `after` candidates."""
    stages = [prefix + 196] + [prefix + c for c in after]
    attention = [stages[0]] * 4 + [stages[1]] * 3 + [stages[2]] * 3 + [stages[3]] * 2
    mlp = [stages[0]] * 3 + [stages[1]] * 3 + [stages[2]] * 3 + [stages[3]] * 3
    return attention, mlp


@pytest.mark.parametrize(
    "config_class, architecture, prefix, heads",
    [
        (EViTConfig, None, 1, 1),
        (EViTDeiTConfig, "EViTDeiTForImageClassification", 2, 1),
        (EViTDeiTConfig, "EViTDeiTForImageClassificationWithTeacher", 2, 2),
    ],
    ids=["vit", "deit", "distilled-deit-with-teacher"],
)
@pytest.mark.parametrize(
    "keep_rate, fuse, after, fused_candidates, giga_macs",
    [
        (1.0, True, [196, 196, 196], [], 4.60),
        (0.7, True, [139, 99, 71], [196, 139, 99], 3.03),  # 138 + 1, 98 + 1, 70 + 1
        (0.7, False, [138, 97, 68], [], None),
        (0.5, True, [99, 51, 27], [196, 99, 51], 2.31),  # 98 + 1, 50 + 1, 26 + 1
        (0.5, False, [98, 49, 25], [], None),
    ],
    ids=["1.0", "0.7-fused", "0.7-dropped", "0.5-fused", "0.5-dropped"],
)
def test_deit_small_macs_exactly(
    config_class, architecture, prefix, heads, keep_rate, fuse, after, fused_candidates, giga_macs
):
    architectures = [architecture] if architecture else None
    config = config_class(**DEIT_S, fuse_inattentive_tokens=fuse, architectures=architectures)
    attention, mlp = deit_small_tokens(prefix, after)
    expected = macs_by_hand(attention, mlp, fused_candidates, heads, 384, 1536, DEIT_S_PATCH_EMBEDDING, 1000)
    assert count_macs(config, keep_rate=keep_rate) == expected
    if giga_macs is not None and prefix == 1:  # the spec's figures are for one prefix token and one head
        assert round(expected / 1e9, 2) == giga_macs


@pytest.mark.parametrize("builder", TESTERS)
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "dropped"])
@pytest.mark.parametrize("keep_rate", [1.0, 0.5, 0.25])
def test_macs_are_what_the_model_computes(builder, fuse, keep_rate):
    # The multiply-adds torch counts in one eager forward pass (matrix products, convolution) of the image side of the
    # model itself; count_macs reads the head from the configuration's architecture.
    model = evit_model_of(builder, fuse)
    image = torch.zeros(1, 3, TINY["image_size"], TINY["image_size"])
    forward = model.get_image_features if TESTERS[builder].takes_text else model
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        forward(image, keep_rate=keep_rate)
    assert counter.get_total_flops() % 2 == 0
    assert count_macs(model.config, keep_rate=keep_rate) == counter.get_total_flops() // 2


def evit_model_of(builder, fuse, **config_overrides):
    """A tiny EViT model of a tester, eager, its class as the configuration's architecture (as saved folders have)."""
    tester = TESTERS[builder]
    config = tester.evit_config_class(
        **tester.settings,
        **config_overrides,
        fuse_inattentive_tokens=fuse,
        architectures=[tester.evit_class.__name__],
        attn_implementation="eager",
    )
    return tester.evit_class(config).eval()


def test_dinov3_gated_mlp_macs_are_what_the_model_computes():
    model = evit_model_of("dinov3-registers", True, use_gated_mlp=True)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, TINY["image_size"], TINY["image_size"]), keep_rate=0.5)
    assert count_macs(model.config, keep_rate=0.5) == counter.get_total_flops() // 2


def test_dinov2_swiglu_macs_are_what_the_model_computes():
    model = evit_model_of("dinov2-classifier", True, use_swiglu_ffn=True)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, TINY["image_size"], TINY["image_size"]), keep_rate=0.5)
    assert count_macs(model.config, keep_rate=0.5) == counter.get_total_flops() // 2


@pytest.mark.parametrize("family, prefix", [("dinov2-classifier", 1), ("dinov2-registers-classifier", 4)])
def test_dinov2_macs_by_hand(family, prefix):
    # 64 candidates keep 32 (+1 fused) -> 33 keep 17 (+1) -> 18 keep 9 (+1); the prefix tokens are never candidates.
    config = evit_model_of(family, True).config
    attention_tokens = [prefix + n for n in (64, 64, 33, 18)]
    mlp_tokens = [prefix + n for n in (64, 33, 18, 10)]
    expected = macs_by_hand(attention_tokens, mlp_tokens, [64, 33, 18], 2, 32, 128, 64 * 3 * 4 * 4 * 32, 5)
    assert count_macs(config, keep_rate=0.5) == expected


def test_configurations_of_other_families_are_refused_with_the_reason():
    from transformers import ConvNextConfig

    with pytest.raises(ValueError, match="'convnext' is none of them: pass the configuration of a ViT, DeiT"):
        count_macs(ConvNextConfig())


# Non-square and tuple sizes, stock configurations next to EViT ones: the count of every path must be the multiply-adds
# the EViT model computes on that input. A stock configuration with a keep rate counts the EViT model with the paper's
# reduction layers (the tiny models' 1, 2, 3), fused token included.
NON_SQUARE = (32, 48)  # 8 x 12 patches


def _flops_at(model, tester, size, keep_rate) -> int:
    image = torch.zeros(1, 3, *size)
    forward = model.get_image_features if tester.takes_text else model
    # ViT, DeiT and CLIP interpolate their 8 x 8 position table to the 8 x 12 grid (no multiply-adds torch counts).
    flag = {} if tester.family.startswith("dino") else {"interpolate_pos_encoding": True}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        forward(image, keep_rate=keep_rate, **flag)
    return counter.get_total_flops() // 2


def _with_image_size(config, image_size):
    config = config.__class__.from_dict(config.to_dict())
    vision = getattr(config, "vision_config", config)
    vision.image_size = image_size
    return config


@pytest.mark.parametrize("builder", TESTERS)
@pytest.mark.parametrize("keep_rate", [1.0, 0.5])
def test_non_square_and_stock_counts_are_what_the_model_computes(builder, keep_rate):
    tester = TESTERS[builder]
    model = evit_model_of(builder, True)
    expected = _flops_at(model, tester, NON_SQUARE, keep_rate)
    stock = tester.stock_config_class(**tester.settings, architectures=[tester.stock_class.__name__])
    counts = {
        "tuple argument": count_macs(model.config, image_size=NON_SQUARE, keep_rate=keep_rate),
        "list argument": count_macs(model.config, image_size=list(NON_SQUARE), keep_rate=keep_rate),
        "tuple in the configuration": count_macs(_with_image_size(model.config, NON_SQUARE), keep_rate=keep_rate),
        "list in the configuration": count_macs(_with_image_size(model.config, list(NON_SQUARE)), keep_rate=keep_rate),
        "stock configuration": count_macs(stock, image_size=NON_SQUARE, keep_rate=keep_rate),
    }
    assert counts == dict.fromkeys(counts, expected)
    if keep_rate == 1.0:  # the stock configuration without a keep rate is the stock model
        assert count_macs(stock, image_size=NON_SQUARE) == expected


@pytest.mark.parametrize("image_size", [None, 48, NON_SQUARE, (48, 32)], ids=["own", "48", "32x48", "48x32"])
@pytest.mark.parametrize("budget", [0.6, 0.75, 0.95], ids=lambda share: f"{share:.0%}-of-unreduced")
@pytest.mark.parametrize("family", ["vit", "deit-teacher", "dinov2-registers"])
def test_keep_rate_for_macs_is_the_largest_within_the_budget_for_stock_and_evit_configurations(
    family, budget, image_size
):
    # The answer for a stock configuration is the EViT model's: the configuration of the model with the reduction the
    # answer sets (the paper's layers) costs at most the budget, and 0.01 more costs more.
    from evit_hf import keep_rate_for_macs

    builder = {"vit": "vit-classifier", "deit-teacher": "deit-teacher", "dinov2-registers": "dinov2-registers-base"}
    tester = TESTERS[builder[family]]
    stock = tester.stock_config_class(**tester.settings, architectures=[tester.stock_class.__name__])
    evit = tester.evit_config_class(**tester.settings, architectures=[tester.evit_class.__name__])
    target = budget * count_macs(evit, image_size=image_size, keep_rate=1.0)
    keep_rate = keep_rate_for_macs(stock, target, image_size=image_size)
    assert keep_rate == keep_rate_for_macs(evit, target, image_size=image_size)
    assert count_macs(evit, image_size=image_size, keep_rate=keep_rate) <= target
    assert count_macs(evit, image_size=image_size, keep_rate=round(keep_rate + 0.01, 2)) > target
