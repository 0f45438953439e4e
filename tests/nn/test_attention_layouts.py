"""The packed path calls SDPA with 4-D inputs (so CPU can pick its fused kernel) and matches the padded path."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from msfm.nn.attention import MultiheadSelfAttention


def test_forward_packed_uses_4d_sdpa_and_matches_padded(monkeypatch) -> None:
    torch.manual_seed(0)
    attn = MultiheadSelfAttention(32, 4).eval()
    lens = [5, 3, 7]
    x = torch.randn(sum(lens), 32)
    dims: list[int] = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        dims.append(q.dim())
        return real(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.inference_mode():
        packed = attn.forward_packed(x, lens)
    assert dims == [4, 4, 4]
    monkeypatch.setattr(F, "scaled_dot_product_attention", real)
    # Reference: each sequence on its own through the padded (batched) path.
    start = 0
    with torch.inference_mode():
        for n in lens:
            ref = attn(x[start : start + n][None])[0]
            torch.testing.assert_close(packed[start : start + n], ref, rtol=1e-5, atol=1e-6)
            start += n
