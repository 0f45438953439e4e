"""Tests of the scFoundation pretraining objective: downsampling, masking, batch layout, loss, overfit."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy import integrate, stats

from msfm.errors import MsfmInputError
from msfm.models.scfoundation.config import ScFoundationConfig
from msfm.models.scfoundation.model import ScFoundation
from msfm.models.scfoundation.objective import (
    NUM_GENES,
    DownsampleConfig,
    MaskingConfig,
    PretrainCollator,
    PretrainConfig,
    build_optimizer,
    downsample_counts,
    make_pretrain_batch,
    pretrain_loss,
    sample_mask,
)

G = NUM_GENES


def random_counts(
    n_cells: int,
    *,
    num_genes: int = G,
    genes_per_cell: tuple[int, int] = (300, 1500),
    mean_count: float = 4.0,
    seed: int = 0,
) -> sp.csr_matrix:
    """Sparse integer counts: a random gene set per cell, geometric counts (UMI-like heavy tail)."""
    rng = np.random.default_rng(seed)
    n_genes = rng.integers(*genes_per_cell, size=n_cells)
    rows, cols = [], []
    for i, k in enumerate(n_genes):
        rows.append(np.full(k, i))
        cols.append(rng.choice(num_genes, size=k, replace=False))
    row, col = np.concatenate(rows), np.concatenate(cols)
    data = rng.geometric(1.0 / mean_count, size=row.size).astype(np.float32)
    return sp.csr_matrix((data, (row, col)), shape=(n_cells, num_genes))


def _no_downsampling(**masking: object) -> PretrainConfig:
    return PretrainConfig(downsample=DownsampleConfig(enabled=False), masking=MaskingConfig(**masking))


# ----------------------------------------------------------------------------------------------------------
# Downsampling
# ----------------------------------------------------------------------------------------------------------
def test_downsampling_statistics() -> None:
    counts = random_counts(3000, genes_per_cell=(800, 1200), mean_count=5.0)  # totals ~5,000
    cfg = DownsampleConfig()
    res = downsample_counts(counts, cfg, np.random.default_rng(1))

    # About half of the cells keep full depth (all cells are deep enough to be candidates).
    assert res.target_total.min() >= cfg.min_total_for_downsampling
    assert abs((~res.downsampled).mean() - cfg.keep_full_depth_prob) < 0.03

    # The realised rate (input depth / raw depth) follows the clipped Beta prior.
    floor = np.maximum(cfg.min_rate, cfg.min_input_total / res.target_total.min())
    prior = stats.beta(cfg.beta_a, cfg.beta_b)
    expected = floor * prior.cdf(floor) + integrate.quad(lambda x: x * prior.pdf(x), floor, 1.0)[0]
    realised = res.source_total[res.downsampled] / res.target_total[res.downsampled]
    assert abs(realised.mean() - expected) < 0.02
    assert abs(res.rate[res.downsampled].mean() - expected) < 0.02
    assert abs(realised.std() - prior.std()) < 0.02
    # Binomial thinning: realised rate ~ drawn gamma up to sampling noise.
    np.testing.assert_allclose(realised, res.rate[res.downsampled], atol=0.05)

    # Thinned counts are integers, never above the raw counts; kept cells are untouched (S = T).
    thinned = res.counts.toarray()
    raw = counts.toarray()
    assert np.array_equal(thinned, np.rint(thinned))
    assert (thinned <= raw).all()
    assert (thinned >= 0).all()
    assert np.array_equal(thinned[~res.downsampled], raw[~res.downsampled])
    np.testing.assert_array_equal(res.source_total[~res.downsampled], res.target_total[~res.downsampled])
    np.testing.assert_array_equal(res.rate[~res.downsampled], 1.0)
    assert (res.source_total[res.downsampled] < res.target_total[res.downsampled]).all()
    assert res.counts.nnz == np.count_nonzero(thinned)  # no stored zeros


def test_low_depth_cells_are_not_downsampled() -> None:
    counts = random_counts(500, genes_per_cell=(100, 200), mean_count=3.0)  # totals ~300-600
    res = downsample_counts(counts, DownsampleConfig(keep_full_depth_prob=0.0), np.random.default_rng(0))
    assert res.target_total.max() < 1000
    assert not res.downsampled.any()
    assert (res.counts != sp.csr_matrix(counts)).nnz == 0


def test_minimum_input_depth() -> None:
    counts = random_counts(400, genes_per_cell=(400, 600), mean_count=3.0)  # totals ~1,200-1,800
    cfg = DownsampleConfig(keep_full_depth_prob=0.0, min_rate=0.01, min_input_total=800.0)
    res = downsample_counts(counts, cfg, np.random.default_rng(0))
    assert res.downsampled.any()
    assert (res.source_total >= 800).all()
    # The floor min_input_total / total lifts small rates.
    assert (res.rate[res.downsampled] >= 800 / res.target_total[res.downsampled] - 1e-12).all()


def test_downsampling_can_be_switched_off() -> None:
    counts = random_counts(50)
    for cfg in (DownsampleConfig(enabled=False), DownsampleConfig(keep_full_depth_prob=1.0)):
        res = downsample_counts(counts, cfg, np.random.default_rng(0))
        assert not res.downsampled.any()
        np.testing.assert_array_equal(res.counts.toarray(), counts.toarray())


def test_downsampling_warns_on_non_integer_counts() -> None:
    counts = random_counts(20, genes_per_cell=(800, 900), mean_count=5.0)
    counts.data += 0.5
    with pytest.warns(UserWarning, match="non-integer"):
        downsample_counts(counts, DownsampleConfig(keep_full_depth_prob=0.0), np.random.default_rng(0))


def test_downsample_config_rejects_inverted_rates() -> None:
    with pytest.raises(ValueError, match="min_rate"):
        DownsampleConfig(min_rate=0.5, max_rate=0.4)


# ----------------------------------------------------------------------------------------------------------
# Masking
# ----------------------------------------------------------------------------------------------------------
def test_masking_rates() -> None:
    counts = random_counts(200)
    res = sample_mask(counts, MaskingConfig(), np.random.default_rng(0))
    nnz = np.diff(counts.indptr)
    masked_per_cell = np.bincount(np.repeat(np.arange(200), nnz), weights=res.masked_nonzero, minlength=200)
    # Exact count per cell (stochastic rounding): within one gene of 30 %.
    assert (np.abs(masked_per_cell - 0.3 * nnz) < 1.0 + 1e-9).all()
    assert abs(res.masked_nonzero.mean() - 0.3) < 0.005
    zero_total = 200 * G - counts.nnz
    assert abs(res.masked_zero.sum() / zero_total - 0.03) < 0.002
    # Zero masking only touches zero genes.
    assert not res.masked_zero[counts.nonzero()].any()
    assert not res.dropped.any()


def test_min_masked_and_min_visible() -> None:
    # Cells with 1, 2 and 3 non-zero genes.
    dense = np.zeros((3, 50), dtype=np.float32)
    dense[0, 5] = 1
    dense[1, [3, 9]] = 2
    dense[2, [1, 2, 3]] = 1
    csr = sp.csr_matrix(dense)
    for seed in range(20):
        res = sample_mask(csr, MaskingConfig(value_mask_prob=0.3), np.random.default_rng(seed))
        per_cell = np.add.reduceat(res.masked_nonzero.astype(int), csr.indptr[:-1])
        assert per_cell[0] == 0  # a lone gene stays visible
        assert per_cell[1] == 1  # >= 1 masked, >= 1 visible
        assert per_cell[2] in (1, 2)


def test_masked_nonzero_genes_are_not_encoder_tokens() -> None:
    counts = random_counts(16)
    cfg = PretrainConfig()
    batch = make_pretrain_batch(counts, cfg, np.random.default_rng(3))
    ds = downsample_counts(counts, cfg.downsample, np.random.default_rng(3))  # same first draws
    inp = ds.counts
    for i in range(16):
        real = ~batch["padding_mask"][i]
        ids = batch["gene_ids"][i][real].numpy()
        genes = ids[:-2]
        input_genes = inp.indices[inp.indptr[i] : inp.indptr[i + 1]]
        masked = np.flatnonzero(batch["full_mask"][i, :G].numpy())
        masked_nonzero = np.intersect1d(masked, input_genes)
        assert np.all(np.diff(genes) > 0)  # ascending gene id
        assert np.intersect1d(genes, masked_nonzero).size == 0
        # Every non-zero input gene is either an encoder token or masked.
        np.testing.assert_array_equal(np.union1d(genes, masked_nonzero), input_genes)
        assert masked_nonzero.size >= 1


# ----------------------------------------------------------------------------------------------------------
# Batch layout
# ----------------------------------------------------------------------------------------------------------
def test_batch_layout_depth_tokens_and_values() -> None:
    counts = random_counts(12, genes_per_cell=(600, 1200))
    cfg = PretrainConfig()
    batch = make_pretrain_batch(counts, cfg, np.random.default_rng(5))
    ds = downsample_counts(counts, cfg.downsample, np.random.default_rng(5))
    b, n = batch["values"].shape
    assert batch["full_values"].shape == (b, G + 2)
    assert batch["full_mask"].shape == (b, G + 2)
    assert batch["target"].shape == (b, G)
    assert batch["loss_mask"].shape == (b, G)
    assert batch["values"].dtype == torch.float32
    assert batch["gene_ids"].dtype == torch.int64
    assert batch["padding_mask"].dtype == torch.bool
    assert ds.downsampled.any()
    assert (~ds.downsampled).any()

    t_expected = np.log10(ds.target_total).astype(np.float32)
    s_expected = np.log10(ds.source_total).astype(np.float32)
    lengths = (~batch["padding_mask"]).sum(1).numpy()
    # Real tokens form a prefix; padding uses id G + 2 and value 0.
    assert torch.equal(batch["padding_mask"], torch.arange(n)[None] >= torch.as_tensor(lengths)[:, None])
    assert (batch["gene_ids"][batch["padding_mask"]] == G + 2).all()
    assert (batch["values"][batch["padding_mask"]] == 0).all()
    rows = np.arange(b)
    np.testing.assert_array_equal(batch["gene_ids"][rows, lengths - 2].numpy(), G)
    np.testing.assert_array_equal(batch["gene_ids"][rows, lengths - 1].numpy(), G + 1)
    np.testing.assert_array_equal(batch["values"][rows, lengths - 2].numpy(), t_expected)
    np.testing.assert_array_equal(batch["values"][rows, lengths - 1].numpy(), s_expected)
    np.testing.assert_array_equal(batch["full_values"][:, G].numpy(), t_expected)
    np.testing.assert_array_equal(batch["full_values"][:, G + 1].numpy(), s_expected)
    assert not batch["full_mask"][:, G:].any()
    # S < T exactly for the downsampled cells.
    np.testing.assert_array_equal(s_expected < t_expected, ds.downsampled)

    # Decoder input: normalised downsampled input, 0 at masked positions.
    inp = ds.counts.toarray().astype(np.float64)
    inp_norm = np.log1p(inp / ds.source_total[:, None] * 1e4).astype(np.float32)
    full_mask = batch["full_mask"][:, :G].numpy()
    expected_full = np.where(full_mask, 0.0, inp_norm).astype(np.float32)
    np.testing.assert_allclose(batch["full_values"][:, :G].numpy(), expected_full, rtol=1e-6, atol=0)
    # Encoder values are the same numbers as the decoder input at those genes.
    for i in range(b):
        ids = batch["gene_ids"][i, : lengths[i] - 2]
        np.testing.assert_array_equal(
            batch["values"][i, : lengths[i] - 2].numpy(), batch["full_values"][i, ids].numpy()
        )

    # Target: full-depth normalised counts; loss mask = masked genes.
    raw = counts.toarray().astype(np.float64)
    target = np.log1p(raw / raw.sum(1, keepdims=True) * 1e4).astype(np.float32)
    np.testing.assert_allclose(batch["target"].numpy(), target, rtol=1e-6, atol=0)
    assert torch.equal(batch["loss_mask"], batch["full_mask"][:, :G])


def test_pad_to_multiple_of() -> None:
    cfg = PretrainConfig(pad_to_multiple_of=16)
    batch = make_pretrain_batch(random_counts(5), cfg, np.random.default_rng(0))
    assert batch["values"].shape[1] % 16 == 0


@pytest.mark.parametrize("overflow", ["mask", "drop"])
def test_encoder_cap(overflow: str) -> None:
    counts = random_counts(6, genes_per_cell=(50, 80), num_genes=500)
    cfg = _no_downsampling(encoder_max_len=12, encoder_overflow=overflow)
    batch = make_pretrain_batch(counts, cfg, np.random.default_rng(0), num_genes=500)
    lengths = (~batch["padding_mask"]).sum(1)
    assert (lengths == 12).all()
    nnz = np.diff(counts.indptr)
    masked_nonzero = (batch["full_mask"][:, :500].numpy() & (counts.toarray() > 0)).sum(1)
    if overflow == "mask":
        np.testing.assert_array_equal(masked_nonzero, nnz - 10)
    else:
        # Dropped genes are neither encoder tokens nor masked: the decoder sees their value.
        assert (masked_nonzero < nnz - 10).all()
        visible = (batch["full_values"][:, :500] > 0).sum(1).numpy()
        np.testing.assert_array_equal(visible, nnz - masked_nonzero)


def test_deterministic_given_seed() -> None:
    counts = random_counts(8)
    a = PretrainCollator(seed=7)(counts)
    b = PretrainCollator(seed=7)(counts)
    c = PretrainCollator(seed=8)(counts)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["full_mask"], c["full_mask"])
    # The collator's stream moves on: a second call draws new masks.
    collate = PretrainCollator(seed=7)
    first, second = collate(counts), collate(counts)
    assert torch.equal(first["full_mask"], a["full_mask"])
    assert not torch.equal(first["full_mask"], second["full_mask"])


def test_workers_draw_different_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    @dataclass
    class Info:
        id: int
        seed: int

    counts = random_counts(4)
    batches = []
    for info in (Info(0, 100), Info(1, 101), Info(0, 100)):
        collate = PretrainCollator(seed=1)
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda info=info: info)
        batches.append(collate(counts))
    assert not torch.equal(batches[0]["full_mask"], batches[1]["full_mask"])
    assert torch.equal(batches[0]["full_mask"], batches[2]["full_mask"])


def test_collator_accepts_lists_and_dense_rows() -> None:
    counts = random_counts(4)
    ref = PretrainCollator(seed=0)(counts)
    as_rows = PretrainCollator(seed=0)([counts[i] for i in range(4)])
    as_dense = PretrainCollator(seed=0)(counts.toarray())
    as_arrays = PretrainCollator(seed=0)(list(counts.toarray()))
    for other in (as_rows, as_dense, as_arrays):
        for key in ref:
            assert torch.equal(ref[key], other[key]), key


def test_zero_count_cells_are_dropped() -> None:
    counts = random_counts(4).tolil()
    counts[1, :] = 0
    with pytest.warns(UserWarning, match="zero total count"):
        batch = make_pretrain_batch(counts.tocsr(), PretrainConfig(), np.random.default_rng(0))
    assert batch["values"].shape[0] == 3
    assert all(torch.isfinite(v.float()).all() for v in batch.values())
    with pytest.raises(MsfmInputError, match="zero counts"):
        make_pretrain_batch(sp.csr_matrix((2, G)), PretrainConfig(), np.random.default_rng(0))


def test_input_errors() -> None:
    with pytest.raises(MsfmInputError, match="19264"):
        make_pretrain_batch(sp.csr_matrix((2, 100)), PretrainConfig(), np.random.default_rng(0))
    bad = random_counts(2)
    bad.data[0] = -1
    with pytest.raises(MsfmInputError, match="negative"):
        make_pretrain_batch(bad, PretrainConfig(), np.random.default_rng(0))


# ----------------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------------
@dataclass
class _Out:
    expression: torch.Tensor


class _FixedPrediction(torch.nn.Module):
    def __init__(self, expression: torch.Tensor) -> None:
        super().__init__()
        self.expression = torch.nn.Parameter(expression.clone())

    def forward(self, batch: dict[str, torch.Tensor]) -> _Out:
        return _Out(self.expression)


def test_loss_only_counts_masked_positions() -> None:
    batch = make_pretrain_batch(random_counts(3), PretrainConfig(), np.random.default_rng(0))
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(3, G + 2, generator=gen)
    out = pretrain_loss(_FixedPrediction(pred), batch)

    mask, target = batch["loss_mask"], batch["target"]
    sq = (pred[:, :G] - target) ** 2
    torch.testing.assert_close(out.loss, sq[mask].mean())
    torch.testing.assert_close(out.components["mse_masked_nonzero"], sq[mask & (target > 0)].mean())
    torch.testing.assert_close(out.components["mse_masked_zero"], sq[mask & (target == 0)].mean())
    assert out.n == 3

    # Changing predictions at unmasked positions (and at T, S) does not change the loss ...
    changed = pred.clone()
    changed[:, :G][~mask] += 100.0
    changed[:, G:] = -50.0
    assert torch.equal(pretrain_loss(_FixedPrediction(changed), batch).loss, out.loss)
    # ... and their gradient is zero, while masked positions get one.
    model = _FixedPrediction(pred)
    pretrain_loss(model, batch).loss.backward()
    grad = model.expression.grad[:, :G]
    assert (grad[~mask] == 0).all()
    assert (grad[mask] != 0).any()


def test_loss_requires_expression() -> None:
    class NoHead(torch.nn.Module):
        def forward(self, batch: dict[str, torch.Tensor]) -> _Out:
            return _Out(None)  # type: ignore[arg-type]

    batch = make_pretrain_batch(random_counts(2), PretrainConfig(), np.random.default_rng(0))
    with pytest.raises(ValueError, match="expression"):
        pretrain_loss(NoHead(), batch)


# ----------------------------------------------------------------------------------------------------------
# Optimiser defaults
# ----------------------------------------------------------------------------------------------------------
def test_optimizer_defaults_and_schedule() -> None:
    cfg = PretrainConfig()
    assert (cfg.lr, cfg.weight_decay, cfg.grad_clip_norm, cfg.warmup_steps) == (1e-4, 0.0, 1.0, 9766)
    param = torch.nn.Parameter(torch.zeros(2))
    opt, sched = build_optimizer([param], PretrainConfig(warmup_steps=4, max_steps=12, lr_decay="cosine"))
    assert isinstance(opt, torch.optim.AdamW)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(lrs[:4], [2.5e-5, 5e-5, 7.5e-5, 1e-4])
    assert lrs[4] == pytest.approx(1e-4)
    assert lrs[12] == pytest.approx(0.0, abs=1e-12)
    kwargs = cfg.optim_kwargs()
    assert kwargs["lr"] == 1e-4
    assert kwargs["warmup_steps"] == 9766
    assert kwargs["weight_decay"] == 0.0


def test_config_round_trip() -> None:
    cfg = PretrainConfig(masking=MaskingConfig(value_mask_prob=0.2), pad_to_multiple_of=8)
    assert PretrainConfig.model_validate_json(cfg.model_dump_json()) == cfg
    with pytest.raises(ValueError, match="extra"):
        PretrainConfig(unknown=1)  # type: ignore[call-arg]


# ----------------------------------------------------------------------------------------------------------
# Real model
# ----------------------------------------------------------------------------------------------------------
def _tiny_model(num_genes: int) -> ScFoundation:
    torch.manual_seed(0)
    return ScFoundation(
        ScFoundationConfig(
            num_genes=num_genes,
            encoder_dim=32,
            encoder_depth=1,
            encoder_num_heads=2,
            encoder_head_dim=16,
            encoder_dropout=0.0,
            decoder_dim=16,
            decoder_depth=1,
            decoder_num_heads=2,
            decoder_head_dim=8,
        )
    )


def test_full_panel_step_with_real_model() -> None:
    """One training step of a tiny model on the full 19,264-gene panel: finite loss, gradients flow."""
    model = _tiny_model(G)
    batch = PretrainCollator(seed=0)(random_counts(2, genes_per_cell=(300, 400), mean_count=10.0))
    out = pretrain_loss(model, batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert set(out.components) == {"loss", "mse_masked_nonzero", "mse_masked_zero"}


def test_overfits_one_batch() -> None:
    """A tiny ScFoundation memorises one fixed batch (fixed downsampling and masks)."""
    num_genes = 2000  # the decoder runs over every gene; a smaller panel keeps this under seconds on CPU
    counts = random_counts(4, num_genes=num_genes, genes_per_cell=(250, 350), mean_count=10.0)
    batch = make_pretrain_batch(counts, PretrainConfig(), np.random.default_rng(1), num_genes=num_genes)
    model = _tiny_model(num_genes)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses: list[float] = []
    for _ in range(150):
        out = pretrain_loss(model, batch)
        losses.append(out.loss.item())
        if losses[-1] < losses[0] / 5:
            break
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert losses[-1] < losses[0] / 5, (len(losses), losses[0], losses[-1])
