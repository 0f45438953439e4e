"""FAVOR+ Performer: random features, convergence to softmax attention, explicit-only redraws."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from msfm.nn.performer import (
    FastAttention,
    Performer,
    default_nb_features,
    gaussian_orthogonal_random_matrix,
    softmax_kernel_features,
)


def test_default_nb_features_matches_upstream() -> None:
    assert default_nb_features(64) == 266
    assert default_nb_features(8) == 16
    assert FastAttention(64).projection_matrix.shape == (266, 64)


def test_orthogonal_matrix_blocks_and_norms() -> None:
    gen = torch.Generator().manual_seed(0)
    w = gaussian_orthogonal_random_matrix(20, 8, generator=gen)
    assert w.shape == (20, 8)
    for start in (0, 8):  # full blocks: rows mutually orthogonal
        block = w[start : start + 8]
        gram = block @ block.T
        off_diagonal = gram - torch.diag(torch.diagonal(gram))
        assert off_diagonal.abs().max() < 1e-4
    # scaling=0: row norms are norms of Gaussian vectors, not all equal.
    assert w.norm(dim=1).std() > 0.05
    constant = gaussian_orthogonal_random_matrix(20, 8, scaling=1, generator=gen)
    torch.testing.assert_close(constant.norm(dim=1), torch.full((20,), math.sqrt(8)))
    # Same seed, same draw.
    again = gaussian_orthogonal_random_matrix(20, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(w, again)
    with pytest.raises(ValueError, match="scaling"):
        gaussian_orthogonal_random_matrix(4, 4, scaling=2)  # type: ignore[arg-type]


def test_converges_to_exact_softmax_attention() -> None:
    # Moderate logits: with large ones the +1e-4 feature epsilon (part of the official map) dominates.
    torch.manual_seed(0)
    b, h, n, d = 1, 2, 48, 16
    q = 0.5 * torch.randn(b, h, n, d)
    k = 0.5 * torch.randn(b, h, n, d)
    v = torch.randn(b, h, n, d)
    exact = F.scaled_dot_product_attention(q, k, v)
    errors = []
    for nb_features in (8, 64, 512, 4096):
        trials = []
        for seed in range(4):
            attention = FastAttention(d, nb_features, generator=torch.Generator().manual_seed(seed))
            trials.append((attention(q, k, v) - exact).abs().mean().item())
        errors.append(sum(trials) / len(trials))
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < 0.2 * errors[0], errors
    assert errors[-1] < 0.01, errors
    # Far better than ignoring the keys (uniform attention), so the test cannot pass trivially.
    uniform = (v.mean(dim=-2, keepdim=True) - exact).abs().mean().item()
    assert errors[-1] < 0.3 * uniform, (errors, uniform)


def test_projection_is_a_persistent_buffer() -> None:
    attention = FastAttention(8, 16)
    state = attention.state_dict()
    assert "projection_matrix" in state
    assert "projection_matrix" not in dict(attention.named_parameters())
    other = FastAttention(8, 16)
    assert not torch.equal(other.projection_matrix, attention.projection_matrix)
    other.load_state_dict(state)
    torch.testing.assert_close(other.projection_matrix, attention.projection_matrix)


def test_redraw_only_when_called() -> None:
    torch.manual_seed(0)
    model = Performer(16, 2, num_heads=2, head_dim=8)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("projection_matrix")}
    x = torch.randn(2, 10, 16)
    model.train()
    for _ in range(5):
        model(x).sum().backward()
    model.eval()
    model(x)
    for key, value in before.items():
        torch.testing.assert_close(model.state_dict()[key], value)

    model.redraw_projection_matrices(torch.Generator().manual_seed(3))
    for key, value in before.items():
        assert not torch.equal(model.state_dict()[key], value)
    first = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("projection_matrix")}
    model.redraw_projection_matrices(torch.Generator().manual_seed(3))
    layer0 = "layers.0.attn.fast_attention.projection_matrix"
    # A redraw with a fresh generator of the same seed reproduces the first layer's matrix.
    torch.testing.assert_close(model.state_dict()[layer0], first[layer0])


def test_key_max_sample_makes_batches_independent() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 20, 8) for _ in range(3))
    k[2] *= 4.0  # one sample with much larger keys shifts a global max
    sample = FastAttention(8, 16, key_max="sample", generator=torch.Generator().manual_seed(0))
    glob = FastAttention(8, 16, key_max="global", generator=torch.Generator().manual_seed(0))
    batched = sample(q, k, v)
    for i in range(3):
        alone = sample(q[i : i + 1], k[i : i + 1], v[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-6, rtol=1e-6)
        # With one sample both scopes are the same computation.
        torch.testing.assert_close(glob(q[i : i + 1], k[i : i + 1], v[i : i + 1]), alone)
    assert not torch.allclose(glob(q, k, v)[0], batched[0], atol=1e-7, rtol=0)


def test_feature_map_formula() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 1, 5, 4)
    w = torch.randn(6, 4)
    c = 4**-0.25
    projected = c * x @ w.T
    half_norm = (x**2).sum(-1, keepdim=True) * c**2 / 2
    expected_q = 6**-0.5 * (torch.exp(projected - half_norm - projected.amax(-1, keepdim=True)) + 1e-4)
    expected_k = 6**-0.5 * (torch.exp(projected - half_norm - projected.max()) + 1e-4)
    torch.testing.assert_close(softmax_kernel_features(x, w, is_query=True), expected_q)
    torch.testing.assert_close(softmax_kernel_features(x, w, is_query=False, key_max="global"), expected_k)
    with pytest.raises(ValueError, match="key_max"):
        softmax_kernel_features(x, w, is_query=False, key_max="row")  # type: ignore[arg-type]


def test_performer_stack_layout_and_gradients() -> None:
    torch.manual_seed(0)
    model = Performer(16, 2, num_heads=2, head_dim=8, nb_features=16)
    keys = set(model.state_dict())
    for name in (
        "attn_norm.weight",
        "attn.to_q.bias",
        "attn.to_out.weight",
        "ffn_norm.bias",
        "ffn.w1.weight",
        "ffn.w2.bias",
    ):
        assert f"layers.1.{name}" in keys
    assert "norm.weight" in keys
    assert model.layers[0].ffn.w1.weight.shape == (64, 16)
    x = torch.randn(2, 9, 16, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 9, 16)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
