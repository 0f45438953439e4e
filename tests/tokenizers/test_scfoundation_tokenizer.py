"""scFoundation tokenizer against the official fixture (bit-exact inputs) plus edge cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from safetensors import safe_open
from safetensors.numpy import load_file

from msfm.data import GenePanel, harmonize_genes
from msfm.errors import MsfmInputError
from msfm.tokenizers import ScFoundationTokenizer, TargetDepth, depth_tokens, normalize_rows

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "scfoundation" / "tiny_official_io.safetensors"
G = 19264
QUIET = {"min_panel_fraction": 0.0, "warn_panel_fraction": 0.0}


@pytest.fixture(scope="module")
def official() -> tuple[dict[str, np.ndarray], list[str]]:
    with safe_open(FIXTURE, "np") as fh:
        symbols = json.loads(fh.metadata()["source_gene_symbols"])
    return load_file(FIXTURE), symbols


@pytest.fixture(scope="module")
def panel_counts(official) -> sp.csr_matrix:
    tensors, symbols = official
    mapping = harmonize_genes(symbols, GenePanel.scfoundation(), use_aliases=False, **QUIET)
    return mapping.apply(sp.csr_matrix(tensors["source_counts"]))


def test_mapping_reproduces_official_raw_counts(official, panel_counts):
    tensors, _ = official
    np.testing.assert_array_equal(panel_counts.toarray(), tensors["raw_counts"])


def test_aliases_map_more_genes_than_official(official):
    tensors, symbols = official
    mapping = harmonize_genes(symbols, GenePanel.scfoundation(), **QUIET)
    assert mapping.report["matched_by_method"]["alias"] > 0
    assert mapping.n_mapped > 691
    counts = mapping.apply(sp.csr_matrix(tensors["source_counts"]))
    assert counts.sum() > tensors["raw_counts"].sum()


@pytest.mark.parametrize("spec", ["t4", "a5", "f1"])
def test_inputs_bit_exact(official, panel_counts, spec):
    tensors, _ = official
    tok = ScFoundationTokenizer()
    enc = tok.encode(panel_counts, spec)
    np.testing.assert_array_equal(enc.S, tensors["depth.S"])
    np.testing.assert_array_equal(enc.T, tensors[f"depth.T.{spec}"])
    full = tok.full_values(enc, np.arange(6))
    assert full.shape == (6, G + 2)
    assert full.dtype == torch.float32
    np.testing.assert_array_equal(full.numpy(), tensors[f"input.{spec}"])
    assert enc.lengths.tolist() == [170, 9, 200, 284, 244, 373]
    assert not enc.zero_count.any()


def test_collate_layout(panel_counts, official):
    tensors, _ = official
    tok = ScFoundationTokenizer()
    enc = tok.encode(panel_counts, "t4")
    batch = tok.collate(enc, [1, 0], full=True)
    assert batch["values"].shape == batch["gene_ids"].shape == batch["padding_mask"].shape == (2, 170)
    assert batch["values"].dtype == torch.float32
    assert batch["gene_ids"].dtype == torch.int64
    assert batch["padding_mask"].dtype == torch.bool
    ids, mask, values = batch["gene_ids"][0], batch["padding_mask"][0], batch["values"][0]
    assert mask.sum() == 170 - 9
    assert not batch["padding_mask"][1].any()
    assert ids[7].item() == G
    assert ids[8].item() == G + 1
    assert (ids[9:] == G + 2).all()
    assert (values[9:] == 0).all()
    assert torch.all(ids[:7][1:] > ids[:7][:-1])  # genes in ascending id
    expected = tensors["input.t4"][1]
    np.testing.assert_array_equal(values[:9].numpy(), expected[expected > 0])
    np.testing.assert_array_equal(batch["full_values"][0].numpy(), expected)


def test_target_depth_parse():
    assert TargetDepth.parse("t4") == TargetDepth("t", 4.0)
    assert TargetDepth.parse("A5") == TargetDepth("a", 5.0)
    assert TargetDepth.parse("t4.5").value == 4.5
    assert str(TargetDepth.parse("f1")) == "f1"
    for bad in ("x4", "t", "4", "f0", "t-1", ""):
        with pytest.raises(MsfmInputError, match=r"Accepted forms: 't<N>'.*'a<Y>'.*'f<X>'"):
            TargetDepth.parse(bad)


def test_zero_count_cells_and_normalize():
    x = sp.csr_matrix(np.array([[0, 0, 0, 0], [1, 0, 3, 0], [0, 0, 0, 0]], dtype=np.float32))
    norm = normalize_rows(x)
    assert norm.dtype == np.float32
    assert norm[0].nnz == 0
    np.testing.assert_array_equal(norm[1].data, np.log1p(np.array([1, 3]) / 4 * 1e4).astype(np.float32))
    t, s = depth_tokens(np.array([0.0, 4.0]), "a5")
    assert s.tolist() == [0.0, np.log10(4.0)]
    assert t.tolist() == [5.0, np.log10(4.0) + 5]
    tok = ScFoundationTokenizer(num_genes=4)
    enc = tok.encode(x, "f1")
    assert enc.zero_count.tolist() == [True, False, True]
    assert enc.lengths.tolist() == [2, 4, 2]
    batch = tok.collate(enc, [0, 1])
    assert batch["gene_ids"][0].tolist() == [4, 5, 6, 6]
    assert batch["values"][0, :2].tolist() == [0.0, 0.0]


def test_encode_does_not_touch_input():
    x = sp.csr_matrix((np.array([2.0, 1.0, 1.0]), np.array([2, 0, 2]), np.array([0, 3])), shape=(1, 3))
    before = (x.data.copy(), x.indices.copy())
    enc = ScFoundationTokenizer(num_genes=3).encode(x, "t4")
    assert enc.gene_ids.tolist() == [0, 2, 3, 4]  # duplicates summed, ascending ids
    np.testing.assert_array_equal(x.data, before[0])
    np.testing.assert_array_equal(x.indices, before[1])


def test_pre_normalized_uses_sum_of_values():
    x = sp.csr_matrix(np.array([[0.5, 1.5, 0.0]], dtype=np.float32))
    tok = ScFoundationTokenizer(num_genes=3)
    with pytest.warns(UserWarning, match="not a read depth"):
        enc = tok.encode(x, "t4", pre_normalized=True)
    assert enc.S[0] == np.log10(2.0)
    np.testing.assert_array_equal(enc.values[:2], [0.5, 1.5])


def test_encode_errors():
    tok = ScFoundationTokenizer()
    with pytest.raises(MsfmInputError, match=r"19264 columns.*harmonize_genes"):
        tok.encode(sp.csr_matrix((2, 10)), "t4")
    small = ScFoundationTokenizer(num_genes=2)
    with pytest.raises(MsfmInputError, match="negative or non-finite"):
        small.encode(sp.csr_matrix(np.array([[-1.0, 2.0]])), "t4")
    enc = small.encode(sp.csr_matrix(np.array([[1.0, 2.0]])), "t4")
    with pytest.raises(MsfmInputError, match=r"\[0, 1\)"):
        small.collate(enc, [1])
