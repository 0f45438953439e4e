"""SCAD-style single-cell drug sensitivity (sensitivity_fit / sensitivity_predict) on CONSTRUCTED data: labelled
pseudo-bulk "cell lines" of real PBMCs and the real pbmc68k cells labelled by the same planted rule."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from msfm.data.normalize import log1p_cp10k
from msfm.datasets.constructed_drugs import constructed_sensitivity
from msfm.errors import MsfmInputError
from msfm.models.scfoundation.drug_sensitivity import sensitivity_fit, sensitivity_predict
from msfm.nn.gradient_reversal import GradientReversal, grad_reverse

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

FAST = {
    "max_epochs": 2,
    "batch_size": 8,
    "hidden": 16,
    "feature_dim": 8,
    "accelerator": "cpu",
    "progress": False,
}


def _shared_pca(bulk: ad.AnnData, cells: ad.AnnData, k: int) -> None:
    from sklearn.decomposition import PCA

    xb = log1p_cp10k(bulk.layers["counts"]).toarray()
    xs = log1p_cp10k(cells.layers["counts"]).toarray()
    pca = PCA(k, random_state=0).fit(np.vstack([xb, xs]))
    bulk.obsm["X_pca"] = pca.transform(xb).astype(np.float32)
    cells.obsm["X_pca"] = pca.transform(xs).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    bulk, cells = constructed_sensitivity("Sorafenib", n_cell_lines=24, seed=1)
    cells = cells[::7].copy()  # 100 cells
    _shared_pca(bulk, cells, 8)
    assert bulk.uns["dataset"]["constructed"]
    assert cells.uns["dataset"]["constructed"]
    return bulk, cells


def test_gradient_reversal_flips_and_scales_the_gradient():
    x = torch.randn(3, 4, requires_grad=True)
    y = grad_reverse(x, 0.5)
    assert torch.equal(y, x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3, 4), -0.5))
    assert "lambd=2.0" in repr(GradientReversal(2.0))


def test_fit_predict_shapes_metrics_and_round_trip(data, tmp_path):
    bulk, cells = data
    res = sensitivity_fit(bulk, None, single_cells=cells, bulk_labels_key="sensitive", sc_labels_key="sensitive",
                          out=tmp_path / "m", use_rep="X_pca", folds=2, **FAST)  # fmt: skip
    for m in ("scad", "no_adversarial", "logistic"):
        assert 0 <= res.metrics[m]["bulk_auroc"] <= 1
        assert 0 <= res.metrics[m]["sc_auroc"] <= 1
    metrics = pd.read_csv(tmp_path / "m" / "metrics.csv")
    assert len(metrics) == 3 * 3
    assert {"bulk_auroc", "sc_auroc"} <= set(metrics.columns)
    assert len(pd.read_csv(tmp_path / "m" / "cv_predictions.csv")) == 24
    assert pd.read_csv(tmp_path / "m" / "sc_predictions.csv").shape == (100, 2 + 3 * 2)
    a = sensitivity_predict(cells.copy(), res, device="cpu", progress=False, out=tmp_path / "p.h5ad")
    label, conf = a.obs["scfoundation_sensitive"], a.obs["scfoundation_sensitivity_confidence"].to_numpy()
    assert set(label.cat.categories) == {"sensitive", "resistant"}
    assert len(label) == 100
    assert ((conf >= 0.5) & (conf <= 1)).all()
    p = a.obs["scfoundation_sensitivity_probability"].to_numpy()
    np.testing.assert_array_equal(label.to_numpy() == "sensitive", p >= 0.5)
    back = ad.read_h5ad(tmp_path / "p.h5ad")
    np.testing.assert_allclose(back.obs["scfoundation_sensitivity_probability"].to_numpy(), p)
    # one cell at a time == all at once; a fresh load of the directory gives the same numbers
    one = sensitivity_predict(cells.copy(), tmp_path / "m", device="cpu", progress=False, batch_size=1)
    np.testing.assert_allclose(
        one.obs["scfoundation_sensitivity_probability"].to_numpy(), p, rtol=1e-5, atol=1e-6
    )


def test_fit_with_a_backbone_uses_the_official_depths(data, tmp_path):
    from msfm.models.scfoundation.model import ScFoundation
    from msfm.models.scfoundation.provenance import preprocessing_record
    from msfm.registry import preset_config
    from msfm.runtime.checkpoint import save_checkpoint

    bulk, cells = data
    genes = list(bulk.var_names)
    cfg = preset_config("scfoundation-tiny").model_copy(update={"num_genes": len(genes)})
    bb = save_checkpoint(tmp_path / "bb", family="scfoundation", config=cfg, state_dict=ScFoundation(cfg).state_dict(),
                         gene_panel=genes, preprocessing=preprocessing_record())  # fmt: skip
    res = sensitivity_fit(bulk[:12].copy(), bb, single_cells=cells[:20].copy(), bulk_labels_key="sensitive",
                          out=tmp_path / "m", folds=2, **{**FAST, "max_epochs": 1})  # fmt: skip
    from msfm.runtime.checkpoint import load_checkpoint

    spec = load_checkpoint(tmp_path / "m").config
    assert (spec["bulk"]["target_depth"], spec["single_cell"]["target_depth"]) == ("f1", "t4")
    assert spec["head"]["in_dim"] == 4 * cfg.encoder_dim  # pool "all": S, T, max, mean
    out = sensitivity_predict(cells[:5].copy(), res, device="cpu", progress=False)
    assert out.obs["scfoundation_sensitive"].notna().all()


def test_bad_inputs(data, tmp_path):
    bulk, cells = data
    kw = {"out": tmp_path / "x", "use_rep": "X_pca", **FAST}
    one = bulk.copy()
    one.obs["lab"] = ["sensitive"] * 23 + ["resistant"]
    with pytest.raises(MsfmInputError, match=r"Fold \d has only one class"):
        sensitivity_fit(one, None, single_cells=cells, bulk_labels_key="lab", folds=3, **kw)
    odd = bulk.copy()
    odd.obs["lab"] = ["maybe"] + ["sensitive"] * 23
    with pytest.raises(MsfmInputError, match=r"\['maybe'\] that are not binary"):
        sensitivity_fit(odd, None, single_cells=cells, bulk_labels_key="lab", **kw)
    with pytest.raises(MsfmInputError, match="folds=30 is more than the 24 bulk samples"):
        sensitivity_fit(bulk, None, single_cells=cells, bulk_labels_key="sensitive", folds=30, **kw)
    bare = cells[:10].copy()
    del bare.obsm["X_pca"]
    with pytest.raises(MsfmInputError, match=r"use_rep='X_pca' is not in single_cells.obsm"):
        sensitivity_fit(bulk, None, single_cells=bare, bulk_labels_key="sensitive", **kw)
    assert not (tmp_path / "x").exists()
