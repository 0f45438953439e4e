"""The public shape of msfm.scmulan: key_added naming, option validation, outputs, results, and the old names."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from safetensors.torch import load_file

import msfm
from msfm.errors import MsfmInputError
from msfm.models.scmulan.decoding import DecodeOptions
from msfm.runtime.loaded import Loaded
from msfm.tokenizers.cell_sentence import CellSentenceVocab

FIX = Path(__file__).parents[1] / "fixtures" / "scmulan"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
sm = msfm.scmulan


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return sm.convert(FIX / "tiny_official.pt", tmp_path_factory.mktemp("scmulan") / "ckpt")


@pytest.fixture(scope="module")
def loaded(ckpt) -> Loaded:
    return sm.load(ckpt, device="cpu")


@pytest.fixture
def cells() -> ad.AnnData:
    io = load_file(FIX / "tiny_official_io.safetensors")
    a = ad.AnnData(X=sp.csr_matrix(io["cells.expr_2000"].numpy()))
    a.var_names = CellSentenceVocab.official().genes
    a.obs_names = [f"cell{i}" for i in range(a.n_obs)]
    return a


def test_load_returns_the_shared_loaded_type(ckpt, loaded):
    assert isinstance(loaded, Loaded)
    assert loaded.family == "scmulan"
    assert loaded.vocab == CellSentenceVocab.official()
    assert loaded.preprocessing["gene_order"] == "reverse"
    assert sm.load(loaded) is loaded  # a Loaded passes through
    assert sm.load(loaded, device="cpu") is loaded
    tok = sm.tokenizer_for(loaded, max_genes=5)
    assert tok.gene_order == "reverse"
    assert tok.max_genes == 5
    with pytest.raises(MsfmInputError, match="data first"):
        sm.load({"organ": "Blood"})


def test_key_added_names_every_output(cells, loaded):
    out = sm.predict(cells, loaded, key_added="m", pre_normalized=True, progress=False)
    assert out is cells  # written into the AnnData given
    assert {"m_cell_type", "m_cell_type_fine", "m_confidence"} <= set(cells.obs)
    assert "X_m" in cells.obsm
    sm.predict(cells, loaded, target="organ", key_added="m", pre_normalized=True, progress=False)
    assert {"m_organ", "m_region", "m_organ_confidence"} <= set(cells.obs)
    assert set(cells.uns["m"]["predict"]) == {"cell_type", "organ"}
    sm.smooth_labels(cells, key_added="m", n_neighbors=3)
    assert {"m_cell_type_smoothed", "m_smoothing_score"} <= set(cells.obs)
    assert not any(k.startswith("scmulan") for k in [*cells.obs, *cells.obsm, *cells.uns])
    with pytest.raises(MsfmInputError, match="prefix"):
        sm.predict(cells, loaded, key_added="X_scmulan", pre_normalized=True)
    with pytest.raises(MsfmInputError, match="target"):
        sm.predict(cells, loaded, target="tissue", pre_normalized=True)


def test_misspelt_options_get_did_you_mean(cells, loaded):
    with pytest.raises(MsfmInputError, match="did you mean 'pre_normalized'"):
        sm.predict(cells, loaded, pre_normalised=True)
    with pytest.raises(MsfmInputError, match="did you mean 'temperature'"):
        sm.generate({"organ": "Blood"}, loaded, temprature=0.5)
    with pytest.raises(MsfmInputError, match="did you mean 'repeat_mask'"):
        sm.next_state(cells, loaded, repeat_mak="all")
    # a decoding option that does not apply to the verb
    with pytest.raises(MsfmInputError, match=r"does not take the decoding option.*'temperature'"):
        sm.predict(cells, loaded, temperature=0.5, pre_normalized=True)
    with pytest.raises(MsfmInputError, match=r"does not take the decoding option.*'constrained'"):
        sm.next_state(cells, loaded, constrained=False)
    with pytest.raises(MsfmInputError, match="repeat_mask"):
        sm.generate({"organ": "Blood"}, loaded, repeat_mask="sometimes")
    with pytest.raises(MsfmInputError, match="Invalid reading option"):
        sm.embed(cells, loaded, species="fly")


def test_decoding_options_object_equals_keywords(loaded):
    kwargs = {"n_per_prompt": 2, "progress": False}
    flat = sm.generate({"organ": "Blood"}, loaded, max_new_tokens=12, seed=5, top_k=20, **kwargs)
    obj = sm.generate(
        {"organ": "Blood"}, loaded, decoding=DecodeOptions(max_new_tokens=12, seed=5, top_k=20), **kwargs
    )
    assert (flat.X != obj.X).nnz == 0
    # keywords go on top of the object
    other = sm.generate(
        {"organ": "Blood"}, loaded, decoding=DecodeOptions(max_new_tokens=12, top_k=20), seed=5, **kwargs
    )
    assert (flat.X != other.X).nnz == 0
    assert flat.uns["scmulan"]["generate"]["params"]["greedy"] in (False, 0)  # generate samples by default


def test_paths_in_and_out(cells, ckpt, tmp_path):
    src = tmp_path / "cells.h5ad"
    cells.write_h5ad(src)
    out = tmp_path / "pred.h5ad"
    res = sm.predict(src, ckpt, pre_normalized=True, progress=False, out=out, device="cpu")
    back = ad.read_h5ad(out)
    assert list(back.obs["scmulan_cell_type"]) == list(res.obs["scmulan_cell_type"])
    with pytest.raises(MsfmInputError, match="already exists"):
        sm.predict(src, ckpt, pre_normalized=True, progress=False, out=out)
    with pytest.raises(MsfmInputError, match="input file"):
        sm.embed(src, ckpt, pre_normalized=True, out=src, overwrite=True)
    before = cells.copy()
    copied = sm.embed(cells, ckpt, pre_normalized=True, copy=True, progress=False, device="cpu")
    assert copied is not cells
    assert "X_scmulan" not in cells.obsm
    assert (cells.X != before.X).nnz == 0
    gen = tmp_path / "gen.h5ad"
    sm.generate("organ=Blood", ckpt, max_new_tokens=8, progress=False, out=gen, device="cpu")
    assert ad.read_h5ad(gen).n_obs == 1
    table = tmp_path / "prompts.csv"
    pd.DataFrame({"organ": ["Blood", "Lung"], "sex": ["M", ""]}).to_csv(table, index=False)
    from_table = sm.generate([table, "organ=Heart"], ckpt, greedy=True, max_new_tokens=8, progress=False)
    assert list(from_table.obs["organ"]) == ["Blood", "Lung", "Heart"]
    with pytest.raises(MsfmInputError, match="category=value"):
        sm.generate("organBlood", ckpt)


def test_perturbation_result_saves(loaded, tmp_path):
    result = sm.perturb(
        {"organ": "Blood"}, loaded, genes=["SPI1"], levels=[10], n_cells=2, max_new_tokens=8, progress=False
    )
    assert isinstance(result, sm.ScMulanPerturbation)
    with pytest.raises(AttributeError):
        result.cells = None  # frozen
    folder = result.save(tmp_path / "pert")
    assert sorted(p.name for p in folder.iterdir()) == ["cells.h5ad", "result.json", "scores.csv"]
    assert ad.read_h5ad(folder / "cells.h5ad").n_obs == 4
    assert list(pd.read_csv(folder / "scores.csv", index_col=0)["gene"]) == ["control", "SPI1"]
    assert json.loads((folder / "result.json").read_text())["type"] == "ScMulanPerturbation"
    assert result.cells.uns["scmulan"]["perturb"]["params"]["genes"] == ["SPI1"]
    with pytest.raises(MsfmInputError, match="already exists"):
        result.save(tmp_path / "pert")
    with pytest.raises(MsfmInputError, match="one prompt"):
        sm.perturb([{"organ": "Blood"}, {"organ": "Lung"}], loaded, genes=["SPI1"])
    screen = sm.perturb_screen(
        "organ=Blood", loaded, genes="SPI1,CD3E", n_cells=2, max_new_tokens=8, progress=False
    )
    saved = screen.save(tmp_path / "screen")
    assert json.loads((saved / "result.json").read_text())["sort_by"] == "delta_vs_control"


def test_old_names_warn_and_translate(cells, loaded):
    with pytest.warns(DeprecationWarning, match=r"msfm\.scmulan\.predict"):
        assert sm.annotate(cells, loaded, pre_normalized=True, progress=False) is None  # the old return value
    assert "scmulan_cell_type" in cells.obs
    with pytest.warns(DeprecationWarning, match="target='organ'"):
        out = sm.predict_organ(cells, loaded, pre_normalized=True, progress=False, copy=True)
    assert "scmulan_organ" in out.obs
    with pytest.warns(DeprecationWarning, match=r"msfm\.scmulan\.load"):
        assert sm.load_model(loaded) is loaded
    with pytest.warns(DeprecationWarning, match="Loaded"):
        assert sm.LoadedScMulan is Loaded


def test_old_api_module_translates_old_calls(loaded):
    from msfm.models.scmulan import api

    prompt = {"organ": "Blood"}
    kwargs = {"n_cells": 2, "max_new_tokens": 8, "progress": False}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cells = api.generate(loaded, prompt, max_new_tokens=8, progress=False)  # old order
        old_cells, old_scores = api.perturb(loaded, prompt, ["SPI1"], [10], **kwargs)  # old tuple
        table = api.perturb_screen(loaded, prompt, ["SPI1"], **kwargs)
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert any("msfm.scmulan.generate(prompts, checkpoint)" in m for m in messages)
    assert any("msfm.scmulan.perturb(prompt, checkpoint" in m for m in messages)
    assert cells.n_obs == 1
    new = sm.perturb(prompt, loaded, genes=["SPI1"], levels=[10], **kwargs)
    assert (old_cells.X != new.cells.X).nnz == 0
    pd.testing.assert_frame_equal(old_scores, new.scores)
    assert isinstance(table, pd.DataFrame)


def test_train_settings_reject_the_old_init_from(tmp_path):
    from msfm.runtime.config import build_settings

    with pytest.raises(MsfmInputError, match="checkpoint="):
        build_settings(sm.ScMulanTrainConfig, base={"init_from": "x"})
    cfg = build_settings(
        sm.ScMulanTrainConfig, overrides={"tasks": "annotate=2", "meta_columns": "cell_type=ct"}
    )
    assert cfg.tasks == {"annotate": 2.0}
    assert cfg.meta_columns == {"cell_type": "ct"}
    with pytest.raises(MsfmInputError, match="Did you mean 'max_steps'"):
        build_settings(sm.ScMulanTrainConfig, overrides={"max_step": 3})
    assert np.isfinite(cfg.optim.lr)
