"""GeST decoder: the Eq. 5 mask, no leakage, padding invariance, KV cache, hierarchical loss, overfitting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from msfm.models.gest.config import GestConfig
from msfm.models.gest.generation import generate_cells
from msfm.models.gest.model import Gest, GestNicheClassifier, sincos_2d, spatial_attention_mask
from msfm.models.gest.objective import (
    GestLossConfig,
    gest_objective,
    hierarchical_cross_entropy,
    hierarchical_log_probs,
)

K, T = 12, 10


def tiny(depth: int = 2, **kw: object) -> Gest:
    config = GestConfig(n_genes=T, level_sizes=(K, 4, 2), dim=32, depth=depth, num_heads=4, **kw)
    model = Gest(config)
    g = torch.Generator().manual_seed(1)
    expr = torch.rand(K, T, generator=g) * 3
    hierarchy = torch.stack([torch.arange(K), torch.arange(K) // 3, torch.arange(K) // 6])
    model.set_vocabulary(expr, hierarchy)
    return model.eval()


def window(b: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, n, 2, generator=g) - 0.5, torch.randint(0, K, (b, n), generator=g)


def reference_forward(model: Gest, pos: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Plain masked attention over the concatenated [position block; content block] with the Eq. 5 mask."""
    q_pos, c_pos, c_tok = pos[:, 1:], pos[:, :-1], tokens[:, :-1]
    length = q_pos.shape[1]
    x = torch.cat(
        [
            model.encode_positions(q_pos),
            model.content_in(model.content_profiles(c_tok)) + model.encode_positions(c_pos),
        ],
        dim=1,
    )
    allowed = spatial_attention_mask(length)
    for block in model.blocks:
        attn = block.attn
        h = block.norm1(x)
        b, n, d = h.shape
        q, k, v = (
            F.linear(h, attn.qkv.weight, attn.qkv.bias)
            .view(b, n, 3, attn.num_heads, -1)
            .permute(2, 0, 3, 1, 4)
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        x = x + attn.out_proj(out.transpose(1, 2).reshape(b, n, d))
        x = x + block.mlp(block.norm2(x))
    return model.norm(x[:, length:])


def test_eq5_mask_layout() -> None:
    m = spatial_attention_mask(4)
    assert m.shape == (8, 8)
    # Position rows see only themselves.
    assert torch.equal(
        m[:4], torch.cat([torch.eye(4, dtype=torch.bool), torch.zeros(4, 4, dtype=torch.bool)], 1)
    )
    # Content row i sees position i and contents 0..i.
    assert m[4 + 2].nonzero().flatten().tolist() == [2, 4, 5, 6]


def test_two_stream_equals_masked_attention_over_concatenation() -> None:
    model = tiny()
    pos, tokens = window(2, 9)
    ref = reference_forward(model, pos, tokens)
    out = model(pos[:, 1:], pos[:, :-1], tokens[:, :-1])
    assert out.hidden.shape == (2, 8, 32)
    assert out.expr.shape == (2, 8, T)
    assert out.logits.shape == (2, 8, K)
    torch.testing.assert_close(out.hidden, ref, atol=1e-5, rtol=1e-5)


def test_no_leakage_from_later_cells() -> None:
    model = tiny()
    pos, tokens = window(1, 8)
    expr = model.content_profiles(tokens[:, :-1]).clone().requires_grad_(True)
    out = model(pos[:, 1:], pos[:, :-1], None, content_expr=expr)
    n = expr.shape[1]
    for i in range(n):
        (grad,) = torch.autograd.grad(out.logits[0, i].sum(), expr, retain_graph=True)
        per_cell = grad[0].abs().sum(-1)
        assert torch.all(per_cell[i + 1 :] == 0), f"row {i} sees later cells"
        assert per_cell[: i + 1].sum() > 0
    # Query positions of later rows (positions of cells after the target) have no influence either; earlier
    # query positions do, through earlier content rows (they are positions of already-known cells).
    qp = pos[:, 1:].clone().requires_grad_(True)
    out = model(qp, pos[:, :-1], tokens[:, :-1])
    (grad,) = torch.autograd.grad(out.logits[0, 3].sum(), qp)
    assert grad[0].abs().sum(-1).nonzero().flatten().tolist() == [0, 1, 2, 3]


def test_batched_equals_one_by_one_with_left_padding() -> None:
    model = tiny()
    lengths = [7, 4, 1]
    windows = [window(1, n + 1, seed=s) for s, n in enumerate(lengths)]
    n_max = max(lengths)
    qp = torch.zeros(3, n_max, 2)
    cp = torch.zeros(3, n_max, 2)
    tok = torch.zeros(3, n_max, dtype=torch.long)
    mask = torch.zeros(3, n_max, dtype=torch.bool)
    for i, ((pos, t), n) in enumerate(zip(windows, lengths, strict=True)):
        qp[i, n_max - n :], cp[i, n_max - n :], tok[i, n_max - n :] = pos[0, 1:], pos[0, :-1], t[0, :-1]
        mask[i, n_max - n :] = True
    batched = model(qp, cp, tok, mask=mask)
    for i, ((pos, t), n) in enumerate(zip(windows, lengths, strict=True)):
        alone = model(pos[:, 1:], pos[:, :-1], t[:, :-1])
        torch.testing.assert_close(batched.logits[i, n_max - n :], alone.logits[0], atol=1e-5, rtol=1e-5)


def test_cached_generation_equals_uncached_and_teacher_forced() -> None:
    model = tiny(depth=3)
    pos, tokens = window(2, 12, seed=3)
    ctx_pos, ctx_tok, qpos = pos[:, :5], tokens[:, :5], pos[:, 5:]
    cached = generate_cells(model, ctx_pos, ctx_tok, qpos, use_cache=True)
    plain = generate_cells(model, ctx_pos, ctx_tok, qpos, use_cache=False)
    assert torch.equal(cached.tokens, plain.tokens)
    torch.testing.assert_close(cached.hidden, plain.hidden, atol=1e-5, rtol=1e-5)
    # Teacher forcing with the generated tokens in one parallel pass gives the same predictions.
    full_tok = torch.cat([ctx_tok, cached.tokens], 1)
    out = model(pos[:, 1:], pos[:, :-1], full_tok[:, :-1])
    torch.testing.assert_close(out.hidden[:, 4:], cached.hidden, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.logits[:, 4:].argmax(-1), cached.tokens)
    weighted = generate_cells(model, ctx_pos, ctx_tok, qpos, mode="weighted")
    probs = torch.softmax(out.logits[:, 4:], -1)
    torch.testing.assert_close(weighted.expr, probs @ model.metacell_expr, atol=1e-5, rtol=1e-5)


def test_cached_generation_left_padded_batch_equals_single() -> None:
    model = tiny()
    pos, tokens = window(2, 10, seed=5)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :3] = False  # window 1 has only 3 context cells
    res = generate_cells(model, pos[:, :6], tokens[:, :6], pos[:, 6:], context_mask=mask)
    alone = generate_cells(model, pos[1:, 3:6], tokens[1:, 3:6], pos[1:, 6:])
    assert torch.equal(res.tokens[1], alone.tokens[0])
    torch.testing.assert_close(res.hidden[1], alone.hidden[0], atol=1e-5, rtol=1e-5)


def test_sampling_is_seeded_and_needs_context() -> None:
    model = tiny()
    pos, tokens = window(1, 8)
    a = generate_cells(
        model,
        pos[:, :2],
        tokens[:, :2],
        pos[:, 2:],
        mode="sample",
        generator=torch.Generator().manual_seed(0),
    )
    b = generate_cells(
        model,
        pos[:, :2],
        tokens[:, :2],
        pos[:, 2:],
        mode="sample",
        generator=torch.Generator().manual_seed(0),
        use_cache=False,
    )
    assert torch.equal(a.tokens, b.tokens)
    with pytest.raises(ValueError, match="at least one known context cell"):
        generate_cells(model, pos[:, :0], tokens[:, :0], pos)
    with pytest.raises(ValueError, match="left-padded"):
        generate_cells(
            model, pos[:, :2], tokens[:, :2], pos[:, 2:], context_mask=torch.tensor([[True, False]])
        )


def test_hierarchical_probabilities_sum_to_one() -> None:
    model = tiny()
    logits = torch.randn(3, 5, K) * 4
    for logp, size in zip(hierarchical_log_probs(logits, model.hierarchy, (K, 4, 2)), (K, 4, 2), strict=True):
        assert logp.shape == (3, 5, size)
        torch.testing.assert_close(logp.exp().sum(-1), torch.ones(3, 5))
    # Level 1 probability is the sum of its members' probabilities.
    p = torch.softmax(logits, -1)
    lvl1 = hierarchical_log_probs(logits, model.hierarchy, (K, 4, 2))[1].exp()
    torch.testing.assert_close(lvl1[..., 0], p[..., 0:3].sum(-1))


def test_hierarchical_ce_matches_hand_computation() -> None:
    model = tiny()
    logits = torch.randn(6, K)
    targets = torch.tensor([0, 5, 11, 3, 3, 7])
    loss, parts = hierarchical_cross_entropy(logits, targets, model.hierarchy, (K, 4, 2), (0.5, 0.3, 0.2))
    p = torch.softmax(logits, -1)
    ce0 = F.cross_entropy(logits, targets)
    ce1 = -torch.log(
        torch.stack([p[i, (targets[i] // 3) * 3 : (targets[i] // 3) * 3 + 3].sum() for i in range(6)])
    ).mean()
    ce2 = -torch.log(
        torch.stack([p[i, (targets[i] // 6) * 6 : (targets[i] // 6) * 6 + 6].sum() for i in range(6)])
    ).mean()
    torch.testing.assert_close(loss, 0.5 * ce0 + 0.3 * ce1 + 0.2 * ce2)
    torch.testing.assert_close(parts["ce_l1"], ce1)
    assert GestLossConfig().weights(4) == (0.25, 0.25, 0.25, 0.25)
    assert GestLossConfig(level_weights=(1.0,)).weights(3) == (1.0, 0.0, 0.0)


def test_tiny_model_overfits_a_batch() -> None:
    torch.manual_seed(0)
    model = tiny(depth=2).train()
    pos, tokens = window(4, 10, seed=7)
    batch = {"pos": pos, "tokens": tokens, "mask": torch.ones(4, 10, dtype=torch.bool)}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        out = gest_objective(model, batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else float(out.loss.detach())
    model.eval()
    final = gest_objective(model, batch)
    assert float(final.loss.detach()) < 0.2 * first
    assert float(final.components["acc_l0"]) > 0.95


def test_position_encoding_and_config_errors() -> None:
    e = sincos_2d(torch.tensor([[0.0, 0.0], [0.1, -0.2]]), 16)
    assert e.shape == (2, 16)
    torch.testing.assert_close(e[0], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4))
    model = tiny(position_encoding="constant")
    pos, tokens = window(1, 5)
    moved = pos + 0.1
    a = model(pos[:, 1:], pos[:, :-1], tokens[:, :-1]).logits
    b = model(moved[:, 1:], moved[:, :-1], tokens[:, :-1]).logits
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="divisible"):
        GestConfig(dim=30, num_heads=4)
    with pytest.raises(ValueError, match="strictly decreasing"):
        GestConfig(level_sizes=(10, 12))
    with pytest.raises(ValueError, match="metacell_expr"):
        tiny().set_vocabulary(torch.zeros(3, 3), torch.zeros(3, K, dtype=torch.long))


def test_niche_classifier_pools_real_rows_only() -> None:
    model = tiny()
    clf = GestNicheClassifier(model, 3, dropout=0.0).eval()
    pos, tokens = window(1, 6)
    mask = torch.tensor([[False, False, True, True, True]])
    padded = clf(pos[:, 1:], pos[:, :-1], tokens[:, :-1], mask=mask)
    alone = clf(pos[:, 3:], pos[:, 2:-1], tokens[:, 2:-1])
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)
    assert padded.shape == (1, 3)
    assert math.isfinite(float(padded.sum()))


def test_default_preset_size_on_meta() -> None:
    from msfm.registry import create_model, get_model_entry

    with torch.device("meta"):
        model = create_model("gest-l8h8")
    # d=512, T=2000, 8 blocks: content_in 1,024,512 + 8 x 3,151,360 + final norm 512 + head 262,656 + 1,026,000.
    assert sum(p.numel() for p in model.parameters()) == 27_524_560
    assert model.config.level_sizes == (2048, 15, 10, 5)
    assert get_model_entry("gest-tiny").family == "gest"
