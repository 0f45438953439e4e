"""bf16 against fp32 on the official fixtures: the agreement that backs ``precision="auto"`` choosing bf16.

bf16 is forced (``precision="bf16"``), so these run the same on every CPU; on an AVX2-only CPU bf16 is slow but
still exact enough to compare. Bars (issue 14): embeddings cosine >= 0.999 per cell, labels identical.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from safetensors.torch import load_file

import msfm
from msfm.runtime import precision as P
from msfm.runtime.devices import autocast_context
from sf_official import official_cells

FIXTURES = Path(__file__).parents[1] / "fixtures"
COSINE_BAR = 0.999
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# ------------------------------------------------------------------------------------------------ scFoundation
@pytest.fixture(scope="module")
def sf_ckpt(tmp_path_factory) -> Path:
    return msfm.scfoundation.convert(
        FIXTURES / "scfoundation" / "tiny_official.ckpt",
        tmp_path_factory.mktemp("sf") / "cell",
        variant="cell",
    )


def _sf_embed(ckpt: Path, precision: str) -> ad.AnnData:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return msfm.scfoundation.embed(
            official_cells(), ckpt, precision=precision, device="cpu", progress=False, use_aliases=False
        )


def test_scfoundation_cell_embeddings_bf16_vs_fp32(sf_ckpt) -> None:
    fp32 = _sf_embed(sf_ckpt, "32")
    bf16 = _sf_embed(sf_ckpt, "bf16")
    cos = _cosine(fp32.obsm["X_scfoundation"], bf16.obsm["X_scfoundation"])
    # measured on the fixture's 6 cells: min 0.99999 (AVX2 EPYC, torch 2.13)
    assert cos.min() >= COSINE_BAR, cos
    assert not np.array_equal(fp32.obsm["X_scfoundation"], bf16.obsm["X_scfoundation"])  # bf16 really ran
    assert bf16.uns["scfoundation"]["embed"]["precision"] == {
        "requested": "bf16",
        "chosen": "bf16",
        "reason": "precision='bf16' requested explicitly",
    }


def test_scfoundation_auto_records_the_choice(sf_ckpt, monkeypatch, tmp_path) -> None:
    """auto on an AVX2-only CPU runs fp32 (and says why); on a bf16 CPU whose benchmark agrees it runs bf16."""
    monkeypatch.delenv(P.ENV_OVERRIDE, raising=False)
    monkeypatch.setenv(P.ENV_CACHE_DIR, str(tmp_path))
    avx2 = P.CpuCapability("Test EPYC", "AVX2", frozenset({"avx2"}), bf16_hardware=False, cores=2)
    amx = P.CpuCapability(
        "Test Xeon", "AVX512", frozenset({"avx512f", "amx_bf16", "amx_tile"}), True, cores=2
    )
    monkeypatch.setattr(
        P, "matmul_rate", lambda device, dtype, **_: 900.0 if dtype == torch.bfloat16 else 100.0
    )
    try:
        P._reset_for_tests()
        monkeypatch.setattr(P, "cpu_capability", lambda: avx2)
        auto = _sf_embed(sf_ckpt, "auto")
        rec = auto.uns["scfoundation"]["embed"]["precision"]
        assert rec["requested"] == "auto"
        assert rec["chosen"] == "32"
        assert "no bf16 hardware" in rec["reason"]
        assert "AVX2" in rec["reason"]
        assert auto.uns["scfoundation"]["embed"]["params"]["precision"] == "auto"

        P._reset_for_tests()
        monkeypatch.setattr(P, "cpu_capability", lambda: amx)
        auto = _sf_embed(sf_ckpt, "auto")
        assert auto.uns["scfoundation"]["embed"]["precision"]["chosen"] == "bf16"
        np.testing.assert_array_equal(
            auto.obsm["X_scfoundation"], _sf_embed(sf_ckpt, "bf16").obsm["X_scfoundation"]
        )
    finally:
        P._reset_for_tests()


# ------------------------------------------------------------------------------------------------------ scMulan
@pytest.fixture(scope="module")
def sm_loaded(tmp_path_factory):
    ckpt = msfm.scmulan.convert(
        FIXTURES / "scmulan" / "tiny_official.pt", tmp_path_factory.mktemp("sm") / "c"
    )
    return msfm.scmulan.load(ckpt, device="cpu")


@pytest.fixture(scope="module")
def sm_cells() -> ad.AnnData:
    from msfm.tokenizers.cell_sentence import CellSentenceVocab

    io = load_file(FIXTURES / "scmulan" / "tiny_official_io.safetensors")
    a = ad.AnnData(X=sp.csr_matrix(io["cells.expr_2000"].numpy()))
    a.var_names = CellSentenceVocab.official().genes
    a.obs_names = [f"cell{i}" for i in range(a.n_obs)]
    return a


def _sm_predict(cells, loaded, precision: str, **kw) -> ad.AnnData:
    return msfm.scmulan.predict(
        cells,
        loaded,
        precision=precision,
        min_confidence=0.0,
        pre_normalized=True,
        progress=False,
        copy=True,
        **kw,
    )


def test_scmulan_labels_bf16_vs_fp32(sm_cells, sm_loaded) -> None:
    fp32 = _sm_predict(sm_cells, sm_loaded, "32")
    bf16 = _sm_predict(sm_cells, sm_loaded, "bf16")
    for col in ("scmulan_cell_type", "scmulan_cell_type_fine"):
        assert list(fp32.obs[col].astype(str)) == list(bf16.obs[col].astype(str)), col
    # measured: embedding cosine min 0.99997, confidence |diff| max 2e-5
    assert _cosine(fp32.obsm["X_scmulan"], bf16.obsm["X_scmulan"]).min() >= COSINE_BAR
    np.testing.assert_allclose(fp32.obs["scmulan_confidence"], bf16.obs["scmulan_confidence"], atol=1e-3)
    assert bf16.uns["scmulan"]["predict"]["cell_type"]["precision"]["chosen"] == "bf16"
    assert fp32.uns["scmulan"]["predict"]["cell_type"]["precision"]["chosen"] == "32"


def test_scmulan_release_mode_bf16_agreement_is_measured(sm_cells, sm_loaded) -> None:
    """The release's unconstrained free decode is less robust: on this tiny random-weight fixture one of the six
    cells (cell4, whose free first word is a near tie) changes its coarse label in bf16; the bar here is the
    measured 5 of 6, so a regression below it fails (constrained decoding, the default, keeps all six)."""
    fp32 = _sm_predict(sm_cells, sm_loaded, "32", constrained=False)
    bf16 = _sm_predict(sm_cells, sm_loaded, "bf16", constrained=False)
    same = (
        fp32.obs["scmulan_cell_type"].astype(str).to_numpy()
        == bf16.obs["scmulan_cell_type"].astype(str).to_numpy()
    )
    assert same.sum() >= 5, same


# --------------------------------------------------------------------------------------------------------- ROAM
def test_roam_slide_predictions_bf16_vs_fp32() -> None:
    from msfm.models.roam.official import load_official_checkpoint

    model = load_official_checkpoint(FIXTURES / "roam" / "tiny_official.pt").eval()
    io = load_file(FIXTURES / "roam" / "tiny_official_io.safetensors")
    for slide in ("A", "B", "C"):
        x = io[f"{slide}_features"]
        with torch.inference_mode():
            p32 = model(x).logits.float().softmax(-1)
            # the same autocast context msfm.roam.predict(precision="bf16") runs the ensemble in
            with autocast_context("cpu", "bf16"):
                p16 = model(x).logits.float().softmax(-1)
        assert int(p32.argmax()) == int(p16.argmax()), slide
        # measured: max |prob diff| 0.0014 over the three slides, same class for all three
        torch.testing.assert_close(p16, p32, atol=2e-2, rtol=0)
