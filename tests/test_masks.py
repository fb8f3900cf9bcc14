"""Block masks (docs/method.md §2/§4) on hand-enumerated cases, and dense == Flex."""

from __future__ import annotations

import pytest
import torch

from nemo_bard.attention.masks import (
    CLEAN,
    NOISY,
    PAD,
    PREFIX,
    dense_mask,
    flex_block_mask,
    prefill_mask,
    training_mask,
    training_token_meta,
)


def rows(text: str) -> torch.Tensor:
    return torch.tensor([[int(c) for c in line.split()] for line in text.strip().splitlines()], dtype=torch.bool)


# P=3 (prompt blocks 0,0,1 -- the last prompt block is short), R=4, B=2: response blocks 2 and 3.
#            p0 p1 p2 c0 c1 c2 c3 n0 n1 n2 n3
HAND_BLOCK_CAUSAL = rows(
    """
    1 1 0 0 0 0 0 0 0 0 0
    1 1 0 0 0 0 0 0 0 0 0
    1 1 1 0 0 0 0 0 0 0 0
    1 1 1 1 1 0 0 0 0 0 0
    1 1 1 1 1 0 0 0 0 0 0
    1 1 1 1 1 1 1 0 0 0 0
    1 1 1 1 1 1 1 0 0 0 0
    1 1 1 0 0 0 0 1 1 0 0
    1 1 1 0 0 0 0 1 1 0 0
    1 1 1 1 1 0 0 0 0 1 1
    1 1 1 1 1 0 0 0 0 1 1
    """
)
HAND_CAUSAL = rows(
    """
    1 0 0 0 0 0 0 0 0 0 0
    1 1 0 0 0 0 0 0 0 0 0
    1 1 1 0 0 0 0 0 0 0 0
    1 1 1 1 0 0 0 0 0 0 0
    1 1 1 1 1 0 0 0 0 0 0
    1 1 1 1 1 1 0 0 0 0 0
    1 1 1 1 1 1 1 0 0 0 0
    1 1 1 0 0 0 0 1 1 0 0
    1 1 1 0 0 0 0 1 1 0 0
    1 1 1 1 1 0 0 0 0 1 1
    1 1 1 1 1 0 0 0 0 1 1
    """
)


def test_token_meta_layout_and_block_ids():
    kind, block = training_token_meta(torch.tensor([3]), torch.tensor([4]), 2, 12)
    assert kind[0].tolist() == [PREFIX] * 3 + [CLEAN] * 4 + [NOISY] * 4 + [PAD]
    # prompt chunked from 0 (last block short); response blocks start at ceil(3/2) = 2, noisy copy shares ids
    assert block[0].tolist() == [0, 0, 1, 2, 2, 3, 3, 2, 2, 3, 3, -1]


@pytest.mark.parametrize("mode,expected", [("block_causal", HAND_BLOCK_CAUSAL), ("causal", HAND_CAUSAL)])
def test_training_mask_hand_case(mode, expected):
    m = training_mask(torch.tensor([3]), torch.tensor([4]), 2, 11, clean_attention=mode)
    assert m.shape == (1, 1, 11, 11) and m.dtype == torch.bool
    assert torch.equal(m[0, 0], expected)


def test_prompt_multiple_of_block():
    # P=4, B=2: prompt blocks 0,0,1,1 -> response block id 2 (never shared with the prompt)
    kind, block = training_token_meta(torch.tensor([4]), torch.tensor([2]), 2, 8)
    assert block[0].tolist() == [0, 0, 1, 1, 2, 2, 2, 2]
    m = dense_mask(kind, block)[0, 0]
    assert m[4].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]  # clean c0
    assert m[6].tolist() == [1, 1, 1, 1, 0, 0, 1, 1]  # noisy n0: whole prompt, no clean of its block


def test_batch_padding_isolated():
    # sample 0: P=3,R=4 (len 11); sample 1: P=2,R=2 (len 6) padded to 11
    m = training_mask(torch.tensor([3, 2]), torch.tensor([4, 2]), 2, 11)[:, 0]
    assert torch.equal(m[0], HAND_BLOCK_CAUSAL)
    s1 = m[1]
    real, pad = slice(0, 6), slice(6, 11)
    assert not s1[real, pad].any(), "real tokens must never attend padding"
    assert not (s1[pad, real]).any(), "padding must not attend real tokens"
    # padding rows keep only their diagonal (NaN guard for SDPA), nothing else
    assert torch.equal(s1[pad, pad], torch.eye(5, dtype=torch.bool))
    # P=2, B=2: p0/p1 share block 0; the response is block 1
    #             p0 p1 c0 c1 n0 n1
    expected = rows(
        """
        1 1 0 0 0 0
        1 1 0 0 0 0
        1 1 1 1 0 0
        1 1 1 1 0 0
        1 1 0 0 1 1
        1 1 0 0 1 1
        """
    )
    assert torch.equal(s1[real, real], expected)


def test_clean_never_sees_noisy_and_noisy_never_sees_later_blocks():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        b = int(torch.randint(1, 5, (1,), generator=g))
        n = 3
        p = torch.randint(1, 9, (n,), generator=g)
        r = torch.randint(1, 4, (n,), generator=g) * b
        length = int((p + 2 * r).max())
        kind, block = training_token_meta(p, r, b, length)
        for mode in ("block_causal", "causal"):
            m = dense_mask(kind, block, mode)[:, 0]
            qk, kk = kind[:, :, None], kind[:, None, :]
            qb, kb = block[:, :, None], block[:, None, :]
            assert not (m & ((qk == PREFIX) | (qk == CLEAN)) & (kk == NOISY)).any()
            assert not (m & (qk == NOISY) & (kk != PAD) & (kb > qb)).any()
            assert not (m & (qk == NOISY) & (kk == NOISY) & (kb != qb)).any()
            assert not (m & (qk == NOISY) & (kk == CLEAN) & (kb >= qb)).any()


def test_prefill_mask_left_padding():
    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    m = prefill_mask(am, 2)[:, 0]
    # row 0 real tokens are t0,t1,t2 at slots 2..4: blocks 0,0,1
    assert m[0, 2:, 2:].tolist() == [[1, 1, 0], [1, 1, 0], [1, 1, 1]]
    assert not m[0, 2:, :2].any() and not m[0, :2, 2:].any()
    assert m[1].tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1] * 5]


@pytest.mark.parametrize("mode", ["block_causal", "causal"])
def test_flex_block_mask_matches_dense(mode):
    p, r, b = torch.tensor([5, 3, 7]), torch.tensor([8, 4, 4]), 4
    length = int((p + 2 * r).max())
    kind, block = training_token_meta(p, r, b, length)
    dense = dense_mask(kind, block, mode)
    flex = flex_block_mask(kind, block, mode, block_size_flex=1)
    assert torch.equal(flex.to_dense().bool(), dense.expand(-1, 1, -1, -1))


def test_flex_attention_output_matches_sdpa():
    from torch.nn.attention.flex_attention import flex_attention
    from torch.nn.functional import scaled_dot_product_attention

    p, r, b = torch.tensor([37, 20]), torch.tensor([48, 32]), 16
    length = 160
    kind, block = training_token_meta(p, r, b, length)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, length, 16, generator=g) for _ in range(3))
    dense_out = scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(kind, block))
    flex_out = flex_attention(q, k, v, block_mask=flex_block_mask(kind, block))
    real = kind != PAD
    assert torch.allclose(dense_out.transpose(1, 2)[real], flex_out.transpose(1, 2)[real], atol=1e-5)


def test_bad_mode_and_block_alignment_errors():
    with pytest.raises(ValueError, match="clean_attention"):
        training_mask(torch.tensor([2]), torch.tensor([2]), 2, 6, clean_attention="bidirectional")
    with pytest.raises(ValueError, match="multiples of block_size"):
        training_token_meta(torch.tensor([2]), torch.tensor([3]), 2, 8)
