"""DeepCDR-style drug response (drug_fit / drug_predict) on CONSTRUCTED data (real PBMC pseudo-bulk, real SMILES,
a planted response rule; see msfm.datasets.constructed_drugs)."""

from __future__ import annotations

import anndata as ad
import lightning
import numpy as np
import pandas as pd
import pytest
import torch

from msfm.data.normalize import log1p_cp10k
from msfm.datasets.constructed_drugs import constructed_drug_response
from msfm.errors import ConfigChangedError, MsfmInputError
from msfm.models.scfoundation.drug_response import drug_fit, drug_predict
from msfm.runtime.results import TrainResult

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

FAST = {"max_epochs": 2, "batch_size": 16, "hidden": 16, "fingerprint_bits": 64, "accelerator": "cpu",
        "progress": False}  # fmt: skip
DRUGS = ["Sorafenib", "Gefitinib", "Cisplatin", "Vorinostat"]


def _pca(adata: ad.AnnData, k: int = 8) -> np.ndarray:
    from sklearn.decomposition import PCA

    x = log1p_cp10k(adata.layers["counts"]).toarray()
    return PCA(k, random_state=0).fit_transform(x).astype(np.float32)


@pytest.fixture(scope="module")
def small():
    data = constructed_drug_response(n_cell_lines=12, drugs=DRUGS, seed=3)
    data.expression.obsm["X_pca"] = _pca(data.expression)
    assert data.expression.uns["dataset"]["constructed"] is True
    return data


@pytest.fixture(scope="module")
def backbone(small, tmp_path_factory):
    from msfm.models.scfoundation.model import ScFoundation
    from msfm.models.scfoundation.provenance import preprocessing_record
    from msfm.registry import preset_config
    from msfm.runtime.checkpoint import save_checkpoint

    genes = list(small.expression.var_names)
    cfg = preset_config("scfoundation-tiny").model_copy(update={"num_genes": len(genes)})
    torch.manual_seed(0)
    return save_checkpoint(
        tmp_path_factory.mktemp("bb") / "bb",
        family="scfoundation",
        config=cfg,
        state_dict=ScFoundation(cfg).state_dict(),
        gene_panel=genes,
        preprocessing=preprocessing_record(),
    )


def test_fit_with_backbone_then_predict_shapes_round_trip_and_batches(small, backbone, tmp_path):
    res = drug_fit(small.expression, backbone, responses=small.responses, drugs=small.drugs, out=tmp_path / "m",
                   folds=2, **FAST)  # fmt: skip
    assert isinstance(res, TrainResult)
    assert res.checkpoint == tmp_path / "m"
    assert (res.run_dir / "fold-0" / "predictions.csv").exists()
    assert (res.run_dir / "final").is_dir()
    cv = pd.read_csv(tmp_path / "m" / "cv_predictions.csv")
    assert len(cv) == 48
    assert cv[["model", "per_drug_mean", "ridge_expression"]].notna().all().all()
    metrics = pd.read_csv(tmp_path / "m" / "metrics.csv")
    assert set(metrics["method"]) == {"model", "per_drug_mean", "ridge_expression", "ridge_embedding"}
    assert len(metrics) == 4 * 3  # 2 folds + overall, 4 methods
    assert np.isfinite(res.metrics["model"]["rmse"])
    a = small.expression.copy()
    out = drug_predict(a, res, device="cpu", progress=False, out=tmp_path / "p.h5ad")
    ic50 = out.obsm["scfoundation_ic50"]
    assert isinstance(ic50, pd.DataFrame)
    assert ic50.shape == (12, 4)
    assert list(ic50.columns) == DRUGS
    assert out.uns["scfoundation"]["drug_predict"]["drugs"] == DRUGS
    assert np.isfinite(ic50.to_numpy()).all()
    # the embedding is the official DeepCDR setting: f1 (T = S), max pooling -> encoder width
    assert out.uns["scfoundation"]["drug_predict"]["embedding"]["pool"] == "max"
    # round trip through the file and a fresh load of the checkpoint directory
    back = ad.read_h5ad(tmp_path / "p.h5ad")
    np.testing.assert_allclose(np.asarray(back.obsm["scfoundation_ic50"]), ic50.to_numpy(), rtol=1e-6)
    again = drug_predict(small.expression.copy(), tmp_path / "m", device="cpu", progress=False, batch_size=1)
    np.testing.assert_allclose(
        again.obsm["scfoundation_ic50"].to_numpy(), ic50.to_numpy(), rtol=1e-5, atol=1e-5
    )
    # only some pairs: the others are NaN, the asked ones unchanged
    pairs = pd.DataFrame({"cell_line": ["CL000", "CL005"], "drug_id": ["Cisplatin", "Sorafenib"]})
    part = drug_predict(small.expression.copy(), res, pairs=pairs, device="cpu", progress=False)
    got = part.obsm["scfoundation_ic50"]
    assert int(np.isfinite(got.to_numpy()).sum()) == 2
    assert got.loc["CL005", "Sorafenib"] == pytest.approx(ic50.loc["CL005", "Sorafenib"], abs=1e-5)


class _Crash(RuntimeError):
    pass


class _CrashInFold(lightning.Callback):
    def __init__(self, fold: str, step: int):
        self.fold, self.step = fold, step

    def on_train_batch_end(self, trainer, *args):
        if str(trainer.default_root_dir).endswith(self.fold) and trainer.global_step == self.step:
            raise _Crash


def test_killed_run_skips_finished_folds_and_resumes_the_interrupted_one(small, tmp_path):
    kw = {"responses": small.responses, "drugs": small.drugs, "use_rep": "X_pca", "folds": 2,
          "checkpoint_every_n_steps": 1, **FAST, "max_epochs": 3}  # fmt: skip
    ref = drug_fit(small.expression, None, out=tmp_path / "a", **kw)
    # 2 steps per epoch; killed during step 4, last.ckpt holds step 3: in the middle of the second epoch.
    with pytest.raises(_Crash):
        drug_fit(small.expression, None, out=tmp_path / "b", callbacks=[_CrashInFold("fold-1", 4)], **kw)
    finished = tmp_path / ".b.run" / "fold-0" / "predictions.csv"
    stamp = finished.stat().st_mtime_ns
    last = tmp_path / ".b.run" / "fold-1" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    assert not (tmp_path / "b").exists()
    res = drug_fit(small.expression, None, out=tmp_path / "b", **kw)
    assert finished.stat().st_mtime_ns == stamp  # fold 0 was not trained again
    a = pd.read_csv(tmp_path / "a" / "cv_predictions.csv")
    b = pd.read_csv(tmp_path / "b" / "cv_predictions.csv")
    np.testing.assert_allclose(b["model"], a["model"], rtol=1e-5, atol=1e-5)
    assert res.metrics["model"]["rmse"] == pytest.approx(ref.metrics["model"]["rmse"], rel=1e-5)
    # the same run folder with other settings is refused
    with pytest.raises(ConfigChangedError, match="lr"):
        drug_fit(small.expression, None, out=tmp_path / "b", overwrite=True, **{**kw, "lr": 0.5})


def test_bad_inputs(small, tmp_path):
    kw = {"responses": small.responses, "drugs": small.drugs, **FAST}
    with pytest.raises(MsfmInputError, match=r"use_rep='X_nope' is not in data.obsm.*X_pca"):
        drug_fit(small.expression, None, out=tmp_path / "x", use_rep="X_nope", **kw)
    with pytest.raises(MsfmInputError, match="folds=5 is more than the 4 drugs"):
        drug_fit(small.expression, None, out=tmp_path / "x", use_rep="X_pca", split="drugs", **kw)
    bad = small.drugs.assign(smiles=["C1CC(", *small.drugs["smiles"][1:]])
    with pytest.raises(MsfmInputError, match=r"do not parse.*Sorafenib"):
        drug_fit(small.expression, None, out=tmp_path / "x", use_rep="X_pca", **{**kw, "drugs": bad})
    with pytest.raises(MsfmInputError, match=r"not in the expression data.*CL011"):
        drug_fit(small.expression[:11].copy(), None, out=tmp_path / "x", use_rep="X_pca", **kw)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # ~20 s: the one quality test of the drug tasks (regression and SCAD)
def test_constructed_runs_beat_the_baselines_and_chance(tmp_path):
    data = constructed_drug_response(n_cell_lines=60, seed=0)
    data.expression.obsm["X_pca"] = _pca(data.expression, 16)
    res = drug_fit(data.expression, None, responses=data.responses, drugs=data.drugs, out=tmp_path / "m",
                   use_rep="X_pca", folds=3, max_epochs=40, batch_size=128, lr=3e-3, fingerprint_bits=256,
                   accelerator="cpu", progress=False)  # fmt: skip
    m, base = res.metrics["model"], res.metrics["per_drug_mean"]
    assert m["pcc"] > base["pcc"] + 0.3
    assert m["rmse"] < 0.6 * base["rmse"]
    assert m["pcc"] > res.metrics["ridge_expression"]["pcc"] + 0.2
    # SCAD: labelled pseudo-bulk -> the real pbmc68k cells; beats chance on the single cells
    from msfm.datasets.constructed_drugs import constructed_sensitivity
    from msfm.models.scfoundation.drug_sensitivity import sensitivity_fit

    bulk, cells = constructed_sensitivity("Sorafenib", n_cell_lines=80, seed=0)
    from sklearn.decomposition import PCA

    xb, xs = (log1p_cp10k(a.layers["counts"]).toarray() for a in (bulk, cells))
    pca = PCA(16, random_state=0).fit(np.vstack([xb, xs]))  # one space for both domains
    bulk.obsm["X_pca"], cells.obsm["X_pca"] = (pca.transform(x).astype(np.float32) for x in (xb, xs))
    res = sensitivity_fit(bulk, None, single_cells=cells, bulk_labels_key="sensitive", sc_labels_key="sensitive",
                          out=tmp_path / "s", use_rep="X_pca", folds=5, max_epochs=30, batch_size=32,
                          accelerator="cpu", progress=False)  # fmt: skip
    assert res.metrics["scad"]["bulk_auroc"] > 0.85
    assert res.metrics["scad"]["sc_auroc"] > 0.55
