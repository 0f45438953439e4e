"""GEARS-style perturbation prediction on scFoundation: the head, perturb_fit (engine, resume, metrics.csv),
perturb, bad inputs, and one quality test on real Kang PBMC data."""

from __future__ import annotations

import anndata as ad
import lightning
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import msfm
from msfm.engine.trainer import resume_step
from msfm.errors import CheckpointError, ConfigChangedError, MsfmInputError
from msfm.eval.perturb_metrics import perturbation_metrics
from msfm.models.scfoundation.model import ScFoundation
from msfm.models.scfoundation.perturb_config import PerturbHeadConfig
from msfm.models.scfoundation.perturb_model import PerturbationHead
from msfm.models.scfoundation.provenance import preprocessing_record
from msfm.registry import preset_config
from msfm.runtime.checkpoint import load_checkpoint, save_checkpoint
from msfm.runtime.results import TrainResult

sf = msfm.scfoundation
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

N_GENES = 30
GENES = [f"G{i}" for i in range(N_GENES)]
# perturbed gene -> (gene it raises, gene it silences)
EFFECTS = {"G1": (5, 10), "G2": (6, 11), "G3": (7, 12)}


def gears_data(seed: int = 0) -> ad.AnnData:
    """Constructed GEARS-style data: each perturbed gene raises one gene 4x and silences another."""
    rng = np.random.default_rng(seed)
    conds = ["ctrl"] * 24 + [c for c in ("G1+ctrl", "G2+ctrl", "G3+ctrl", "G1+G2") for _ in range(8)]
    lam = rng.gamma(2.0, 2.0, size=N_GENES)
    x = rng.poisson(lam, size=(len(conds), N_GENES)).astype(np.float32)
    for i, c in enumerate(conds):
        for g in c.split("+"):
            if g in EFFECTS:
                up, down = EFFECTS[g]
                x[i, up] *= 4
                x[i, down] = 0
    obs = pd.DataFrame({"condition": conds}, index=[f"c{i}" for i in range(len(conds))])
    return ad.AnnData(sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=GENES))


def kang_like(seed: int = 0) -> ad.AnnData:
    """Constructed ctrl/stim data in three cell types; stim raises G3 by a type-specific factor."""
    rng = np.random.default_rng(seed)
    blocks = []
    for t, (typ, fold) in enumerate((("A", 3), ("B", 5), ("C", 8))):
        lam = rng.gamma(2.0, 2.0, size=N_GENES)
        lam[t] += 10
        for cond in ("ctrl", "stim"):
            x = rng.poisson(lam, size=(8, N_GENES)).astype(np.float32)
            if cond == "stim":
                x[:, 3] *= fold
            obs = pd.DataFrame(
                {"condition": cond, "cell_type": typ}, index=[f"{typ}{cond}{i}" for i in range(8)]
            )
            blocks.append(ad.AnnData(sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=GENES)))
    return ad.concat(blocks)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    cfg = preset_config("scfoundation-tiny").model_copy(update={"num_genes": N_GENES})
    torch.manual_seed(0)
    return save_checkpoint(
        tmp_path_factory.mktemp("bb") / "bb",
        family="scfoundation",
        config=cfg,
        state_dict=ScFoundation(cfg).state_dict(),
        gene_panel=GENES,
        preprocessing=preprocessing_record(),
    )


def _fit(data, backbone, out, **kw):
    args = {
        "test_conditions": ["G1+G2"],
        "max_steps": 4,
        "batch_size": 8,
        "min_cells": 4,
        "accelerator": "cpu",
        "device": "cpu",
        "progress": False,
        "hidden_dim": 16,
    }
    args.update(kw)
    return sf.perturb_fit(data, backbone, out=out, **args)


@pytest.fixture(scope="module")
def fitted(backbone, tmp_path_factory):
    return _fit(gears_data(), backbone, tmp_path_factory.mktemp("pm") / "pm")


def test_head_forward_shapes():
    cfg = PerturbHeadConfig(n_genes=7, context_dim=5, n_labels=2, hidden_dim=8)
    edges = torch.tensor([[0, 1, 2], [1, 2, 3]])
    head = PerturbationHead(cfg, edges, torch.ones(3), edges, torch.ones(3))
    ctx, ctrl = torch.randn(4, 7, 5), torch.rand(4, 7)
    pert = torch.zeros(4, 9)
    pert[0, 1] = pert[1, 7] = 1
    out = head(ctx, ctrl, pert)
    assert out.shape == (4, 7)
    # the read-out starts at zero: an untrained head predicts "no change"
    torch.testing.assert_close(out, ctrl)
    with torch.no_grad():
        head.readout_weight.normal_()
    out = head(ctx, ctrl, pert)
    assert not torch.allclose(out[0], out[2])  # a perturbed gene changes the prediction


def test_context_embeddings_batched_equal_one_by_one(backbone):
    from msfm.data import prepare_cells
    from msfm.models.scfoundation.perturbation import _contexts

    data = gears_data()
    loaded = sf.load(backbone, device="cpu")
    source, mapping = prepare_cells(data, loaded.vocab)
    rows, pos = np.array([0, 3, 5, 9, 30]), np.arange(N_GENES)
    kw = {"precision": "32", "progress": False}
    a = _contexts(loaded, source, mapping, rows, pos, batch_size=5, **kw)
    b = np.concatenate(
        [_contexts(loaded, source, mapping, rows[i : i + 1], pos, batch_size=1, **kw) for i in range(5)]
    )
    assert a.shape == (5, N_GENES, loaded.config.decoder_dim)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_fit_writes_metrics_for_model_and_baselines(fitted):
    assert isinstance(fitted, TrainResult)
    table = pd.read_csv(fitted.checkpoint / "metrics.csv")
    assert table["method"].tolist() == ["model", "no_change", "mean_shift", "additive_linear"]
    assert set(table["subgroup"]) == {"combo_seen2"}
    assert (table["n_cells"] == 8).all()
    assert (table["n_control_cells"] == 24).all()
    assert load_checkpoint(fitted.checkpoint).family == "scfoundation-perturb"
    # the additive baseline (delta_G1 + delta_G2) is the right answer on this constructed data
    add, shift = fitted.metrics["additive_linear/pearson_delta"], fitted.metrics["mean_shift/pearson_delta"]
    assert add > 0.6
    assert add > shift + 0.1
    assert fitted.metrics["no_change/pearson_delta"] == 0.0


def test_checkpoint_round_trip_reproduces_fit_metrics(fitted):
    data = gears_data()
    pred = sf.perturb(data, fitted, conditions=["G1+G2", "G3+ctrl"], device="cpu", progress=False)
    assert pred.shape == (2, N_GENES)
    assert pred.obs["condition"].tolist() == ["G1+G2", "G3+ctrl"]
    assert (pred.obs["n_control_cells"] == 24).all()
    assert pred.uns["scfoundation"]["perturb"]["conditions"] == ["G1+G2", "G3+ctrl"]
    # the loaded model scores the held-out combination exactly as the fitted one did
    combo = data[data.obs["condition"] == "G1+G2"]
    from msfm.data.normalize import log1p_cp10k

    true = np.asarray(log1p_cp10k(combo.X).mean(0)).ravel()
    m = perturbation_metrics(pred.X[0], true, pred.layers["control"][0])
    row = pd.read_csv(fitted.checkpoint / "metrics.csv").iloc[0]
    for name, value in m.items():
        assert value == pytest.approx(row[name], abs=1e-5), name
    again = sf.perturb(data, str(fitted.checkpoint), conditions=["G1+G2"], device="cpu", progress=False)
    np.testing.assert_allclose(again.X[0], pred.X[0], atol=1e-6)
    cells = sf.perturb(data, fitted, conditions=["G1+G2"], per_cell=True, device="cpu", progress=False)
    assert cells.shape == (24, N_GENES)
    assert cells.obs["control_cell"].iloc[0] == "c0"
    np.testing.assert_allclose(cells.X.mean(0), pred.X[0], atol=1e-5)


class _Crash(RuntimeError):
    pass


class _CrashAt(lightning.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise _Crash


def test_resume_after_kill_reaches_the_same_model(backbone, tmp_path):
    data = gears_data()
    kw = {"max_steps": 6, "checkpoint_every_n_steps": 2}
    a = _fit(data, backbone, tmp_path / "a", **kw)
    with pytest.raises(_Crash):
        _fit(data, backbone, tmp_path / "b", callbacks=[_CrashAt(5)], **kw)
    with pytest.raises(ConfigChangedError, match="lr"):
        _fit(data, backbone, tmp_path / "b", lr=0.5, **kw)
    b = _fit(data, backbone, tmp_path / "b", **kw)
    assert resume_step(a.run_dir) == resume_step(b.run_dir) == 6
    wa, wb = load_checkpoint(a.checkpoint).state_dict, load_checkpoint(b.checkpoint).state_dict
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5, msg=k)


def test_group_split_with_label_perturbations(backbone, tmp_path):
    data = kang_like()
    r = _fit(data, backbone, tmp_path / "k", match_key="cell_type", control="ctrl", split="group",
             test_groups=["B"], test_conditions=None)  # fmt: skip
    table = pd.read_csv(r.checkpoint / "metrics.csv")
    assert set(zip(table["condition"], table["group"], strict=True)) == {("stim", "B")}
    # with one label, the additive model is the mean training delta of "stim", the same as the mean shift
    ms = table.set_index("method").loc[["mean_shift", "additive_linear"]]
    assert ms["pearson_delta"].iloc[0] == pytest.approx(ms["pearson_delta"].iloc[1], abs=1e-4)
    pred = sf.perturb(data, r, device="cpu", progress=False)
    assert pred.obs[["condition", "cell_type"]].values.tolist() == [
        ["stim", "A"],
        ["stim", "B"],
        ["stim", "C"],
    ]
    with pytest.raises(MsfmInputError, match=r"'drug' is a non-gene perturbation the model never learned"):
        sf.perturb(data, r, conditions=["drug"], device="cpu", progress=False)
    with pytest.raises(MsfmInputError, match=r"Group\(s\) \['Z'\] have no control cells"):
        sf.perturb(data, r, groups=["Z"], device="cpu", progress=False)


def test_fit_refuses_unknown_genes_in_conditions(backbone, tmp_path):
    data = gears_data()
    cond = data.obs["condition"].astype(str).to_numpy()
    cond[cond == "G3+ctrl"] = "TP53+ctrl"
    data.obs["condition"] = cond
    with pytest.raises(
        MsfmInputError, match=r"\['TP53'\].*must be in the backbone's gene panel and in the data"
    ):
        _fit(data, backbone, tmp_path / "x")


def test_fit_refuses_context_embeddings_above_the_memory_limit(backbone, tmp_path):
    with pytest.raises(MsfmInputError, match=r"above max_memory_gb=1e-06\. Lower max_control_cells"):
        _fit(gears_data(), backbone, tmp_path / "x", max_memory_gb=1e-6)


def test_fit_refuses_pre_normalized_input(backbone, tmp_path):
    with pytest.raises(MsfmInputError, match="needs raw counts"):
        _fit(gears_data(), backbone, tmp_path / "x", pre_normalized=True)


def test_perturb_refuses_a_backbone_checkpoint_and_unknown_genes(fitted, backbone):
    data = gears_data()
    with pytest.raises(CheckpointError, match="perturb needs a 'scfoundation-perturb' checkpoint"):
        sf.perturb(data, backbone, device="cpu", progress=False)
    with pytest.raises(MsfmInputError, match=r"names gene\(s\) \['TP53'\] that are not among the model's"):
        sf.perturb(data, fitted, conditions=["TP53+ctrl"], device="cpu", progress=False)
    del data.obs["condition"]
    with pytest.raises(
        MsfmInputError, match="condition column 'condition' the model was fit with is not in obs"
    ):
        sf.perturb(data, fitted, device="cpu", progress=False)


@pytest.mark.slow
def test_quality_on_kang_held_out_cd14_monocytes(tmp_path):
    """Real data: predict stimulated CD14 monocytes (never seen stimulated) from their control cells."""
    from msfm.models.scfoundation.pretraining import resolve_panel

    data = msfm.datasets.kang_pbmc(n_top_genes=300, n_cells_per_group=60, seed=0)
    panel = resolve_panel("data", [data])
    cfg = preset_config("scfoundation-tiny").model_copy(update={"num_genes": len(panel)})
    torch.manual_seed(0)
    bb = save_checkpoint(
        tmp_path / "bb",
        family="scfoundation",
        config=cfg,
        state_dict=ScFoundation(cfg).state_dict(),
        gene_panel=list(panel.symbols),
        preprocessing=preprocessing_record(),
    )
    r = sf.perturb_fit(
        data, bb, out=tmp_path / "pm", control="ctrl", match_key="cell_type", split="group",
        test_groups=["CD14 Mono"], max_epochs=15, batch_size=32, lr=3e-3, min_cells=5, accelerator="cpu",
        device="cpu", progress=False,
    )  # fmt: skip
    m = r.metrics
    # robust: the learned stim response correlates with the true one far better than "no change" (0 by definition)
    assert m["model/pearson_delta"] > 0.5
    assert m["model/mse_top20_de"] < m["no_change/mse_top20_de"]
    assert m["model/direction_acc_top20_de"] >= 0.75
