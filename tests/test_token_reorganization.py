import math

import pytest
import torch

from evit_hf.token_reorganization import (
    candidate_scores,
    class_token_attention,
    fuse_inattentive_tokens,
    gather_tokens,
    num_kept_tokens,
    reorganize_tokens,
    rotations_for_tokens,
    select_attentive_tokens,
    track_token_positions,
)


@pytest.mark.parametrize(
    "num_candidates, keep_rate, expected",
    [
        (196, 0.7, 138),  # DeiT-S, first reduction layer
        (139, 0.7, 98),  # 138 kept + 1 fused
        (99, 0.7, 70),
        (138, 0.7, 97),  # without fusion
        (97, 0.7, 68),
        (196, 0.5, 98),
        (98, 0.5, 49),
        (49, 0.5, 25),
        (50, 0.3, 15),  # float32 would give 16
        (10, 0.01, 1),  # never fewer than one
        (10, 1.0, 10),
    ],
    ids=lambda value: str(value),
)
def test_num_kept_tokens(num_candidates, keep_rate, expected):
    assert num_kept_tokens(num_candidates, keep_rate) == expected


def test_num_kept_tokens_uses_double_precision():
    float32_count = math.ceil(torch.tensor(0.3, dtype=torch.float32).item() * 50)
    assert float32_count == 16  # the trap the spec warns about exists...
    assert num_kept_tokens(50, 0.3) == 15  # ...and is avoided


def test_class_token_attention_is_the_first_softmax_row():
    generator = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 3, 7, 4, generator=generator), torch.randn(2, 3, 7, 4, generator=generator)
    full = torch.softmax(query @ key.transpose(-1, -2) * 0.5, dim=-1)  # [batch, heads, tokens, tokens]
    row = class_token_attention(query, key, scaling=0.5)
    assert row.shape == (2, 3, 7)
    assert row.dtype == torch.float32
    torch.testing.assert_close(row, full[:, :, 0])


def test_class_token_attention_reads_only_the_class_query():
    generator = torch.Generator().manual_seed(0)
    query, key = torch.randn(1, 2, 5, 4, generator=generator), torch.randn(1, 2, 5, 4, generator=generator)
    changed = query.clone()
    changed[:, :, 1:] = 100.0
    torch.testing.assert_close(class_token_attention(query, key, 1.0), class_token_attention(changed, key, 1.0))


def test_candidate_scores_average_heads_and_skip_prefix():
    class_attention = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.3, 0.0, 0.5, 0.2]]])  # [1 image, 2 heads, 4 tokens]
    torch.testing.assert_close(candidate_scores(class_attention, 1), torch.tensor([[0.1, 0.4, 0.3]]))
    torch.testing.assert_close(candidate_scores(class_attention, 2), torch.tensor([[0.4, 0.3]]))


def test_select_attentive_tokens_highest_first():
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.9], [0.7, 0.1, 0.3, 0.2]])
    assert select_attentive_tokens(scores, 2).tolist() == [[3, 1], [0, 2]]


def test_gather_tokens():
    tokens = torch.arange(2 * 4 * 3).view(2, 4, 3)
    indices = torch.tensor([[3, 0], [1, 1]])
    assert gather_tokens(tokens, indices).tolist() == [
        [tokens[0, 3].tolist(), tokens[0, 0].tolist()],
        [tokens[1, 1].tolist(), tokens[1, 1].tolist()],
    ]


def test_gather_tokens_after_an_offset_and_from_a_strided_view():
    tokens = torch.arange(3 * 5 * 2).view(3, 5, 2)
    indices = torch.tensor([[2, 0], [3, 1], [0, 0]])
    expected = [[tokens[b, 1 + i].tolist() for i in row] for b, row in enumerate(indices.tolist())]
    assert gather_tokens(tokens, indices, offset=1).tolist() == expected
    # A non-contiguous view (every other feature) and 2-D tensors (one value per token) select the same rows.
    strided = torch.arange(3 * 5 * 4).view(3, 5, 4)[..., ::2]
    assert gather_tokens(strided, indices, offset=1).tolist() == [
        [strided[b, 1 + i].tolist() for i in row] for b, row in enumerate(indices.tolist())
    ]
    assert gather_tokens(tokens[..., 0], indices).tolist() == tokens[..., 0].gather(1, indices).tolist()


def test_gather_tokens_gradient_reaches_each_selected_row():
    tokens = torch.randn(2, 4, 3, requires_grad=True)
    indices = torch.tensor([[3, 3], [0, 2]])
    (gather_tokens(tokens, indices) * torch.arange(1.0, 4.0)).sum().backward()
    expected = torch.zeros(2, 4, 3)
    expected[0, 3] = 2 * torch.arange(1.0, 4.0)  # selected twice: both gradients add up
    expected[1, 0] = expected[1, 2] = torch.arange(1.0, 4.0)
    torch.testing.assert_close(tokens.grad, expected, rtol=0, atol=0)


def test_fuse_uses_raw_scores_of_the_others():
    candidates = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [4.0, -4.0]]])
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.05]])
    fused = fuse_inattentive_tokens(candidates, scores, kept_indices=torch.tensor([[2, 1]]))
    # not kept: candidate 0 (0.1) and 3 (0.05); not renormalised
    torch.testing.assert_close(fused, torch.tensor([[[0.1 * 1.0 + 0.05 * 4.0, 0.05 * -4.0]]]))


def test_fuse_accumulates_in_float32():
    # 256 bfloat16 tokens whose weighted sum loses most of its digits if accumulated in bfloat16.
    candidates = torch.full((1, 257, 1), 1.0 + 2**-7, dtype=torch.bfloat16)
    scores = torch.full((1, 257), 1.0 / 3.0)
    kept = torch.tensor([[0]])
    fused = fuse_inattentive_tokens(candidates, scores, kept)
    expected = (scores[:, 1:].double() * candidates[:, 1:, 0].double()).sum().to(torch.bfloat16)
    assert fused.dtype == torch.bfloat16
    assert fused.item() == expected.item()


def test_reorganize_tokens_by_hand():
    # prefix (class) token 0, candidates 1..4 with values 10, 20, 30, 40
    hidden = torch.tensor([[[0.0], [10.0], [20.0], [30.0], [40.0]]])
    class_attention = torch.tensor([[[0.2, 0.1, 0.4, 0.05, 0.25]]])  # one head
    fused, kept = reorganize_tokens(hidden, class_attention, num_prefix_tokens=1, num_keep=2, fuse=True)
    assert kept.tolist() == [[1, 3]]  # candidates with 0.4 and 0.25
    torch.testing.assert_close(fused, torch.tensor([[[0.0], [20.0], [40.0], [0.1 * 10.0 + 0.05 * 30.0]]]))
    dropped, _ = reorganize_tokens(hidden, class_attention, num_prefix_tokens=1, num_keep=2, fuse=False)
    torch.testing.assert_close(dropped, torch.tensor([[[0.0], [20.0], [40.0]]]))


def test_reorganize_keeps_two_prefix_tokens_in_place():
    hidden = torch.tensor([[[1.0], [2.0], [10.0], [20.0], [30.0]]])
    # the distillation token (index 1) has the highest attention: it must stay a prefix token, not a candidate
    class_attention = torch.tensor([[[0.1, 0.6, 0.05, 0.2, 0.05]]])
    out, kept = reorganize_tokens(hidden, class_attention, num_prefix_tokens=2, num_keep=1, fuse=True)
    assert kept.tolist() == [[1]]
    torch.testing.assert_close(out, torch.tensor([[[1.0], [2.0], [20.0], [0.05 * 10.0 + 0.05 * 30.0]]]))


def test_reorganize_gradients_reach_scores_and_tokens():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 6, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    class_attention = torch.rand(2, 2, 6, dtype=torch.float64, generator=generator).requires_grad_()

    def reorganized(hidden, class_attention):
        return reorganize_tokens(hidden, class_attention, num_prefix_tokens=1, num_keep=2, fuse=True)[0]

    assert torch.autograd.gradcheck(reorganized, (hidden, class_attention))
    reorganized(hidden, class_attention)[:, -1].sum().backward()  # the fused token alone
    assert class_attention.grad.abs().sum() > 0
    assert hidden.grad[:, 1:].abs().sum() > 0


def test_track_token_positions():
    positions = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    kept, new = track_token_positions(positions, torch.tensor([[2, 0], [3, 1]]), fused=True)
    assert kept.tolist() == [[2, 0], [3, 1]]
    assert new.tolist() == [[2, 0, -1], [3, 1, -1]]
    kept_again, _ = track_token_positions(new, torch.tensor([[2, 1], [0, 2]]), fused=False)
    assert kept_again.tolist() == [[-1, 0], [3, -1]]


HALF_DTYPES = {"bf16": (torch.bfloat16, 2**-7), "fp16": (torch.float16, 2**-10)}  # dtype, spacing of numbers in [1, 2)


@pytest.mark.parametrize("name", HALF_DTYPES)
def test_class_token_attention_of_half_inputs_is_computed_in_float32(name):
    dtype, _ = HALF_DTYPES[name]
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 3, 9, 8, generator=generator).to(dtype)
    key = torch.randn(2, 3, 9, 8, generator=generator).to(dtype)
    expected = torch.softmax(query[:, :, :1].double() @ key.double().transpose(-1, -2) * 0.5, dim=-1).squeeze(2)
    row = class_token_attention(query, key, scaling=0.5)
    assert row.dtype == torch.float32
    torch.testing.assert_close(row, expected.float(), rtol=1e-6, atol=1e-7)


def half_class_attention(dtype, eps):
    """One image, two heads, a class token and three candidates, all exact in `dtype`. Candidate 2's mean over the
    heads, 0.25 * (1 + eps / 2), is not: in `dtype` it rounds to 0.25 and ties with candidate 1."""
    return torch.tensor([[[0.25, 0.375, 0.25, 0.25], [0.25, 0.375, 0.25, 0.25 * (1 + eps)]]], dtype=dtype)


@pytest.mark.parametrize("name", HALF_DTYPES)
def test_candidate_scores_of_half_attention_are_float32(name):
    dtype, eps = HALF_DTYPES[name]
    scores = candidate_scores(half_class_attention(dtype, eps), num_prefix_tokens=1)
    assert scores.dtype == torch.float32
    assert scores.tolist() == [[0.375, 0.25, 0.25 * (1 + eps / 2)]]


@pytest.mark.parametrize("name", HALF_DTYPES)
def test_half_precision_tokens_are_kept_and_fused_by_float32_scores(name):
    dtype, eps = HALF_DTYPES[name]
    class_attention = half_class_attention(dtype, eps)
    hidden = torch.tensor([[[0.0], [7.0], [-1.0], [1.0]]], dtype=dtype)  # class token, candidates 0, 1, 2
    # keep 2: candidates 0 and 2 (0.375 > 0.25 * (1 + eps / 2) > 0.25), highest first
    tokens, kept = reorganize_tokens(hidden, class_attention, num_prefix_tokens=1, num_keep=2, fuse=True)
    assert kept.tolist() == [[0, 2]]
    assert tokens.dtype == dtype
    assert tokens[0, :, 0].tolist() == [0.0, 7.0, 1.0, 0.25 * -1.0]
    # keep 1: the fused token 0.25 * -1 + 0.25 * (1 + eps / 2) * 1 = eps / 8, exact in `dtype`; 0 if the scores were
    # rounded to `dtype`
    tokens, kept = reorganize_tokens(hidden, class_attention, num_prefix_tokens=1, num_keep=1, fuse=True)
    assert kept.tolist() == [[0]]
    assert tokens[0, :, 0].tolist() == [0.0, 7.0, eps / 8]


def test_rotations_follow_each_kept_patch_and_leave_prefix_and_fused_tokens_unrotated():
    # Three patches with rotations of their own; two images, each keeping other patches, one with a fused token.
    patch_cos = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    patch_sin = -patch_cos
    token_positions = torch.tensor([[2, 0, -1], [1, 2, 0]])  # patch index per candidate; -1: the fused token
    cos, sin = rotations_for_tokens(patch_cos, patch_sin, token_positions, num_prefix_tokens=2)
    assert cos.shape == sin.shape == (2, 1, 5, 2)  # [batch, heads (broadcast), prefix + candidates, dim]
    expected_cos = torch.tensor(
        [
            [[1.0, 1.0], [1.0, 1.0], [0.5, 0.6], [0.1, 0.2], [1.0, 1.0]],
            [[1.0, 1.0], [1.0, 1.0], [0.3, 0.4], [0.5, 0.6], [0.1, 0.2]],
        ]
    )
    expected_sin = torch.tensor(
        [
            [[0.0, 0.0], [0.0, 0.0], [-0.5, -0.6], [-0.1, -0.2], [0.0, 0.0]],
            [[0.0, 0.0], [0.0, 0.0], [-0.3, -0.4], [-0.5, -0.6], [-0.1, -0.2]],
        ]
    )
    assert torch.equal(cos[:, 0], expected_cos) and torch.equal(sin[:, 0], expected_sin)


def test_a_fused_token_stays_unrotated_when_kept_again():
    # Layer 1 keeps patches 3 and 1 and fuses the rest; layer 2 keeps the fused token and patch 1.
    first = torch.arange(4).expand(1, -1)
    _, positions = track_token_positions(first, torch.tensor([[3, 1]]), fused=True)
    _, positions = track_token_positions(positions, torch.tensor([[2, 1]]), fused=True)  # fused token, then patch 1
    assert positions.tolist() == [[-1, 1, -1]]
    patch_cos, patch_sin = torch.rand(4, 2), torch.rand(4, 2)
    cos, sin = rotations_for_tokens(patch_cos, patch_sin, positions, num_prefix_tokens=1)
    assert torch.equal(cos[0, 0, 2], patch_cos[1]) and torch.equal(sin[0, 0, 2], patch_sin[1])
    for token in (0, 1, 3):  # class token, the kept fused token, the new fused token
        assert torch.equal(cos[0, 0, token], torch.ones(2)) and torch.equal(sin[0, 0, token], torch.zeros(2))
