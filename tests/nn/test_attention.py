"""MultiheadSelfAttention: parity with torch.nn.MultiheadAttention, masks, empty rows, KV cache."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from msfm.nn.attention import KVCache, MultiheadSelfAttention
from msfm.nn.transformer import TransformerEncoder

DIM, HEADS = 32, 4


def _pair(seed: int = 0) -> tuple[MultiheadSelfAttention, nn.MultiheadAttention]:
    torch.manual_seed(seed)
    reference = nn.MultiheadAttention(DIM, HEADS, batch_first=True).eval()
    with torch.no_grad():  # non-zero biases so that a dropped bias fails
        reference.in_proj_bias.normal_()
        reference.out_proj.bias.normal_()
    ours = MultiheadSelfAttention(DIM, HEADS).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return ours, reference


def _padding(lengths: list[int], n: int) -> torch.Tensor:
    return torch.arange(n)[None, :] >= torch.tensor(lengths)[:, None]


def test_state_dict_names_match_torch_mha() -> None:
    ours, reference = _pair()
    assert set(ours.state_dict()) == set(reference.state_dict())


@pytest.mark.parametrize("with_padding", [False, True])
def test_matches_torch_mha(with_padding: bool) -> None:
    ours, reference = _pair()
    x = torch.randn(3, 11, DIM)
    pad = _padding([11, 7, 2], 11) if with_padding else None
    expected, _ = reference(x, x, x, key_padding_mask=pad, need_weights=False)
    got = ours(x, key_padding_mask=pad)
    real = ~pad if pad is not None else torch.ones(3, 11, dtype=torch.bool)
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


def test_bool_and_float_attn_mask_match_torch_mha() -> None:
    ours, reference = _pair()
    x = torch.randn(2, 9, DIM)
    bool_mask = torch.rand(9, 9) > 0.6
    bool_mask.fill_diagonal_(False)  # keep every row attendable
    expected, _ = reference(x, x, x, attn_mask=bool_mask, need_weights=False)
    torch.testing.assert_close(ours(x, attn_mask=bool_mask), expected, atol=1e-5, rtol=1e-5)
    float_mask = torch.randn(9, 9)
    expected, _ = reference(x, x, x, attn_mask=float_mask, need_weights=False)
    torch.testing.assert_close(ours(x, attn_mask=float_mask), expected, atol=1e-5, rtol=1e-5)


def test_causal_matches_torch_mha() -> None:
    ours, reference = _pair()
    x = torch.randn(2, 8, DIM)
    causal = nn.Transformer.generate_square_subsequent_mask(8)
    expected, _ = reference(x, x, x, attn_mask=causal, need_weights=False)
    torch.testing.assert_close(ours(x, is_causal=True), expected, atol=1e-5, rtol=1e-5)


def test_fully_masked_rows_are_zero_not_nan() -> None:
    ours, _ = _pair()
    x = torch.randn(2, 5, DIM)
    pad = torch.tensor([[False] * 5, [True] * 5])  # second sequence is all padding
    out = ours(x, key_padding_mask=pad)
    assert torch.isfinite(out).all()
    # Zero attention output: only the out_proj bias remains.
    torch.testing.assert_close(out[1], ours.out_proj.bias.expand(5, DIM))
    # Left padding + causal: the first query row of sequence 0 sees no key at all.
    left_pad = torch.tensor([[True, False, False, False, False], [False] * 5])
    out = ours(x, key_padding_mask=left_pad, is_causal=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 0], ours.out_proj.bias)


def test_kv_cache_decoding_equals_full_causal_forward() -> None:
    torch.manual_seed(0)
    encoder = TransformerEncoder(DIM, 3, HEADS, 64, dropout=0.0, norm_first=True).eval()
    x = torch.randn(2, 10, DIM)
    full = encoder(x, is_causal=True)

    cache = KVCache(num_layers=3)
    steps = [encoder(x[:, :4], is_causal=True, kv_cache=cache)]  # prompt of 4 tokens at once
    steps += [encoder(x[:, i : i + 1], is_causal=True, kv_cache=cache) for i in range(4, 10)]
    assert cache.length(0) == 10
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_with_key_padding() -> None:
    torch.manual_seed(0)
    attn = MultiheadSelfAttention(DIM, HEADS).eval()
    x = torch.randn(2, 6, DIM)
    pad = torch.tensor([[True, False, False, False, False, False], [False] * 6])  # left padding
    full = attn(x, key_padding_mask=pad, is_causal=True)
    cache = KVCache(num_layers=1)
    first = attn(x[:, :3], key_padding_mask=pad[:, :3], is_causal=True, kv_cache=cache)
    rest = [
        attn(x[:, i : i + 1], key_padding_mask=pad[:, : i + 1], is_causal=True, kv_cache=cache)
        for i in range(3, 6)
    ]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_reset_and_validation() -> None:
    cache = KVCache(num_layers=2)
    cache.update(1, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    assert cache.length(0) == 0
    assert cache.length(1) == 3
    cache.reset()
    assert cache.length(1) == 0
    with pytest.raises(ValueError, match="num_layers"):
        KVCache(num_layers=0)


def test_dim_must_divide_heads() -> None:
    with pytest.raises(ValueError, match="divisible"):
        MultiheadSelfAttention(30, 4)
