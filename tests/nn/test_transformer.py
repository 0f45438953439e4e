"""TransformerEncoderLayer / TransformerEncoder against torch's reference implementation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from msfm.nn.transformer import TransformerEncoder, TransformerEncoderLayer

DIM, HEADS, MLP = 32, 4, 64


def _randomise(module: nn.Module) -> None:
    """Non-trivial LayerNorm and bias values so that a swapped or dropped one fails."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2 + ("weight" in name))


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("with_padding", [False, True])
def test_layer_matches_torch(activation: str, norm_first: bool, with_padding: bool) -> None:
    torch.manual_seed(0)
    reference = nn.TransformerEncoderLayer(
        DIM, HEADS, MLP, dropout=0.1, activation=activation, batch_first=True, norm_first=norm_first
    ).eval()
    _randomise(reference)
    ours = TransformerEncoderLayer(DIM, HEADS, MLP, 0.1, activation=activation, norm_first=norm_first).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)

    x = torch.randn(3, 12, DIM)
    pad = (torch.arange(12)[None] >= torch.tensor([12, 8, 3])[:, None]) if with_padding else None
    with torch.no_grad():
        expected = reference(x, src_key_padding_mask=pad)
        got = ours(x, key_padding_mask=pad)
    real = ~pad if pad is not None else torch.ones(3, 12, dtype=torch.bool)
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


def test_encoder_stack_matches_torch_and_is_padding_invariant() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(DIM, HEADS, MLP, batch_first=True)
    reference = nn.TransformerEncoder(layer, 3, norm=nn.LayerNorm(DIM), enable_nested_tensor=False).eval()
    _randomise(reference)
    ours = TransformerEncoder(DIM, 3, HEADS, MLP).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)

    x = torch.randn(2, 10, DIM)
    pad = torch.arange(10)[None] >= torch.tensor([10, 6])[:, None]
    with torch.no_grad():
        expected = reference(x, src_key_padding_mask=pad)
        got = ours(x, key_padding_mask=pad)
        alone = ours(x[1:, :6])
    torch.testing.assert_close(got[~pad], expected[~pad], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, :6], alone[0], atol=1e-5, rtol=1e-5)


def test_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    layer = TransformerEncoderLayer(DIM, HEADS, MLP, 0.5)
    x = torch.randn(2, 7, DIM)
    layer.train()
    assert not torch.allclose(layer(x), layer(x))
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))


def test_unknown_activation() -> None:
    with pytest.raises(ValueError, match="activation"):
        TransformerEncoderLayer(DIM, HEADS, MLP, activation="swish")  # type: ignore[arg-type]
