"""AutoDiscretizationEmbedding: the formula, sentinel and explicit-mask paths."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from msfm.nn.value_embedding import AutoDiscretizationEmbedding


def _embedding() -> AutoDiscretizationEmbedding:
    torch.manual_seed(0)
    return AutoDiscretizationEmbedding(8, num_bins=10, alpha=0.5)


def test_formula_and_weights() -> None:
    emb = _embedding()
    values = torch.tensor([[0.0, 1.5, 3.2], [7.0, 0.1, 0.0]])
    out, weights = emb(values, return_weights=True)
    v1 = F.leaky_relu(values[..., None] * emb.mlp.weight[:, 0] + emb.mlp.bias, 0.1)
    v2 = 0.5 * v1 + v1 @ emb.mlp2.weight.T + emb.mlp2.bias
    expected_w = torch.softmax(v2, dim=-1)
    torch.testing.assert_close(weights, expected_w)
    torch.testing.assert_close(out, expected_w @ emb.emb.weight)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3))
    assert out.shape == (2, 3, 8)


def test_sentinel_values_select_special_rows() -> None:
    emb = _embedding()
    values = torch.tensor([1.0, 102.0, 103.0, 0.0])
    out = emb(values)
    torch.testing.assert_close(out[1], emb.emb_mask.weight[0])
    torch.testing.assert_close(out[2], emb.emb_pad.weight[0])
    assert not torch.allclose(out[0], emb.emb_mask.weight[0])


def test_explicit_masks_override_sentinels() -> None:
    emb = _embedding()
    values = torch.tensor([1.0, 102.0, 103.0, 0.0])
    mask = torch.tensor([True, False, False, False])
    pad = torch.tensor([False, False, False, True])
    out = emb(values, mask=mask, pad=pad)
    torch.testing.assert_close(out[0], emb.emb_mask.weight[0])
    torch.testing.assert_close(out[3], emb.emb_pad.weight[0])
    # 102 and 103 are ordinary values on the explicit path.
    plain = emb(values, mask=torch.zeros(4, dtype=torch.bool), pad=torch.zeros(4, dtype=torch.bool))
    torch.testing.assert_close(out[1:3], plain[1:3])
    assert not torch.allclose(out[1], emb.emb_mask.weight[0])


def test_explicit_and_sentinel_paths_agree() -> None:
    emb = _embedding()
    values = torch.tensor([[2.0, 102.0, 0.5, 103.0]])
    explicit = emb(values, mask=values == 102.0, pad=values == 103.0)
    torch.testing.assert_close(explicit, emb(values))


def test_state_dict_names() -> None:
    assert set(_embedding().state_dict()) == {
        "mlp.weight",
        "mlp.bias",
        "mlp2.weight",
        "mlp2.bias",
        "emb.weight",
        "emb_mask.weight",
        "emb_pad.weight",
    }
