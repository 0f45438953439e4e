"""scMulan verbs on AnnData (msfm.scmulan): official parity through the public functions, constraints, generation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from safetensors.torch import load_file

import msfm
from msfm.data import CellSource
from msfm.errors import CheckpointError, MsfmInputError
from msfm.models.scmulan import reference, sampling
from msfm.models.scmulan.decoding import DecodeOptions
from msfm.models.scmulan.model import ScMulan
from msfm.runtime.loaded import Loaded
from msfm.tokenizers.cell_sentence import GENERATE, CellSentenceVocab, Sentences

sm = msfm.scmulan

FIX = Path(__file__).parents[1] / "fixtures" / "scmulan"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(FIX / "tiny_official_io.safetensors")


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> Path:
    return sm.convert(FIX / "tiny_official.pt", tmp_path_factory.mktemp("scmulan") / "ckpt")


@pytest.fixture(scope="module")
def loaded(ckpt_dir) -> Loaded:
    return sm.load(ckpt_dir, device="cpu")


@pytest.fixture(scope="module")
def vocab() -> CellSentenceVocab:
    return CellSentenceVocab.official()


@pytest.fixture
def cells(io, vocab) -> ad.AnnData:
    """The six fixture cells: log1p values over the official 2000 genes (pre-normalised input)."""
    a = ad.AnnData(X=sp.csr_matrix(io["cells.expr_2000"].numpy()))
    a.var_names = vocab.genes
    a.obs_names = [f"cell{i}" for i in range(a.n_obs)]
    return a


@pytest.fixture(scope="module")
def pbmc() -> ad.AnnData:
    from msfm.datasets import pbmc68k

    return pbmc68k()


def _tokens(vocab: CellSentenceVocab, ids: torch.Tensor) -> list[str]:
    return [vocab.token(int(i)) for i in ids]


# ----------------------------------------------------------------------------------------------------------
# conversion
# ----------------------------------------------------------------------------------------------------------
def test_convert_records_provenance_and_refuses_overwrite(ckpt_dir, tmp_path):
    meta = json.loads((ckpt_dir / "meta.json").read_text())
    extra = meta["extra"]
    assert extra["source"] == "official scMulan"
    assert extra["official_file"] == "tiny_official.pt"
    assert extra["official_sha256"] == "d9f87d58ea43bb1d90473a230d894bf898383c95030f80d43183ed18fb9339e3"
    # No checksum is published for ckpt_scMulan.pt: the record says the file was recognised by its layout.
    assert extra["official_recognised_by"].startswith("its key layout")
    assert extra["vocabulary_sha256"] == CellSentenceVocab.official().sha256()
    with pytest.raises(MsfmInputError, match="already exists"):
        sm.convert(FIX / "tiny_official.pt", ckpt_dir)
    again = sm.convert(FIX / "tiny_official.pt", tmp_path / "c", overwrite=False)
    assert (again / "model.safetensors").is_file()
    with pytest.raises(CheckpointError, match="does not exist"):
        sm.convert(tmp_path / "missing.pt", tmp_path / "d")


# ----------------------------------------------------------------------------------------------------------
# official parity through the public API
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [1, 6])
def test_annotate_release_mode_reproduces_official(cells, loaded, io, vocab, batch_size):
    out = sm.predict(
        cells,
        loaded,
        constrained=False,
        repeat_mask="official",
        min_confidence=0.0,
        pre_normalized=True,
        batch_size=batch_size,
        progress=False,
        copy=True,
    )
    labels = io["annot.gen.nonkv.label_ids"]
    assert list(out.obs["scmulan_cell_type"]) == _tokens(vocab, labels[:, 0])
    assert list(out.obs["scmulan_cell_type_fine"]) == _tokens(vocab, labels[:, 1])
    assert out.obs["scmulan_cell_type_fine"].iloc[5] == "Unclassified"  # the fixture's fCT is a gene
    np.testing.assert_allclose(out.obsm["X_scmulan"], io["annot.embedding"].numpy(), atol=1e-4, rtol=1e-4)
    generated = [row.split("; ") for row in out.obs["scmulan_generated"]]
    assert generated == [_tokens(vocab, r) for r in io["annot.gen.nonkv.ids"]]


def test_annotate_release_mode_with_kv_repeat_mask(cells, loaded, io, vocab):
    out = sm.predict(
        cells,
        loaded,
        constrained=False,
        repeat_mask="all",
        min_confidence=0.0,
        pre_normalized=True,
        progress=False,
        copy=True,
    )
    labels = io["annot.gen.kv.label_ids"]
    assert list(out.obs["scmulan_cell_type"]) == _tokens(vocab, labels[:, 0])
    assert list(out.obs["scmulan_cell_type_fine"]) == _tokens(vocab, labels[:, 1])


def test_raw_counts_follow_the_release_normalisation(pbmc, loaded, vocab):
    """Raw counts give what the release gives on its tutorial's input: log1p CP10k over ALL genes, then subset.

    The release normalises the whole matrix with scanpy before keeping its 2,000 genes; msfm must divide by the
    cell's full total, not by the total over the vocabulary genes (about half of the counts here).
    """
    import scanpy as sc

    from msfm.data import GenePanel, harmonize_genes
    from msfm.data.normalize import log1p_cp10k

    cells = pbmc[:60].copy()
    release = ad.AnnData(X=sp.csr_matrix(cells.layers["counts"], dtype=np.float32), var=cells.var.copy())
    release.obs_names = cells.obs_names
    sc.pp.normalize_total(release, target_sum=1e4)
    sc.pp.log1p(release)
    kwargs = {"min_confidence": 0.0, "constrained": False, "progress": False, "copy": True}
    from_counts = sm.predict(cells, loaded, **kwargs)
    from_release_input = sm.predict(release, loaded, pre_normalized=True, **kwargs)
    assert from_counts.uns["scmulan"]["predict"]["cell_type"]["input"]["kind"] == "counts"
    assert list(from_counts.obs["scmulan_generated"]) == list(from_release_input.obs["scmulan_generated"])
    np.testing.assert_allclose(
        from_counts.obsm["X_scmulan"], from_release_input.obsm["X_scmulan"], atol=1e-5, rtol=1e-5
    )
    # The test can fail: the total over the vocabulary genes alone gives other levels for most cells.
    tok = sm.tokenizer_for(loaded)
    mapping = harmonize_genes(cells.var, GenePanel.from_symbols(vocab.genes), min_panel_fraction=0.0)
    vocab_counts = mapping.apply(sp.csr_matrix(cells.layers["counts"], dtype=np.float32))
    wrong = tok.binned_matrix(log1p_cp10k(vocab_counts)).toarray()
    right = tok.binned_matrix(mapping.apply(sp.csr_matrix(release.X))).toarray()
    assert (wrong != right).any(axis=1).mean() > 0.5


@pytest.mark.parametrize(("repeat_mask", "variant"), [("official", "nonkv"), ("all", "kv")])
def test_predict_organ_release_mode_reproduces_official(cells, loaded, io, vocab, repeat_mask, variant):
    results = []
    for batch_size in (1, 6):
        out = sm.predict(
            cells,
            loaded,
            target="organ",
            constrained=False,
            repeat_mask=repeat_mask,
            pre_normalized=True,
            batch_size=batch_size,
            progress=False,
            copy=True,
        )
        results.append(out.obs)
    pd.testing.assert_frame_equal(results[0], results[1])
    obs = results[0]
    ids = io[f"organ.gen.{variant}.ids"]
    assert [r.split("; ") for r in obs["scmulan_organ_generated"]] == [_tokens(vocab, r) for r in ids]
    organs, regions = set(vocab.categories["organ"]), set(vocab.categories["region"])
    expect_organ = [t if t in organs else "Unclassified" for t in _tokens(vocab, ids[:, 0])]
    expect_region = [t if t in regions else "Unclassified" for t in _tokens(vocab, ids[:, 1])]
    assert list(obs["scmulan_organ"]) == expect_organ
    assert list(obs["scmulan_region"]) == expect_region


def test_embedding_alternatives_match_official_hidden_states(cells, loaded, io):
    lengths = io["annot.prompt_len"].numpy()
    hidden = io["annot.fwd.hidden"].numpy()
    task = sm.embed(cells, loaded, embedding="task", pre_normalized=True, progress=False, copy=True)
    mean = sm.embed(cells, loaded, embedding="mean", pre_normalized=True, progress=False, copy=True)
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(task.obsm["X_scmulan"][i], hidden[i, n - 1], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(mean.obsm["X_scmulan"][i], hidden[i, :n].mean(0), atol=1e-4, rtol=1e-4)
    official = sm.embed(
        cells, loaded, constrained=False, pre_normalized=True, progress=False, copy=True, key_added="mulan"
    )
    np.testing.assert_allclose(official.obsm["X_mulan"], io["annot.embedding"].numpy(), atol=1e-4, rtol=1e-4)
    assert official.uns["mulan"]["embed"]["params"]["embedding"] == "official"


# ----------------------------------------------------------------------------------------------------------
# constrained annotation, confidence, input safety
# ----------------------------------------------------------------------------------------------------------
def test_constrained_annotation_labels_and_confidence(cells, loaded, io, vocab):
    before_x = cells.X.copy()
    out = sm.predict(cells, loaded, min_confidence=0.0, pre_normalized=True, progress=False, copy=True)
    assert out is not cells
    assert "scmulan_cell_type" not in cells.obs  # copy=True leaves the input alone
    assert (cells.X != before_x).nnz == 0
    coarse_set, fine_set = set(vocab.categories["coarse_cell_type"]), set(vocab.categories["cell_type"])
    assert set(out.obs["scmulan_cell_type"]) <= coarse_set
    assert set(out.obs["scmulan_cell_type_fine"]) <= fine_set
    conf = out.obs["scmulan_confidence"].to_numpy()
    assert np.all((conf > 0) & (conf <= 1))
    assert out.obsm["X_scmulan"].shape == (6, loaded.config.dim)
    record = out.uns["scmulan"]["predict"]["cell_type"]
    assert record["params"]["constrained"] is True or record["params"]["constrained"] == 1
    assert record["gene_mapping"]["n_mapped"] == 2000
    assert record["checkpoint"]["official_file"] == "tiny_official.pt"

    # The confidence is the full-vocabulary probability of the coarse word times that of the fine word.
    model = loaded.model
    i = 0
    n = int(io["annot.prompt_len"][i])
    ids = io["annot.prompt_ids"][i, :n][None]
    lv = io["annot.prompt_levels"][i, :n][None]
    coarse_id = vocab.id(out.obs["scmulan_cell_type"].iloc[i])
    fine_id = vocab.id(out.obs["scmulan_cell_type_fine"].iloc[i])
    with torch.no_grad():
        first = model(ids, lv, heads="last")
        p1 = torch.softmax(first.logits[0, -1], -1)[coarse_id]
        level = torch.clamp(torch.round(first.expression[0, -1, coarse_id]), 0, 10).long()
        second = model(torch.cat([ids, torch.tensor([[coarse_id]])], 1), torch.cat([lv, level.view(1, 1)], 1))
        p2 = torch.softmax(second.logits[0, -1], -1)[fine_id]
    np.testing.assert_allclose(conf[i], float(p1 * p2), rtol=1e-4)
    # ... and the constrained coarse word is the best coarse token of that first step.
    coarse_ids = torch.as_tensor(vocab.category_ids("coarse_cell_type"))
    assert int(coarse_ids[first.logits[0, -1, coarse_ids].argmax()]) == coarse_id


def test_min_confidence_and_empty_cells(cells, loaded):
    strict = sm.predict(cells, loaded, min_confidence=1.01, pre_normalized=True, progress=False, copy=True)
    assert set(strict.obs["scmulan_cell_type"]) == {"Unclassified"}
    assert set(strict.obs["scmulan_cell_type_fine"]) == {"Unclassified"}

    x = cells.X.tolil()
    x[2, :] = 0  # no expressed vocabulary gene
    cells.X = x.tocsr()
    cells.X.eliminate_zeros()
    with pytest.warns(UserWarning, match="1 cells express none"):
        sm.predict(cells, loaded, min_confidence=0.0, pre_normalized=True, progress=False)
    assert cells.obs["scmulan_cell_type"].iloc[2] == "Unclassified"
    assert cells.obs["scmulan_cell_type_fine"].iloc[2] == "Unclassified"
    assert cells.obs["scmulan_confidence"].iloc[2] == 0.0
    assert not cells.obsm["X_scmulan"][2].any()
    assert cells.obs["scmulan_confidence"].drop(index="cell2").gt(0).all()
    assert cells.uns["scmulan"]["predict"]["cell_type"]["params"]["n_empty_cells"] == 1


def test_annotate_counts_input_is_not_modified_and_uns_writes(pbmc, loaded, tmp_path):
    a = pbmc[:24].copy()
    x0, counts0, var0 = a.X.copy(), a.layers["counts"].copy(), a.var.copy()
    sm.predict(a, loaded, progress=False, min_confidence=0.0, smoothing=True, n_neighbors=5, batch_size=7)
    assert sm.predict(a, loaded, target="organ", progress=False) is a
    assert (a.X != x0).nnz == 0
    assert (a.layers["counts"] != counts0).nnz == 0
    pd.testing.assert_frame_equal(a.var, var0)
    for col in ("scmulan_cell_type_smoothed", "scmulan_smoothing_score", "scmulan_organ", "scmulan_region"):
        assert col in a.obs
    assert set(a.obs["scmulan_organ"]) <= set(loaded.vocab.categories["organ"])
    assert set(a.obs["scmulan_region"]) <= set(loaded.vocab.categories["region"])
    assert set(a.uns["scmulan"]) == {"predict", "smooth_labels"}
    assert set(a.uns["scmulan"]["predict"]) == {"cell_type", "organ"}
    assert a.uns["scmulan"]["predict"]["cell_type"]["input"]["kind"] == "counts"
    a.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    assert back.uns["scmulan"]["predict"]["cell_type"]["params"]["repeat_mask"] == "official"


def test_annotate_meta_words_and_errors(cells, loaded):
    cells.obs["tissue"] = ["Blood"] * 5 + [np.nan]
    with_meta = sm.predict(
        cells,
        loaded,
        meta={"organ": "tissue"},
        min_confidence=0.0,
        pre_normalized=True,
        progress=False,
        copy=True,
    )
    plain = sm.predict(cells, loaded, min_confidence=0.0, pre_normalized=True, progress=False, copy=True)
    # The prepended word changes the model's input, so the embeddings differ (but not for the NaN cell).
    diff = np.abs(with_meta.obsm["X_scmulan"] - plain.obsm["X_scmulan"]).max(axis=1)
    assert np.all(diff[:5] > 1e-4)
    assert diff[5] < 1e-5
    cells.obs["tissue"] = ["Bloood"] * 6
    with pytest.raises(MsfmInputError, match="Bloood"):
        sm.predict(cells, loaded, meta={"organ": "tissue"}, pre_normalized=True, progress=False)
    with pytest.raises(MsfmInputError, match="not \\(vocabulary category: obs column\\)"):
        sm.predict(cells, loaded, meta={"organ": "nope"}, pre_normalized=True, progress=False)
    with pytest.raises(MsfmInputError, match="embedding"):
        sm.predict(cells, loaded, embedding="cls", pre_normalized=True, progress=False)
    with pytest.raises(MsfmInputError, match="does not exist"):
        sm.predict(cells, "/nonexistent/ckpt", pre_normalized=True, progress=False)


def test_smooth_labels_votes_by_inverse_distance():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 10.0]])
    rep = np.vstack([centres[0] + rng.normal(0, 0.5, (20, 2)), centres[1] + rng.normal(0, 0.5, (20, 2))])
    labels = np.array(["A"] * 20 + ["B"] * 20, dtype=object)
    labels[3] = "B"  # one outlier inside cluster A
    a = ad.AnnData(X=np.zeros((40, 1), dtype=np.float32))
    a.obsm["X_scmulan"] = rep
    a.obs["scmulan_cell_type_fine"] = pd.Categorical(labels)
    sm.smooth_labels(a, n_neighbors=5)
    smoothed = a.obs["scmulan_cell_type_smoothed"].astype(str).to_numpy()
    assert smoothed[3] == "A"
    assert (smoothed[:20] == "A").all()
    assert (smoothed[20:] == "B").all()
    assert a.obs["scmulan_smoothing_score"].between(0, 1).all()
    sm.smooth_labels(a, n_neighbors=5, threshold=1.01)
    assert set(a.obs["scmulan_cell_type_smoothed"]) == {"Unclassified"}


def test_long_prompts_are_truncated_to_top_genes(cells, loaded):
    config = loaded.config.model_copy(update={"max_length": 40})
    model = ScMulan(config)
    model.load_state_dict(loaded.model.state_dict())
    small = dataclasses.replace(loaded, model=model.eval(), config=config)
    with pytest.warns(UserWarning, match="5 cells .* truncated to their 37 top-expressed genes"):
        out = sm.predict(cells, small, min_confidence=0.0, pre_normalized=True, progress=False, copy=True)
    assert out.uns["scmulan"]["predict"]["cell_type"]["params"]["n_truncated_cells"] == 5
    with pytest.raises(MsfmInputError, match="max_new_tokens=100"):
        sm.generate({"organ": "Blood"}, small, max_new_tokens=100, progress=False)


# ----------------------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------------------
def _levels_of(adata: ad.AnnData, row: int) -> dict[str, int]:
    r = adata.layers["levels"][row]
    return {adata.var_names[j]: int(v) for j, v in zip(r.indices, r.data, strict=True)}


def _expected_genes(vocab: CellSentenceVocab, ids: torch.Tensor, levels: torch.Tensor) -> dict[str, int]:
    out: dict[str, int] = {}
    for i, lv in zip(ids.tolist(), levels.tolist(), strict=True):
        if i >= 0 and vocab.is_gene(np.array([i]))[0]:
            out[vocab.token(i)] = lv  # a repeated gene keeps its last level
    return {g: lv for g, lv in out.items() if lv > 0}


@pytest.mark.parametrize(("repeat_mask", "variant"), [("all", "kv"), ("official", "nonkv")])
def test_greedy_generation_reproduces_official(loaded, io, vocab, repeat_mask, variant):
    out = sm.generate(
        {"organ": "Blood", "cell_type": "T cell"},
        loaded,
        greedy=True,
        constrained=False,
        repeat_mask=repeat_mask,
        progress=False,
    )
    ids, levels = io[f"cg.gen.{variant}.ids"][0], io[f"cg.gen.{variant}.levels"][0]
    assert _levels_of(out, 0) == _expected_genes(vocab, ids, levels)
    assert out.obs["n_words"].iloc[0] == int(io[f"cg.gen.{variant}.n_new"][0])
    assert bool(out.obs["stopped_at_end"].iloc[0])


def test_greedy_perturbation_prompt_reproduces_official(loaded, io, vocab):
    # Fixture prompt 1 is [Bone marrow, Haematopoietic stem cell, <SPToken1>, GATA1@8]: a perturbation prompt.
    result = sm.perturb(
        {"organ": "Bone marrow", "cell_type": "Haematopoietic stem cell"},
        loaded,
        genes=["GATA1"],
        levels=[8],
        n_cells=1,
        greedy=True,
        constrained=False,
        repeat_mask="all",
        max_new_tokens=30,  # the official run stopped after 19 words
        progress=False,
    )
    cells, scores = result.cells, result.scores
    expected = _expected_genes(vocab, io["cg.gen.kv.ids"][1], io["cg.gen.kv.levels"][1])
    assert _levels_of(cells, 1) == {**expected, "GATA1": 8}
    assert list(scores["gene"]) == ["control", "GATA1"]


def test_generate_outputs_determinism_and_batch_independence(loaded, vocab, tmp_path):
    prompts = pd.DataFrame({"organ": ["Blood", "Heart"], "cell_type": ["T cell", np.nan]})
    kwargs = {"n_per_prompt": 3, "max_new_tokens": 24, "progress": False, "seed": 7}
    a = sm.generate(prompts, loaded, batch_size=1, **kwargs)
    b = sm.generate(prompts, loaded, batch_size=64, **kwargs)
    c = sm.generate(prompts, loaded, batch_size=4, **{**kwargs, "seed": 8})
    assert a.shape == (6, 2000)
    assert list(a.var_names) == vocab.genes
    assert {"organ", "cell_type", "prompt_id", "n_genes", "n_words", "stopped_at_end"} <= set(a.obs.columns)
    assert list(a.obs["prompt_id"]) == [0, 0, 0, 1, 1, 1]
    assert list(a.obs["organ"]) == ["Blood"] * 3 + ["Heart"] * 3
    assert a.obs["stopped_at_end"].dtype == bool
    assert (a.X != b.X).nnz == 0
    assert (a.layers["levels"] != b.layers["levels"]).nnz == 0
    pd.testing.assert_frame_equal(a.obs, b.obs)
    assert (a.X != c.X).nnz > 0
    # copies of one prompt are different samples; X is level / 10 of the integer levels
    assert (a.X[0] != a.X[1]).nnz > 0
    np.testing.assert_allclose(a.X.toarray() * 10, a.layers["levels"].toarray())
    assert a.obs["n_genes"].tolist() == np.diff(a.X.indptr).tolist()
    assert a.uns["scmulan"]["generate"]["params"]["seed"] == 7
    a.write_h5ad(tmp_path / "gen.h5ad")


def test_generate_errors_name_the_bad_input(loaded):
    with pytest.raises(MsfmInputError, match="Bloood"):
        sm.generate({"organ": "Bloood"}, loaded, progress=False)
    with pytest.raises(MsfmInputError, match="tisue"):
        sm.generate([{"tisue": "Blood"}], loaded, progress=False)
    with pytest.raises(MsfmInputError, match="prompts is empty"):
        sm.generate([], loaded, progress=False)
    with pytest.raises(MsfmInputError, match="temperature"):
        sm.generate({"organ": "Blood"}, loaded, temperature=0.0, progress=False)


def test_end_weight_controls_stopping(loaded):
    out = sm.generate({"organ": "Blood"}, loaded, n_per_prompt=4, end_weight=1e9, progress=False)
    assert out.obs["n_words"].eq(1).all()
    assert out.obs["stopped_at_end"].all()
    assert out.X.nnz == 0


def test_sampling_follows_the_model_distribution(loaded, vocab):
    """The per-cell Gumbel sampler draws from softmax(top-k(masked logits) / T)."""
    tokenizer = sm.tokenizer_for(loaded)
    prompt = tokenizer.prompts(None, meta={"organ": "Blood"}, task=GENERATE)
    n = 4000
    sentences = Sentences.from_lists([prompt.get(0)[0]] * n, [prompt.get(0)[1]] * n)
    options = DecodeOptions(
        max_new_tokens=1, greedy=False, temperature=0.7, top_k=5, seed=3, end_id=vocab.end_id
    )
    allowed = sampling.gene_end_mask(loaded)
    gen = sampling.generate_sentences(
        loaded,
        sentences,
        [(i,) for i in range(n)],
        options=options,
        allowed=allowed,
        batch_size=512,
        max_tokens=None,
        progress=False,
        desc="test",
    )
    drawn = np.array([int(ids[0]) for ids in gen.ids])
    with torch.no_grad():
        logits = loaded.model(torch.as_tensor(prompt.ids)[None], torch.as_tensor(prompt.levels)[None]).logits[
            0, -1
        ]
    logits = logits.masked_fill(~allowed, float("-inf"))
    top = torch.topk(logits, 5)
    probs = torch.softmax(top.values / 0.7, -1).numpy()
    assert set(drawn) <= set(top.indices.tolist())
    freq = np.array([(drawn == int(t)).mean() for t in top.indices])
    assert np.abs(freq - probs).sum() / 2 < 0.04


# ----------------------------------------------------------------------------------------------------------
# perturbation
# ----------------------------------------------------------------------------------------------------------
def test_perturb_with_reference_scores(loaded, pbmc, tmp_path):
    result = sm.perturb(
        {"organ": "Bone marrow", "cell_type": "Haematopoietic stem cell"},
        loaded,
        genes=["SPI1", "GATA1"],
        levels=[0, 10],
        n_cells=6,
        reference=pbmc,
        group_key="cell_type",
        source="CD34+",
        targets=["CD14+ Monocyte", "CD19+ B"],
        max_new_tokens=48,
        progress=False,
    )
    cells, scores = result.cells, result.scores
    assert list(
        zip(scores["gene"], [-1 if pd.isna(v) else int(v) for v in scores["level"]], strict=True)
    ) == [
        ("control", -1),
        ("SPI1", 0),
        ("SPI1", 10),
        ("GATA1", 0),
        ("GATA1", 10),
    ]
    assert (scores["n_cells"] == 6).all()
    for t in ("CD14+ Monocyte", "CD19+ B"):
        s = scores[f"score_{t}"].to_numpy(dtype=float)
        assert np.isfinite(s).all()
        assert (np.abs(s) <= 1).all()
        vc = scores[f"score_{t}_vs_control"].to_numpy(dtype=float)
        assert np.isnan(vc[0])
        assert (np.abs(vc[1:]) <= 1).all()
        assert np.isfinite(scores[f"projection_{t}"]).all()
    assert scores["shift_vs_control"].iloc[0] == 0.0
    assert (scores["shift_vs_control"].iloc[1:] > 0).all()
    assert (scores["shift_norm"] > 0).all()
    assert cells.n_obs == 5 * 6
    assert cells.obsm["X_reference_pca"].shape == (30, 10)
    # The forced word is part of every generated cell: level 10 -> 1.0, level 0 -> absent.
    gata1 = cells.var_names.get_loc("GATA1")
    col = cells.X[:, gata1].toarray().ravel()
    assert (col[cells.obs["condition"] == "GATA1@10"] == 1.0).all()
    assert (col[cells.obs["condition"] == "GATA1@0"] == 0.0).all()
    assert "GATA1" not in scores["top_changed"].iloc[4]
    cells.write_h5ad(tmp_path / "p.h5ad")
    scores.to_csv(tmp_path / "s.csv", index=False)


def test_reference_pca_matches_a_dense_pca(loaded, pbmc):
    from sklearn.decomposition import PCA

    from msfm.data.normalize import normalized_rows

    ref = reference.reference_pca(
        pbmc,
        loaded,
        group_key="cell_type",
        source="CD34+",
        targets=["CD19+ B"],
        n_pcs=5,
        chunk_size=128,  # several chunks: the streamed sums must add up
    )
    source = CellSource(pbmc)
    binned = sm.tokenizer_for(loaded).binned_matrix(normalized_rows(source, None, ref.mapping))
    dense = binned.toarray().astype(np.float64)
    np.testing.assert_allclose(ref.mean, dense.mean(0), atol=1e-9)
    # Genes no reference cell expresses carry no variance: zero loadings; the rest is an ordinary PCA.
    active = dense.any(axis=0)
    assert not ref.components[:, ~active].any()
    pca = PCA(n_components=5, svd_solver="full").fit(dense[:, active])
    np.testing.assert_allclose(np.abs((ref.components[:, active] * pca.components_).sum(1)), 1.0, atol=1e-6)
    groups = pbmc.obs["cell_type"].astype(str).to_numpy()
    np.testing.assert_allclose(ref.source, dense[groups == "CD34+"].mean(0), atol=1e-9)
    np.testing.assert_allclose(ref.targets["CD19+ B"], dense[groups == "CD19+ B"].mean(0), atol=1e-9)


def test_perturb_without_reference_and_screen(loaded):
    kwargs = {"n_cells": 4, "max_new_tokens": 24, "progress": False}
    result = sm.perturb({"organ": "Blood"}, loaded, genes="SPI1,CD3E", levels=[10], **kwargs)
    cells, scores = result.cells, result.scores
    assert list(scores["gene"]) == ["control", "SPI1", "CD3E"]
    assert not any(c.startswith("score_") for c in scores.columns)
    assert scores["delta_vs_control"].iloc[0] == 0.0
    assert (scores["delta_vs_control"].iloc[1:] > 0).all()
    # same seed, other batching: the same cells
    again = sm.perturb("organ=Blood", loaded, genes=["SPI1", "CD3E"], levels=[10], batch_size=3, **kwargs)
    assert (cells.X != again.cells.X).nnz == 0
    screen = sm.perturb_screen({"organ": "Blood"}, loaded, genes=["SPI1", "CD3E", "GATA1"], **kwargs)
    assert screen.sort_by == "delta_vs_control"
    ranked = screen.scores
    assert list(ranked["gene"])[-1] == "control"
    d = ranked["delta_vs_control"].to_numpy()[:-1]
    assert (np.diff(d) <= 0).all()
    assert (ranked["level"].iloc[:-1] == 10).all()


def test_perturb_errors(loaded, pbmc):
    prompt = {"organ": "Blood"}
    with pytest.raises(MsfmInputError, match="NOTAGENE"):
        sm.perturb(prompt, loaded, genes=["SPI1", "NOTAGENE"], progress=False)
    with pytest.raises(MsfmInputError, match="Blood"):
        sm.perturb(prompt, loaded, genes=["Blood"], progress=False)  # a token, but not a gene
    with pytest.raises(MsfmInputError, match="levels"):
        sm.perturb(prompt, loaded, genes=["SPI1"], levels=[11], progress=False)
    with pytest.raises(MsfmInputError, match="HSC"):
        sm.perturb(
            prompt,
            loaded,
            genes=["SPI1"],
            levels=[10],
            reference=pbmc,
            group_key="cell_type",
            source="HSC",
            progress=False,
        )
    with pytest.raises(MsfmInputError, match="reference"):
        sm.perturb(prompt, loaded, genes=["SPI1"], levels=[10], group_key="cell_type", progress=False)


# ----------------------------------------------------------------------------------------------------------
# next state
# ----------------------------------------------------------------------------------------------------------
def test_next_state_one_cell_per_input(pbmc, loaded):
    a = pbmc[:9].copy()
    out = sm.next_state(a, loaded, max_new_tokens=24, batch_size=4, progress=False)
    assert out.n_obs == a.n_obs
    assert out.n_vars == len(loaded.vocab.genes)
    assert list(out.obs["source_cell"]) == list(a.obs_names)
    assert out.uns["scmulan"]["next_state"]["params"]["max_new_tokens"] == 24
    same = sm.next_state(a, loaded, max_new_tokens=24, batch_size=1, progress=False)
    assert (out.X != same.X).nnz == 0
    two = sm.next_state(a, loaded, n_per_cell=2, max_new_tokens=8, progress=False)
    assert two.n_obs == 18
    assert list(two.obs["source_cell"][:2]) == [a.obs_names[0]] * 2
