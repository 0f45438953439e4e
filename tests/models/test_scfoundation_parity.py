"""Parity with the official scFoundation code, using the recorded fixtures.

`tests/fixtures/scfoundation/` holds a tiny official checkpoint (variants gene/cell/rde) and the outputs
of the unmodified official `get_embedding.py` on 6 cells (see the README there). Every output is
reproduced one cell at a time (as upstream runs) and with all 6 cells in one padded batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from msfm.errors import CheckpointError, MsfmInputError
from msfm.models.scfoundation.model import ScFoundation
from msfm.models.scfoundation.official import (
    config_from_official,
    convert_official_state_dict,
    load_official_checkpoint,
)
from msfm.registry import create_model, preset_config

FIXTURES = Path(__file__).parents[1] / "fixtures" / "scfoundation"
CKPT = FIXTURES / "tiny_official.ckpt"
ATOL = RTOL = 1e-4
NUM_CELLS = 6


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "tiny_official_io.safetensors")


def _model(variant: str) -> ScFoundation:
    config, state_dict = load_official_checkpoint(CKPT, variant)  # type: ignore[arg-type]
    model = ScFoundation(config).eval()
    model.load_state_dict(state_dict, strict=True)
    return model


@pytest.fixture(scope="module")
def cell_model() -> ScFoundation:
    return _model("cell")


@pytest.fixture(scope="module")
def gene_model() -> ScFoundation:
    return _model("gene")


def _tokens(full: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encoder batch from official input vectors: positions with value > 0 (incl. T and S), padded."""
    positions = [torch.nonzero(row > 0).flatten() for row in full]
    n = max(len(p) for p in positions)
    values = torch.zeros(len(full), n)
    gene_ids = torch.full((len(full), n), pad_id, dtype=torch.long)
    for i, pos in enumerate(positions):
        values[i, : len(pos)] = full[i, pos]
        gene_ids[i, : len(pos)] = pos
    return values, gene_ids, gene_ids == pad_id


def _single_and_batched(full: torch.Tensor, pad_id: int):
    """Yield (cell indices, encoder inputs): each cell alone, then all cells in one padded batch."""
    for i in range(len(full)):
        yield [i], _tokens(full[i : i + 1], pad_id)
    yield list(range(len(full))), _tokens(full, pad_id)


def test_fixture_lengths_are_mixed(io: dict[str, torch.Tensor]) -> None:
    lengths = (io["input.t4"] > 0).sum(dim=1).tolist()
    assert lengths == [170, 9, 200, 284, 244, 373]


@pytest.mark.parametrize("depth", ["t4", "a5", "f1"])
def test_cell_embedding_all(cell_model: ScFoundation, io: dict[str, torch.Tensor], depth: str) -> None:
    full = io[f"input.{depth}"]
    expected = io[f"cell_emb.all.{depth}"]
    for cells, (values, gene_ids, pad) in _single_and_batched(full, cell_model.config.pad_id):
        with torch.no_grad():
            hidden = cell_model.encode(values, gene_ids, pad)
            got = cell_model.pool_cell_embedding(hidden, gene_ids, pad, "all")
        torch.testing.assert_close(got, expected[cells], atol=ATOL, rtol=RTOL)


def test_cell_embedding_max(cell_model: ScFoundation, io: dict[str, torch.Tensor]) -> None:
    for cells, (values, gene_ids, pad) in _single_and_batched(io["input.t4"], cell_model.config.pad_id):
        with torch.no_grad():
            hidden = cell_model.encode(values, gene_ids, pad)
            got = cell_model.pool_cell_embedding(hidden, gene_ids, pad, "max")
        torch.testing.assert_close(got, io["cell_emb.max.t4"][cells], atol=ATOL, rtol=RTOL)


def test_encoder_output(cell_model: ScFoundation, io: dict[str, torch.Tensor]) -> None:
    values, gene_ids, pad = _tokens(io["input.t4"], cell_model.config.pad_id)
    with torch.no_grad():
        hidden = cell_model.encode(values, gene_ids, pad)
    for cell in (0, 1):
        expected = io[f"debug.encoder_out.t4.cell{cell}"]
        torch.testing.assert_close(hidden[cell, : len(expected)], expected, atol=ATOL, rtol=RTOL)


def test_gene_context_embeddings(gene_model: ScFoundation, io: dict[str, torch.Tensor]) -> None:
    full = io["input.t4"][:2]
    expected = io["gene_emb.t4"]
    for cells, (values, gene_ids, pad) in _single_and_batched(full, gene_model.config.pad_id):
        with torch.no_grad():
            hidden = gene_model.encode(values, gene_ids, pad)
            decoded = gene_model.decode(hidden, gene_ids, pad, full[cells])
        torch.testing.assert_close(decoded[:, :19264], expected[cells], atol=ATOL, rtol=RTOL)


def test_gene_expression(gene_model: ScFoundation, io: dict[str, torch.Tensor]) -> None:
    full = io["input.t4"]
    expected = io["gene_expression.t4"]
    for cells, (values, gene_ids, pad) in _single_and_batched(full, gene_model.config.pad_id):
        with torch.no_grad():
            out = gene_model(
                {"values": values, "gene_ids": gene_ids, "padding_mask": pad, "full_values": full[cells]}
            )
        assert out.expression is not None
        torch.testing.assert_close(out.expression[:, :19264], expected[cells], atol=ATOL, rtol=RTOL)


def test_cell_variant_does_not_reproduce_gene_expression(
    cell_model: ScFoundation, io: dict[str, torch.Tensor]
) -> None:
    """The thresholds separate real mistakes: the wrong variant is far off."""
    values, gene_ids, pad = _tokens(io["input.t4"][:1], cell_model.config.pad_id)
    with torch.no_grad():
        out = cell_model(
            {"values": values, "gene_ids": gene_ids, "padding_mask": pad, "full_values": io["input.t4"][:1]}
        )
    assert (out.expression[0, :19264] - io["gene_expression.t4"][0]).abs().max() > 1.0


def test_variants_differ_only_in_head() -> None:
    _, cell = load_official_checkpoint(CKPT, "cell")
    _, rde = load_official_checkpoint(CKPT, "rde")
    _, gene = load_official_checkpoint(CKPT, "gene")
    torch.testing.assert_close(rde["head.weight"], 2 * cell["head.weight"])
    torch.testing.assert_close(gene["head.weight"], 3 * cell["head.weight"])
    for key in cell:
        if key != "head.weight":
            torch.testing.assert_close(rde[key], cell[key])
    # Tensors are cloned: the variants alias each other in the file, our dicts must not.
    cell["value_embedding.emb.weight"].add_(1.0)
    assert not torch.equal(cell["value_embedding.emb.weight"], rde["value_embedding.emb.weight"])


def test_config_read_from_checkpoint() -> None:
    config, state_dict = load_official_checkpoint(CKPT, "cell")
    assert config == preset_config("scfoundation-fixture")
    assert (config.t_id, config.s_id, config.pad_id, config.seq_len) == (19264, 19265, 19266, 19266)
    assert len(state_dict) == 76  # 77 official tensors minus the redraw counter
    assert state_dict["decoder.layers.0.attn.fast_attention.projection_matrix"].shape == (16, 8)


def test_config_tolerates_unused_keys_of_any_type() -> None:
    raw = torch.load(CKPT, map_location="cpu", weights_only=True)["cell"]["config"]
    raw = json.loads(json.dumps(raw))
    raw["dataset_config"]["rnaseq"].update(
        test_valid_train_idx_dict="/cluster/path.pkl",
        valid_data_path="/x",
        train_data_path=None,
        extra=[1, {"a": 2}],
    )
    raw["model_config"]["mae_autobin"]["cell_token_id"] = 101
    assert config_from_official(raw) == preset_config("scfoundation-fixture", decoder_nb_features=None)
    assert config_from_official(raw["model_config"]["mae_autobin"], nb_features=16).nb_features == 16


def test_config_errors() -> None:
    raw = torch.load(CKPT, map_location="cpu", weights_only=True)["cell"]["config"]
    bad = json.loads(json.dumps(raw))
    del bad["model_config"]["mae_autobin"]["encoder"]["depth"]
    with pytest.raises(CheckpointError, match="depth"):
        config_from_official(bad)
    bad = json.loads(json.dumps(raw))
    bad["model_config"]["mae_autobin"]["decoder"]["module_type"] = "transformer"
    with pytest.raises(CheckpointError, match="performer"):
        config_from_official(bad)


def _write(tmp_path: Path, obj: object, name: str = "ckpt.pt") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_variant_errors(tmp_path: Path) -> None:
    with pytest.raises(MsfmInputError, match=r"\['cell', 'rde', 'gene'\]"):
        load_official_checkpoint(CKPT, "ce")  # type: ignore[arg-type]
    raw = torch.load(CKPT, map_location="cpu", weights_only=True)
    only_cell = _write(tmp_path, {"cell": raw["cell"]})
    with pytest.raises(CheckpointError, match=r"no variant 'gene'.*\['cell'\]"):
        load_official_checkpoint(only_cell, "gene")
    single = _write(tmp_path, raw["rde"], "single.pt")
    _, state_dict = load_official_checkpoint(single, None)
    assert "head.weight" in state_dict
    with pytest.raises(CheckpointError, match="does not exist"):
        load_official_checkpoint(tmp_path / "missing.ckpt", "cell")


def test_refuses_pickled_code(tmp_path: Path) -> None:
    path = _write(tmp_path, {"cell": {"config": {}, "state_dict": {}, "obj": Path("x")}})
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_official_checkpoint(path, "cell")


def test_layout_errors_name_the_keys() -> None:
    raw = torch.load(CKPT, map_location="cpu", weights_only=True)["cell"]
    config = config_from_official(raw["config"], nb_features=16)
    state = dict(raw["state_dict"])
    state.pop("model.encoder.norm.bias")
    state["model.extra.weight"] = torch.zeros(1)
    state["model.pos_emb.weight"] = torch.zeros(19267, 31)
    with pytest.raises(CheckpointError) as info:
        convert_official_state_dict(state, config)
    text = str(info.value)
    assert "extra.weight" in text
    assert "encoder.norm.bias" in text
    assert "gene_embedding.weight: found [19267, 31], expected [19267, 32]" in text


def test_full_100m_layout_loads_strictly() -> None:
    layout = json.loads((FIXTURES / "official_100m_layout.json").read_text())
    assert len(layout["shapes"]) == 265
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in layout["shapes"].items():
        if key in layout["non_float32_tensors"]:
            state[key] = torch.zeros(shape, dtype=torch.int64)
        else:  # uniform fill: random values at a fraction of randn's cost for 119M elements
            state[key] = torch.rand(shape, generator=generator)
    config = config_from_official(
        {"model_config": {"mae_autobin": layout["config_model_config_mae_autobin"]}}
    )
    assert config == preset_config("scfoundation-100m")
    converted = convert_official_state_dict(state, config)
    # Meta model + assign: strict key and shape checks without initialising 119M weights first.
    with torch.device("meta"):
        model = create_model("scfoundation-100m")
    model.load_state_dict(converted, strict=True, assign=True)
    assert sum(p.numel() for p in model.parameters()) == layout["num_parameters"] == 119_252_285
    # Our state dict lacks only the official int64 redraw counter (one element).
    ours = sum(t.numel() for t in model.state_dict().values())
    assert ours == layout["num_state_dict_elements"] - 1
    assert not any(t.is_meta for t in model.state_dict().values())
    torch.testing.assert_close(model.gene_embedding.weight, state["model.pos_emb.weight"])
    torch.testing.assert_close(model.decoder_norm.weight, state["model.norm.weight"])
    torch.testing.assert_close(
        model.encoder.layers[11].self_attn.in_proj_weight,
        state["model.encoder.transformer_encoder.11.self_attn.in_proj_weight"],
    )
