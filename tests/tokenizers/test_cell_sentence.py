"""scMulan vocabulary and c-sentence tokenizer: official ids, exact parity with the official prompts, edge cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from safetensors.torch import load_file

from msfm.data.resources import resource_path
from msfm.errors import MsfmInputError
from msfm.tokenizers.cell_sentence import (
    ANNOTATE,
    END,
    GENERATE,
    NEXT_STATE,
    ORGAN_REGION,
    CellSentenceTokenizer,
    CellSentenceVocab,
    Sentences,
    bin_levels,
)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "scmulan" / "tiny_official_io.safetensors"


@pytest.fixture(scope="module")
def vocab() -> CellSentenceVocab:
    return CellSentenceVocab.official()


@pytest.fixture(scope="module")
def tok(vocab) -> CellSentenceTokenizer:
    return CellSentenceTokenizer(vocab)


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE)


@pytest.fixture(scope="module")
def cells(io) -> sp.csr_matrix:
    return sp.csr_matrix(io["cells.expr_2000"].numpy())


def _unpad(ids: torch.Tensor, levels: torch.Tensor, lengths: torch.Tensor) -> tuple[list, list]:
    n = lengths.tolist()
    return [ids[i, :k].tolist() for i, k in enumerate(n)], [levels[i, :k].tolist() for i, k in enumerate(n)]


# ---------------------------------------------------------------------------------------------------------------
# Official vocabulary
# ---------------------------------------------------------------------------------------------------------------


def test_official_vocab_matches_meta_info(vocab):
    meta = json.loads(resource_path("scmulan", "meta_info.json").read_text())
    assert len(vocab) == 2222
    assert vocab.tokens == meta["token_set"]
    assert vocab.genes == meta["gene_set"]
    np.testing.assert_array_equal(vocab.gene_ids, np.arange(1, 2001))
    assert vocab.gene_ids.dtype == np.int64


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("<E>", 0),
        ("A2M", 1),
        ("CD3E", 284),
        ("GATA1", 699),
        ("Lung", 2001),
        ("Heart", 2007),
        ("Unclassified", 2010),
        ("T cell", 2020),
        ("late E", 2122),
        ("60 year", 2126),
        ("Healthy", 2160),
        ("PBMC", 2173),
        ("10X", 2203),
        ("F", 2204),
        ("M", 2205),
        ("<PCT>", 2206),
        ("<SPToken1>", 2207),
        ("<SPToken2>", 2208),
        ("<SPToken3>", 2209),
    ],
)
def test_official_spot_ids(vocab, token, expected):
    assert vocab.id(token) == expected
    assert vocab.token(expected) == token
    assert token in vocab


def test_official_special_ids_and_categories(vocab):
    assert (vocab.end_id, vocab.annotate_id, vocab.generate_id) == (0, 2206, 2207)
    assert (vocab.next_state_id, vocab.organ_region_id) == (2208, 2209)
    assert (END, ANNOTATE, GENERATE, NEXT_STATE, ORGAN_REGION) == (
        "<E>",
        "<PCT>",
        "<SPToken1>",
        "<SPToken2>",
        "<SPToken3>",
    )
    sizes = {k: len(v) for k, v in vocab.categories.items()}
    assert sizes["organ"] == 7
    assert sizes["region"] == 39
    assert sizes["cell_type"] == 109
    assert sizes["coarse_cell_type"] == 29
    assert set(vocab.categories) == {
        "organ",
        "region",
        "coarse_cell_type",
        "cell_type",
        "age",
        "status",
        "technology",
        "sex",
    }
    ct = vocab.cell_type_ids
    assert ct.size == 114
    # The 114 cell-type entities are exactly the block 2008..2121.
    np.testing.assert_array_equal(ct, np.arange(2008, 2122))
    np.testing.assert_array_equal(vocab.category_ids("organ"), np.arange(2001, 2008))
    # Regions reuse the five organ tokens that are also regions (Lung, Thymus, Bone marrow, Brain, Liver).
    regions = vocab.category_ids("region")
    assert set(regions.tolist()) & set(range(2001, 2008)) == {2001, 2002, 2003, 2005, 2006}
    assert vocab.category_ids().size == 0


def test_vocab_lookup_helpers(vocab):
    np.testing.assert_array_equal(vocab.ids(["A2M", "<PCT>"]), [1, 2206])
    assert vocab.ids(["A2M"]).dtype == np.int64
    assert vocab.decode(np.array([1, 2206])) == ["A2M", "<PCT>"]
    assert vocab.decode(torch.tensor([0])) == ["<E>"]
    np.testing.assert_array_equal(
        vocab.is_gene(np.array([-1, 0, 1, 2000, 2001, 2221, 5000])),
        [False, False, True, True, False, False, False],
    )
    assert 12 not in vocab
    assert "nope" not in vocab


def test_unknown_token_suggests_close_match(vocab):
    with pytest.raises(MsfmInputError, match=r"'GATA11'.*Did you mean 'GATA1'"):
        vocab.id("GATA11")
    with pytest.raises(MsfmInputError, match="out of range"):
        vocab.token(2222)
    with pytest.raises(MsfmInputError, match=r"Unknown metadata category 'MCT'.*coarse_cell_type"):
        vocab.category_ids("MCT")


# ---------------------------------------------------------------------------------------------------------------
# Binning
# ---------------------------------------------------------------------------------------------------------------


def test_bin_levels_dossier_example():
    np.testing.assert_array_equal(bin_levels(np.array([0.35, 1.2, 2.8, 3.1, 0.7])), [2, 4, 10, 10, 3])


def test_bin_levels_float64_edges():
    # float32(0.1) = 0.100000001490... lies just above the float64 edge 0.1 (max 1.0): level 2 in float64.
    # With float32 bins (numpy >= 2 on float32 input) the edge is float32(0.1) itself and the level would be 1.
    values = np.array([0.1, 1.0], dtype=np.float32)
    np.testing.assert_array_equal(bin_levels(values), [2, 10])
    float32_bins = np.linspace(np.float32(0), values.max(), 11)
    assert float32_bins.dtype == np.float32
    assert np.digitize(values, float32_bins, right=True).tolist() == [1, 10]
    # The batched path of the tokenizer follows the same float64 rule.
    tok = CellSentenceTokenizer(CellSentenceVocab.official(), gene_order="forward")
    X = sp.csr_matrix((values, np.array([0, 1]), np.array([0, 2])), shape=(1, 2000))
    assert tok.gene_sentences(X).get(0)[1].tolist() == [2, 10]
    np.testing.assert_allclose(tok.binned_matrix(X).data, [0.2, 1.0])


def test_bin_levels_single_and_errors():
    np.testing.assert_array_equal(bin_levels(np.array([0.3])), [10])
    assert bin_levels(np.zeros(0)).size == 0
    np.testing.assert_array_equal(bin_levels(np.array([1.0, 2.0]), n_levels=4), [2, 4])
    with pytest.raises(MsfmInputError, match="> 0"):
        bin_levels(np.array([0.0, 1.0]))
    with pytest.raises(MsfmInputError):
        bin_levels(np.array([np.nan, 1.0]))


def test_vectorised_levels_match_bin_levels(tok):
    rng = np.random.default_rng(3)
    X = sp.random(300, 2000, density=0.03, format="csr", dtype=np.float32, random_state=rng)
    X.data = np.log1p(X.data * 50).astype(np.float32)
    # Exact ties with bin edges: multiples of max/10.
    X.data[::7] = np.float32(0.3)
    X.data[::11] = np.float32(3.0)
    sent = CellSentenceTokenizer(tok.vocab, gene_order="forward").gene_sentences(X)
    for i in range(X.shape[0]):
        row = X.getrow(i)
        ids, levels = sent.get(i)
        np.testing.assert_array_equal(ids, row.indices + 1)
        np.testing.assert_array_equal(levels, bin_levels(row.data))


# ---------------------------------------------------------------------------------------------------------------
# Parity with the official prompts
# ---------------------------------------------------------------------------------------------------------------


def test_annotation_prompts_match_official(tok, io, cells):
    prompts = tok.prompts(tok.gene_sentences(cells), task=ANNOTATE)
    want_ids, want_levels = _unpad(io["annot.prompt_ids"], io["annot.prompt_levels"], io["annot.prompt_len"])
    assert len(prompts) == 6
    np.testing.assert_array_equal(prompts.lengths(), io["annot.prompt_len"].numpy())
    for i in range(6):
        ids, levels = prompts.get(i)
        assert ids.tolist() == want_ids[i]
        assert levels.tolist() == want_levels[i]
        assert np.all(np.diff(ids[:-1]) < 0)  # reverse-alphabetical
    # The padded form equals the fixture's layout once -1 padding is applied.
    ids_t, levels_t, mask = tok.right_pad(prompts, pad_id=-1)
    levels_t[~mask] = -1
    assert torch.equal(ids_t, io["annot.prompt_ids"])
    assert torch.equal(levels_t, io["annot.prompt_levels"])


def test_organ_prompts_match_official(tok, io, cells):
    prompts = tok.prompts(tok.gene_sentences(cells), task=ORGAN_REGION)
    ids_t, levels_t, mask = tok.right_pad(prompts, pad_id=-1)
    levels_t[~mask] = -1
    assert torch.equal(ids_t, io["organ.prompt_ids"])
    assert torch.equal(levels_t, io["annot.prompt_levels"])


def test_generation_prompts_match_official(tok, io):
    prompts = tok.prompts(
        None,
        meta=[
            {"organ": "Blood", "cell_type": "T cell"},
            {"organ": "Bone marrow", "cell_type": "Haematopoietic stem cell"},
        ],
        task=GENERATE,
        answer_prefix=[[], [("GATA1", 8)]],
    )
    ids_t, levels_t, mask = tok.right_pad(prompts, pad_id=-1)
    levels_t[~mask] = -1
    assert torch.equal(ids_t, io["cg.prompt_ids"])
    assert torch.equal(levels_t, io["cg.prompt_levels"])
    np.testing.assert_array_equal(prompts.lengths(), io["cg.prompt_len"].numpy())


def test_prompt_meta_for_all_cells_and_skipped_values(tok, cells):
    genes = tok.gene_sentences(cells[:2])
    meta = {"organ": "Blood", "region": None, "sex": "Unclassified", "age": float("nan"), "status": "Healthy"}
    prompts = tok.prompts(genes, meta=meta, task=ANNOTATE)
    for i in range(2):
        ids, levels = prompts.get(i)
        gene_ids, gene_levels = genes.get(i)
        assert ids[:2].tolist() == [2004, 2160]
        assert ids[2:-1].tolist() == gene_ids.tolist()
        assert ids[-1] == 2206
        assert levels.tolist() == [0, 0, *gene_levels.tolist(), 0]


def test_prompt_without_anything_is_one_task_word(tok):
    prompts = tok.prompts(None, task=NEXT_STATE)
    assert len(prompts) == 1
    assert prompts.get(0)[0].tolist() == [2208]


# ---------------------------------------------------------------------------------------------------------------
# Prompt errors
# ---------------------------------------------------------------------------------------------------------------


def test_unknown_meta_value_lists_allowed_and_suggests(tok):
    with pytest.raises(MsfmInputError) as err:
        tok.prompts(None, meta={"organ": "Hart"}, task=GENERATE)
    text = str(err.value)
    assert "'Hart'" in text
    assert "Did you mean 'Heart'" in text
    assert "'Lung'" in text  # the allowed values are listed
    # A token of another category is not a valid value here.
    with pytest.raises(MsfmInputError, match="'T cell' for category 'organ'"):
        tok.prompts(None, meta={"organ": "T cell"}, task=GENERATE)


def test_unknown_category_lists_categories(tok):
    with pytest.raises(MsfmInputError, match=r"'tissue'.*'organ'"):
        tok.prompts(None, meta={"tissue": "Heart"}, task=GENERATE)


def test_prompt_argument_errors(tok, cells):
    genes = tok.gene_sentences(cells[:2])
    with pytest.raises(MsfmInputError, match="task"):
        tok.prompts(genes, task="annotate")
    with pytest.raises(MsfmInputError, match="task"):
        tok.prompts(genes, task="Heart")
    with pytest.raises(MsfmInputError, match="different numbers of cells"):
        tok.prompts(genes, meta=[{"organ": "Heart"}], task=ANNOTATE)
    with pytest.raises(MsfmInputError, match="level"):
        tok.prompts(None, task=GENERATE, answer_prefix=[[("SPI1", 11)]])
    with pytest.raises(MsfmInputError, match="SPI11"):
        tok.prompts(None, task=GENERATE, answer_prefix=[[("SPI11", 3)]])
    with pytest.raises(MsfmInputError, match="pairs"):
        tok.prompts(None, task=GENERATE, answer_prefix=[["SPI1"]])


# ---------------------------------------------------------------------------------------------------------------
# Gene sentences: edge cases and options
# ---------------------------------------------------------------------------------------------------------------


def test_empty_and_single_gene_cells(tok):
    # Row 1 holds one gene; row 2 only an explicit zero, which is not expressed.
    X = sp.csr_matrix(
        (np.array([0.4, 0.0], dtype=np.float32), np.array([5, 7]), np.array([0, 0, 1, 2])), shape=(3, 2000)
    )
    assert X.nnz == 2
    sent = tok.gene_sentences(X)
    np.testing.assert_array_equal(sent.lengths(), [0, 1, 0])
    ids, levels = sent.get(1)
    assert ids.tolist() == [6]
    assert levels.tolist() == [10]
    prompts = tok.prompts(sent, task=ANNOTATE)
    assert prompts.get(0)[0].tolist() == [2206]


@pytest.mark.parametrize("bad", [-0.5, np.nan, np.inf])
def test_bad_values_name_the_row(tok, bad):
    X = sp.lil_matrix((4, 2000), dtype=np.float32)
    X[0, 1] = 1.0
    X[2, 3] = bad
    with pytest.raises(MsfmInputError, match=r"row\) 2 .*'ABCA8'"):
        tok.gene_sentences(X.tocsr())


def test_wrong_number_of_genes(tok):
    with pytest.raises(MsfmInputError, match="1999 gene columns"):
        tok.gene_sentences(sp.csr_matrix((2, 1999), dtype=np.float32))


def test_gene_orders_and_max_genes(vocab, cells):
    rev = CellSentenceTokenizer(vocab).gene_sentences(cells)
    fwd = CellSentenceTokenizer(vocab, gene_order="forward").gene_sentences(cells)
    rnd_tok = CellSentenceTokenizer(vocab, gene_order="random")
    rnd = rnd_tok.gene_sentences(cells, rng=np.random.default_rng(0))
    rnd_again = rnd_tok.gene_sentences(cells, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(rnd.ids, rnd_again.ids)
    for i in range(len(rev)):
        r_ids, r_lv = rev.get(i)
        f_ids, f_lv = fwd.get(i)
        x_ids, x_lv = rnd.get(i)
        assert f_ids.tolist() == r_ids[::-1].tolist()
        assert f_lv.tolist() == r_lv[::-1].tolist()
        assert dict(zip(x_ids.tolist(), x_lv.tolist(), strict=True)) == dict(
            zip(r_ids.tolist(), r_lv.tolist(), strict=True)
        )
    assert not np.array_equal(rnd.ids, rev.ids)
    with pytest.raises(MsfmInputError, match="rng"):
        rnd_tok.gene_sentences(cells)

    # max_genes: the top values, ties broken by the lower gene id; levels still relative to the cell's maximum.
    X = sp.csr_matrix(np.array([[0.0, 1.0, 3.0, 1.0, 2.0, 0.5] + [0.0] * 1994], dtype=np.float32))
    top = CellSentenceTokenizer(vocab, max_genes=3, gene_order="forward").gene_sentences(X)
    ids, levels = top.get(0)
    assert ids.tolist() == [2, 3, 5]  # columns 1 (1.0, lower id of the tie), 2 (3.0), 4 (2.0)
    assert levels.tolist() == bin_levels(np.array([1.0, 3.0, 2.0])).tolist()
    # All-present cells in the fixture: max_genes larger than any cell changes nothing.
    big = CellSentenceTokenizer(vocab, max_genes=1000).gene_sentences(cells)
    np.testing.assert_array_equal(big.ids, rev.ids)


def test_tokenizer_option_errors(vocab):
    with pytest.raises(MsfmInputError, match="gene_order"):
        CellSentenceTokenizer(vocab, gene_order="alphabetical")  # type: ignore[arg-type]
    with pytest.raises(MsfmInputError, match="max_genes"):
        CellSentenceTokenizer(vocab, max_genes=0)
    with pytest.raises(MsfmInputError, match="n_levels"):
        CellSentenceTokenizer(vocab, n_levels=0)


def test_sparse_input_is_not_densified(tok, monkeypatch):
    rng = np.random.default_rng(0)
    X = sp.random(5000, 2000, density=0.01, format="csr", dtype=np.float32, random_state=rng)
    X.data += np.float32(0.01)

    def boom(*args, **kwargs):
        raise AssertionError("the matrix was densified")

    monkeypatch.setattr(sp.csr_matrix, "toarray", boom)
    monkeypatch.setattr(sp.csr_matrix, "todense", boom)
    sent = tok.gene_sentences(X)
    np.testing.assert_array_equal(sent.lengths(), np.diff(X.indptr))
    assert tok.binned_matrix(X).nnz == X.nnz


def test_caller_matrix_is_not_modified(tok):
    X = sp.csr_matrix(
        (np.array([1.0, 2.0], dtype=np.float32), np.array([3, 3]), np.array([0, 2])), shape=(1, 2000)
    )  # duplicate entries: summed to 3.0
    before = (X.data.copy(), X.indices.copy())
    ids, levels = tok.gene_sentences(X).get(0)
    assert ids.tolist() == [4]
    assert levels.tolist() == [10]
    np.testing.assert_array_equal(X.data, before[0])
    np.testing.assert_array_equal(X.indices, before[1])


# ---------------------------------------------------------------------------------------------------------------
# Padding
# ---------------------------------------------------------------------------------------------------------------


def test_left_and_right_pad(tok):
    sent = Sentences.from_lists([[5, 6, 7], [8], []], [[1, 2, 3], [4], []])
    ids, levels, mask = tok.left_pad(sent)
    assert ids.dtype == torch.int64
    assert levels.dtype == torch.int64
    assert mask.dtype == torch.bool
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert levels.tolist() == [[1, 2, 3], [0, 0, 4], [0, 0, 0]]
    assert mask.tolist() == [[True, True, True], [False, False, True], [False, False, False]]

    ids, levels, mask = tok.right_pad(sent, [1, 0], pad_id=-1)
    assert ids.tolist() == [[8, -1, -1], [5, 6, 7]]
    assert levels.tolist() == [[4, 0, 0], [1, 2, 3]]
    assert mask.tolist() == [[True, False, False], [True, True, True]]

    ids, _, mask = tok.left_pad(sent, [1])
    assert ids.tolist() == [[8]]
    assert mask.tolist() == [[True]]
    ids, _, _ = tok.left_pad(sent, [])
    assert tuple(ids.shape) == (0, 0)
    idx = np.array([-1, 0])
    tok.left_pad(sent, idx)
    assert idx.tolist() == [-1, 0]  # the caller's index array is left alone
    with pytest.raises(MsfmInputError, match="out of range"):
        tok.left_pad(sent, [3])


def test_sentences_container():
    sent = Sentences.from_lists([[1, 2], [], [3]], [[4, 5], [], [6]])
    assert len(sent) == 3
    np.testing.assert_array_equal(sent.lengths(), [2, 0, 1])
    assert sent.get(-1)[0].tolist() == [3]
    with pytest.raises(MsfmInputError):
        Sentences.from_lists([[1, 2]], [[1]])
    with pytest.raises(MsfmInputError):
        Sentences(np.zeros(2), np.zeros(2), np.array([0, 1]))


# ---------------------------------------------------------------------------------------------------------------
# Back to matrices
# ---------------------------------------------------------------------------------------------------------------


def test_binned_matrix_equals_decoded_gene_sentences(tok, cells):
    sent = tok.gene_sentences(cells)
    ids_list = [sent.get(i)[0] for i in range(len(sent))]
    levels_list = [sent.get(i)[1] for i in range(len(sent))]
    from_sentences = tok.sentences_to_matrix(ids_list, levels_list)
    binned = tok.binned_matrix(cells)
    assert binned.dtype == np.float32
    assert from_sentences.dtype == np.float32
    assert binned.shape == from_sentences.shape == (6, 2000)
    assert (binned != from_sentences).nnz == 0
    assert binned.max() == pytest.approx(1.0)
    assert binned.nnz == cells.nnz


def test_sentences_to_matrix_ignores_non_genes_and_last_wins(tok):
    ids = [np.array([2004, 2020, 2207, 699, 1738, 699, 0]), np.array([2206])]
    levels = [np.array([0, 0, 0, 8, 3, 2, 1]), np.array([0])]
    out = tok.sentences_to_matrix(ids, levels)
    assert out.shape == (2, 2000)
    dense = out.toarray()
    assert dense[0, 698] == pytest.approx(0.2)  # GATA1: the last level (2) wins
    assert dense[0, 1737] == pytest.approx(0.3)  # SPI1
    assert out.getrow(0).nnz == 2
    assert out.getrow(1).nnz == 0
    with pytest.raises(MsfmInputError, match="level 11"):
        tok.sentences_to_matrix([np.array([5])], [np.array([11])])


# ---------------------------------------------------------------------------------------------------------------
# Building a new vocabulary
# ---------------------------------------------------------------------------------------------------------------


def test_build_layout_dedup_and_unclassified():
    vocab = CellSentenceVocab.build(
        ["TP53", "ACTB", "CD3E", "ACTB"],
        {"organ": ["Lung", "Heart", "Lung"], "region": ["Lung", "Alveoli"], "sex": ["M", "F"]},
        n_special=4,
    )
    assert vocab.tokens == [
        "<E>",
        "ACTB",
        "CD3E",
        "TP53",
        "Heart",
        "Lung",
        "Alveoli",
        "F",
        "M",
        "Unclassified",
        "<PCT>",
        "<SPToken1>",
        "<SPToken2>",
        "<SPToken3>",
        "<SPToken4>",
    ]
    assert vocab.genes == ["ACTB", "CD3E", "TP53"]
    np.testing.assert_array_equal(vocab.gene_ids, [1, 2, 3])
    assert vocab.categories["region"] == ["Lung", "Alveoli"]  # id order: the organ token is reused
    np.testing.assert_array_equal(vocab.category_ids("organ", "region"), [4, 5, 6])
    assert vocab.cell_type_ids.size == 0
    assert (vocab.annotate_id, vocab.generate_id, vocab.next_state_id, vocab.organ_region_id) == (
        10,
        11,
        12,
        13,
    )

    # "Unclassified" given as a category value is placed with that category, not duplicated.
    with_unc = CellSentenceVocab.build(["G1"], {"cell_type": ["T cell", "Unclassified"]})
    assert with_unc.tokens[:4] == ["<E>", "G1", "T cell", "Unclassified"]
    assert with_unc.tokens.count("Unclassified") == 1
    assert len(with_unc) == 4 + 1 + 15


def test_build_save_load_round_trip_and_hash(tmp_path):
    vocab = CellSentenceVocab.build(["B", "A"], {"organ": ["Heart"], "cell_type": ["T cell", "B cell"]})
    same = CellSentenceVocab.build(["A", "B"], {"organ": ["Heart"], "cell_type": ["B cell", "T cell"]})
    assert vocab.sha256() == same.sha256()
    assert len(vocab.sha256()) == 64
    other = CellSentenceVocab.build(["A", "B", "C"], {"organ": ["Heart"]})
    assert other.sha256() != vocab.sha256()

    path = vocab.save(tmp_path / "vocab.json")
    loaded = CellSentenceVocab.load(path)
    assert loaded == vocab
    assert loaded.sha256() == vocab.sha256()
    assert CellSentenceVocab.from_dict(vocab.to_dict()) == vocab
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.json"]  # no temporary debris

    # The official vocabulary round-trips too and keeps its ids.
    official = CellSentenceVocab.official()
    official.save(tmp_path / "official.json")
    assert CellSentenceVocab.load(tmp_path / "official.json").tokens == official.tokens

    tampered = vocab.to_dict()
    tampered["tokens"] = [*tampered["tokens"][:-1], "<SPToken99>"]
    with pytest.raises(MsfmInputError, match="hash"):
        CellSentenceVocab.from_dict(tampered)
    with pytest.raises(MsfmInputError, match="format"):
        CellSentenceVocab.from_dict({"tokens": []})
    with pytest.raises(MsfmInputError, match="does not exist"):
        CellSentenceVocab.load(tmp_path / "missing.json")


def test_build_errors():
    with pytest.raises(MsfmInputError, match="no genes"):
        CellSentenceVocab.build([], {"organ": ["Heart"]})
    with pytest.raises(MsfmInputError, match="reserved task tokens"):
        CellSentenceVocab.build(["A"], {"organ": ["<PCT>"]})
    with pytest.raises(MsfmInputError, match="reserved task tokens"):
        CellSentenceVocab.build(["A"], {"organ": ["<SPToken7>"]})
    with pytest.raises(MsfmInputError, match="non-empty strings"):
        CellSentenceVocab.build(["A"], {"organ": ["Heart", 3]})
    with pytest.raises(MsfmInputError, match="non-empty strings"):
        CellSentenceVocab.build(["A", None], {})
    with pytest.raises(MsfmInputError, match="single string"):
        CellSentenceVocab.build(["A"], {"organ": "Heart"})
    with pytest.raises(MsfmInputError, match="n_special"):
        CellSentenceVocab.build(["A"], {}, n_special=2)
    with pytest.raises(MsfmInputError, match="also gene symbols"):
        CellSentenceVocab.build(["A", "M"], {"sex": ["M", "F"]})


def test_custom_vocab_end_to_end():
    vocab = CellSentenceVocab.build(["G3", "G1", "G2"], {"organ": ["Heart", "Lung"], "sex": ["F", "M"]})
    tok = CellSentenceTokenizer(vocab)
    X = sp.csr_matrix(np.array([[0.0, 2.0, 1.0], [0.5, 0.0, 0.0]], dtype=np.float32))
    prompts = tok.prompts(
        tok.gene_sentences(X), meta=[{"organ": "Lung", "sex": "F"}, {"sex": "M"}], task=GENERATE
    )
    assert vocab.decode(prompts.get(0)[0]) == ["Lung", "F", "G3", "G2", "<SPToken1>"]
    assert prompts.get(0)[1].tolist() == [0, 0, 5, 10, 0]
    assert vocab.decode(prompts.get(1)[0]) == ["M", "G1", "<SPToken1>"]


def test_vocabulary_module_and_the_public_names_are_one_object() -> None:
    import msfm.tokenizers as tk
    from msfm.tokenizers import cell_sentence, cell_sentence_vocab

    assert tk.CellSentenceVocab is cell_sentence.CellSentenceVocab is cell_sentence_vocab.CellSentenceVocab
    assert cell_sentence.END == cell_sentence_vocab.END == "<E>"
    assert tk.CellSentenceTokenizer is cell_sentence.CellSentenceTokenizer
