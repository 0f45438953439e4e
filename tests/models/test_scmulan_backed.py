"""scMulan verbs on a backed AnnData (``anndata.read_h5ad(path, backed="r")``): the results equal those of the
same cells in memory, and the file the cells are read from is left byte-for-byte unchanged."""

from __future__ import annotations

import hashlib
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import msfm

sm = msfm.scmulan
FIX = Path(__file__).parents[1] / "fixtures" / "scmulan"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return sm.convert(FIX / "tiny_official.pt", tmp_path_factory.mktemp("scmulan") / "ckpt")


@pytest.fixture(scope="module")
def cells_file(tmp_path_factory) -> Path:
    """40 real PBMCs with raw counts (193 of the official vocabulary's genes occur in them)."""
    path = tmp_path_factory.mktemp("cells") / "cells.h5ad"
    msfm.datasets.pbmc68k()[:40].copy().write_h5ad(path)
    return path


def _digest(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def _assert_same_results(backed: ad.AnnData, memory: ad.AnnData) -> None:
    new_obs = [c for c in memory.obs.columns if c.startswith("scmulan")]
    assert new_obs  # the verb added something
    pd.testing.assert_frame_equal(backed.obs[new_obs], memory.obs[new_obs])
    np.testing.assert_allclose(backed.obsm["X_scmulan"], memory.obsm["X_scmulan"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("embedding", ["official", "mean"])
def test_predict_on_backed_cells_equals_in_memory_and_leaves_the_file(ckpt, cells_file, embedding):
    before = _digest(cells_file)
    memory = sm.predict(
        ad.read_h5ad(cells_file), ckpt, embedding=embedding, min_confidence=0.0, device="cpu", progress=False
    )
    backed = ad.read_h5ad(cells_file, backed="r")
    out = sm.predict(backed, ckpt, embedding=embedding, min_confidence=0.0, device="cpu", progress=False)
    assert out is backed  # annotated in place, like an in-memory AnnData
    assert backed.isbacked
    assert backed.file.is_open
    _assert_same_results(backed, memory)
    assert memory.obs["scmulan_cell_type"].nunique() > 1  # a real comparison, not all-Unclassified
    backed.file.close()
    assert _digest(cells_file) == before
    assert sorted(p.name for p in cells_file.parent.iterdir()) == ["cells.h5ad"]  # no debris next to it


def test_embed_on_backed_cells_equals_in_memory_and_leaves_the_file(ckpt, cells_file):
    before = _digest(cells_file)
    memory = sm.embed(ad.read_h5ad(cells_file), ckpt, embedding="task", device="cpu", progress=False)
    backed = ad.read_h5ad(cells_file, backed="r")
    sm.embed(backed, ckpt, embedding="task", device="cpu", progress=False)
    np.testing.assert_allclose(backed.obsm["X_scmulan"], memory.obsm["X_scmulan"], atol=1e-5, rtol=1e-5)
    assert np.abs(memory.obsm["X_scmulan"]).sum() > 0
    assert backed.uns["scmulan"]["embed"]["params"] == memory.uns["scmulan"]["embed"]["params"]
    backed.file.close()
    assert _digest(cells_file) == before


def test_out_from_backed_cells_writes_a_complete_new_file(ckpt, cells_file, tmp_path):
    before = _digest(cells_file)
    out = tmp_path / "annotated.h5ad"
    backed = ad.read_h5ad(cells_file, backed="r")
    sm.predict(backed, ckpt, min_confidence=0.0, device="cpu", progress=False, out=out)
    backed.file.close()
    assert _digest(cells_file) == before
    written, original = ad.read_h5ad(out), ad.read_h5ad(cells_file)
    assert not written.isbacked
    assert (written.X != original.X).nnz == 0  # the counts came along from the backed file
    memory = sm.predict(original, ckpt, min_confidence=0.0, device="cpu", progress=False)
    _assert_same_results(written, memory)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["annotated.h5ad"]


def test_copy_of_backed_cells_is_an_in_memory_result(ckpt, cells_file):
    backed = ad.read_h5ad(cells_file, backed="r")
    out = sm.embed(backed, ckpt, embedding="task", device="cpu", progress=False, copy=True)
    assert out is not backed
    assert not out.isbacked
    assert "X_scmulan" in out.obsm
    assert "X_scmulan" not in backed.obsm
