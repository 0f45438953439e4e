"""ScFoundation model: shapes, padding invariance, masks, pooling, gradients, input errors."""

from __future__ import annotations

import pytest
import torch

from msfm.errors import MsfmInputError
from msfm.models.scfoundation.config import ScFoundationConfig
from msfm.models.scfoundation.model import ScFoundation, ScFoundationOutput
from msfm.registry import preset_config

G = 19264
T_ID, S_ID, PAD_ID = G, G + 1, G + 2


@pytest.fixture(scope="module")
def model() -> ScFoundation:
    torch.manual_seed(0)
    return ScFoundation(preset_config("scfoundation-tiny")).eval()


def _cells(lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Synthetic tokenized cells: `length` non-zero genes (ascending ids) + T + S, padded."""
    gen = torch.Generator().manual_seed(seed)
    b, n = len(lengths), max(lengths) + 2
    values = torch.zeros(b, n)
    gene_ids = torch.full((b, n), PAD_ID, dtype=torch.long)
    full_values = torch.zeros(b, G + 2)
    for i, length in enumerate(lengths):
        genes = torch.randperm(G, generator=gen)[:length].sort().values
        expr = torch.rand(length, generator=gen) * 5 + 0.1
        depth = torch.tensor([4.0, 2.0 + torch.rand(1, generator=gen).item()])
        values[i, : length + 2] = torch.cat([expr, depth])
        gene_ids[i, : length + 2] = torch.cat([genes, torch.tensor([T_ID, S_ID])])
        full_values[i, genes] = expr
        full_values[i, G:] = depth
    return {
        "values": values,
        "gene_ids": gene_ids,
        "padding_mask": gene_ids == PAD_ID,
        "full_values": full_values,
    }


def _row(batch: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Cell i alone, without padding."""
    keep = ~batch["padding_mask"][i]
    out = {k: batch[k][i : i + 1, keep] for k in ("values", "gene_ids", "padding_mask")}
    out["full_values"] = batch["full_values"][i : i + 1]
    return out


def test_config_derived_ids() -> None:
    config = ScFoundationConfig()
    assert (config.t_id, config.s_id, config.pad_id, config.seq_len, config.gene_vocab_size) == (
        19264,
        19265,
        19266,
        19266,
        19267,
    )
    assert config.nb_features == 266
    assert ScFoundationConfig(**config.model_dump()) == config


def test_config_validation_names_field_and_value() -> None:
    with pytest.raises(ValueError, match=r"encoder_num_heads \* encoder_head_dim.*12 \* 64 != 100"):
        ScFoundationConfig(encoder_dim=100)
    with pytest.raises(ValueError, match="encoder_depth"):
        ScFoundationConfig(encoder_depth=-1)
    with pytest.raises(ValueError, match="decoder_key_max"):
        ScFoundationConfig(decoder_key_max="row")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mask_value and pad_value"):
        ScFoundationConfig(mask_value=5.0, pad_value=5.0)


def test_shapes(model: ScFoundation) -> None:
    batch = _cells([5, 12, 1])
    with torch.no_grad():
        out = model(batch)
        decoded = model.decode(out.hidden, batch["gene_ids"], batch["padding_mask"], batch["full_values"])
        pooled_all = model.pool_cell_embedding(out.hidden, batch["gene_ids"], batch["padding_mask"], "all")
        pooled_max = model.pool_cell_embedding(out.hidden, batch["gene_ids"], batch["padding_mask"], "max")
    assert isinstance(out, ScFoundationOutput)
    assert out.hidden.shape == (3, 14, 64)
    assert out.expression is not None
    assert out.expression.shape == (3, G + 2)
    assert decoded.shape == (3, G + 2, 32)
    assert pooled_all.shape == (3, 256)
    assert pooled_max.shape == (3, 64)
    for tensor in (out.hidden, out.expression, decoded, pooled_all, pooled_max):
        assert torch.isfinite(tensor).all()
    encoder_only = model({k: batch[k] for k in ("values", "gene_ids", "padding_mask")})
    assert encoder_only.expression is None


def test_batched_equals_one_by_one(model: ScFoundation) -> None:
    batch = _cells([3, 17, 8, 1])
    with torch.no_grad():
        hidden = model.encode(batch["values"], batch["gene_ids"], batch["padding_mask"])
        pooled = {
            m: model.pool_cell_embedding(hidden, batch["gene_ids"], batch["padding_mask"], m)
            for m in ("all", "max")
        }
        decoded = model.decode(hidden, batch["gene_ids"], batch["padding_mask"], batch["full_values"])
        for i in range(4):
            cell = _row(batch, i)
            h = model.encode(cell["values"], cell["gene_ids"], cell["padding_mask"])
            n = h.shape[1]
            torch.testing.assert_close(hidden[i, :n], h[0], atol=1e-5, rtol=1e-5)
            for mode in ("all", "max"):
                single = model.pool_cell_embedding(h, cell["gene_ids"], cell["padding_mask"], mode)
                torch.testing.assert_close(pooled[mode][i], single[0], atol=1e-5, rtol=1e-5)
            single_decoded = model.decode(h, cell["gene_ids"], cell["padding_mask"], cell["full_values"])
            torch.testing.assert_close(decoded[i], single_decoded[0], atol=1e-5, rtol=1e-5)


def test_chunked_decode_equals_full_batch(model: ScFoundation) -> None:
    batch = _cells([3, 9, 4])
    args = (batch["gene_ids"], batch["padding_mask"], batch["full_values"])
    with torch.no_grad():
        hidden = model.encode(batch["values"], batch["gene_ids"], batch["padding_mask"])
        whole = model.decode(hidden, *args)
        chunked = model.decode(hidden, *args, chunk_size=2)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)
    with pytest.raises(MsfmInputError, match="chunk_size"):
        model.decode(hidden, *args, chunk_size=0)


def test_padding_does_not_leak(model: ScFoundation) -> None:
    batch = _cells([2, 10])
    pad = batch["padding_mask"]
    with torch.no_grad():
        hidden = model.encode(batch["values"], batch["gene_ids"], pad)
        # Padding values/ids are ignored by the encoder...
        noisy = batch["values"].masked_fill(pad, 50.0)
        noisy_ids = batch["gene_ids"].masked_fill(pad, 7)
        hidden_noisy = model.encode(noisy, noisy_ids, pad)
        torch.testing.assert_close(hidden_noisy[~pad], hidden[~pad])
        # ...and garbage in padded rows never reaches pooling or the decoder.
        garbage = hidden.masked_fill(pad.unsqueeze(-1), 1e4)
        for mode in ("all", "max"):
            torch.testing.assert_close(
                model.pool_cell_embedding(garbage, batch["gene_ids"], pad, mode),
                model.pool_cell_embedding(hidden, batch["gene_ids"], pad, mode),
            )
        torch.testing.assert_close(
            model.decode(garbage, noisy_ids, pad, batch["full_values"]),
            model.decode(hidden, batch["gene_ids"], pad, batch["full_values"]),
        )


def test_pooling_finds_depth_tokens_by_id(model: ScFoundation) -> None:
    cell = _row(_cells([9]), 0)
    order = torch.tensor([10, 3, 0, 8, 1, 9, 2, 7, 4, 5, 6])  # S first, T in the middle, genes shuffled
    shuffled = {k: cell[k][:, order] for k in ("values", "gene_ids", "padding_mask")}
    with torch.no_grad():
        hidden = model.encode(cell["values"], cell["gene_ids"], cell["padding_mask"])
        hidden_shuffled = model.encode(shuffled["values"], shuffled["gene_ids"], shuffled["padding_mask"])
        for mode in ("all", "max"):
            torch.testing.assert_close(
                model.pool_cell_embedding(
                    hidden_shuffled, shuffled["gene_ids"], shuffled["padding_mask"], mode
                ),
                model.pool_cell_embedding(hidden, cell["gene_ids"], cell["padding_mask"], mode),
                atol=1e-5,
                rtol=1e-5,
            )
        pooled = model.pool_cell_embedding(hidden, cell["gene_ids"], cell["padding_mask"], "all")
    # Layout: S, T, max over genes, mean over genes (T and S excluded from max/mean).
    torch.testing.assert_close(pooled[0, :64], hidden[0, 10])
    torch.testing.assert_close(pooled[0, 64:128], hidden[0, 9])
    torch.testing.assert_close(pooled[0, 128:192], hidden[0, :9].amax(0))
    torch.testing.assert_close(pooled[0, 192:], hidden[0, :9].mean(0))


def test_pooling_errors(model: ScFoundation) -> None:
    cell = _row(_cells([4]), 0)
    hidden = torch.randn(1, 6, 64)
    no_t = cell["gene_ids"].clone()
    no_t[0, 4] = 5
    with pytest.raises(MsfmInputError, match="T token"):
        model.pool_cell_embedding(hidden, no_t, cell["padding_mask"], "all")
    assert model.pool_cell_embedding(hidden, no_t, cell["padding_mask"], "max").shape == (1, 64)
    with pytest.raises(MsfmInputError, match="mode"):
        model.pool_cell_embedding(hidden, cell["gene_ids"], cell["padding_mask"], "mean")  # type: ignore[arg-type]


def test_explicit_masks_equal_sentinel_path(model: ScFoundation) -> None:
    batch = _cells([6, 3])
    full_mask = torch.zeros(2, G + 2, dtype=torch.bool)
    full_mask[0, [5, 100, 2000]] = True
    full_mask[1, [7, 19000]] = True
    sentinel_values = batch["full_values"].masked_fill(full_mask, 102.0)
    other_values = batch["full_values"].masked_fill(full_mask, 3.3)  # anything: the mask decides
    with torch.no_grad():
        hidden = model.encode(batch["values"], batch["gene_ids"], batch["padding_mask"])
        args = (hidden, batch["gene_ids"], batch["padding_mask"])
        by_sentinel = model.decode(*args, sentinel_values)
        by_mask = model.decode(*args, other_values, full_mask)
        torch.testing.assert_close(by_mask, by_sentinel)
        # On the explicit path a real value of 102 is just a value.
        plain = model.decode(*args, sentinel_values, torch.zeros_like(full_mask))
        assert not torch.allclose(plain, by_sentinel)
        # Encoder tokens: value_mask against the sentinel rule.
        value_mask = torch.zeros_like(batch["padding_mask"])
        value_mask[0, 1] = True
        enc_sentinel = model.encode(
            batch["values"].masked_fill(value_mask, 102.0), batch["gene_ids"], batch["padding_mask"]
        )
        enc_mask = model.encode(
            batch["values"], batch["gene_ids"], batch["padding_mask"], value_mask=value_mask
        )
        torch.testing.assert_close(enc_mask, enc_sentinel)


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = ScFoundation(preset_config("scfoundation-tiny")).train()
    batch = _cells([4, 9])
    batch["full_mask"] = torch.zeros(2, G + 2, dtype=torch.bool)
    batch["full_mask"][:, :3] = True
    out = model(batch)
    real = ~batch["padding_mask"]
    pooled = model.pool_cell_embedding(out.hidden, batch["gene_ids"], batch["padding_mask"])
    loss = out.expression.square().mean() + out.hidden[real].square().mean() + pooled.square().mean()
    loss.backward()
    # emb_pad is only used at padded tokens, whose outputs never reach a loss by design.
    unused = {"value_embedding.emb_pad.weight"}
    missing = [
        name
        for name, p in model.named_parameters()
        if name not in unused
        and (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)
    ]
    assert not missing, missing


def test_projection_not_redrawn_in_training() -> None:
    torch.manual_seed(0)
    model = ScFoundation(preset_config("scfoundation-tiny")).train()
    before = model.decoder.layers[0].attn.fast_attention.projection_matrix.clone()
    batch = _cells([3])
    for _ in range(3):
        model(batch)
    torch.testing.assert_close(model.decoder.layers[0].attn.fast_attention.projection_matrix, before)


def test_input_errors(model: ScFoundation) -> None:
    batch = _cells([3])
    with pytest.raises(MsfmInputError, match="missing"):
        model({"values": batch["values"]})
    with pytest.raises(MsfmInputError, match="one \\[b, n\\] shape"):
        model.encode(batch["values"], batch["gene_ids"][:, :-1], batch["padding_mask"])
    hidden = torch.zeros(1, 5, 64)
    with pytest.raises(MsfmInputError, match="full_values must be"):
        model.decode(hidden, batch["gene_ids"], batch["padding_mask"], batch["full_values"][:, :G])
    with pytest.raises(MsfmInputError, match="hidden must be"):
        model.decode(hidden[:, :3], batch["gene_ids"], batch["padding_mask"], batch["full_values"])


def test_global_key_max_stays_close_to_per_cell() -> None:
    torch.manual_seed(0)
    model = ScFoundation(preset_config("scfoundation-tiny", decoder_key_max="global")).eval()
    batch = _cells([3, 30])
    batch["full_values"][1] *= 3.0
    with torch.no_grad():
        hidden = model.encode(batch["values"], batch["gene_ids"], batch["padding_mask"])
        together = model.decode(hidden, batch["gene_ids"], batch["padding_mask"], batch["full_values"])
        cell = _row(batch, 0)
        alone = model.decode(hidden[:1, :5], cell["gene_ids"], cell["padding_mask"], cell["full_values"])
    torch.testing.assert_close(together[0], alone[0], atol=1e-2, rtol=1e-2)
