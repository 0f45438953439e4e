"""Perturbation data: condition parsing and validation, splits, control pools, gene graphs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from msfm.data.gene_graph import coexpression_graph, read_gene_graph
from msfm.data.perturbation import build_design, control_pools, make_split, parse_condition
from msfm.errors import MsfmInputError

GENES = [f"G{i}" for i in range(10)]


def _obs(labels: dict[str, int], group: str | None = None) -> pd.DataFrame:
    cond = [c for c, n in labels.items() for _ in range(n)]
    obs = pd.DataFrame({"condition": cond})
    if group is not None:
        obs["cell_type"] = group
    return obs


def test_parse_gears_and_label_conditions():
    assert parse_condition("ctrl").kind == "control"
    assert parse_condition("G1+ctrl").tokens == ("G1",)
    assert parse_condition("ctrl+G1").tokens == ("G1",)
    assert parse_condition("G1+G2").tokens == ("G1", "G2")
    stim = parse_condition("stim")
    assert (stim.kind, stim.tokens) == ("label", ("stim",))


@pytest.mark.parametrize("label", ["A+B+C", "+ctrl", "ctrl+ctrl", "A+A", "A+"])
def test_malformed_gears_labels_are_refused(label):
    with pytest.raises(MsfmInputError, match="not a valid GEARS label"):
        parse_condition(label)


def test_design_counts_groups_and_pairs():
    obs = pd.concat([_obs({"ctrl": 5, "stim": 4}, "A"), _obs({"ctrl": 3, "stim": 6}, "B")], ignore_index=True)
    d = build_design(obs, match_key="cell_type", min_cells=4)
    assert d.conditions == ("stim",)
    assert d.groups == ("A", "B")
    assert d.pairs() == [("stim", "A"), ("stim", "B")]
    assert d.counts[("ctrl", "B")] == 3
    assert len(d.cells("stim", "B")) == 6


def test_condition_column_missing():
    with pytest.raises(MsfmInputError, match="condition_key='perturbation' is not an obs column"):
        build_design(_obs({"ctrl": 3}), condition_key="perturbation")


def test_control_label_absent():
    with pytest.raises(MsfmInputError, match="control label 'control' does not occur"):
        build_design(_obs({"ctrl": 3, "stim": 3}), control="control", min_cells=1)


def test_unknown_genes_in_condition_are_named():
    obs = _obs({"ctrl": 3, "G1+ctrl": 3, "NOPE+G2": 3, "XYZ+ctrl": 3})
    with pytest.raises(MsfmInputError, match=r"not among the model's genes: \['NOPE', 'XYZ'\].*gene panel"):
        build_design(obs, genes=GENES, min_cells=1)


def test_too_few_cells_per_perturbation():
    with pytest.raises(MsfmInputError, match=r"fewer than min_cells=5 cells.*G2\+ctrl / all: 2"):
        build_design(_obs({"ctrl": 9, "G1+ctrl": 6, "G2+ctrl": 2}), min_cells=5)


def test_perturbation_without_control_cells_in_its_group():
    obs = pd.concat([_obs({"ctrl": 5, "stim": 5}, "A"), _obs({"stim": 5}, "B")], ignore_index=True)
    with pytest.raises(MsfmInputError, match=r"no control cells \('ctrl'\) in their group.*stim / B"):
        build_design(obs, match_key="cell_type", min_cells=1)


def test_condition_split_is_seeded_and_reports_seen_genes():
    obs = _obs({"ctrl": 4, "G1+ctrl": 2, "G2+ctrl": 2, "G3+ctrl": 2, "G1+G2": 2, "G1+G4": 2, "G4+G5": 2})
    d = build_design(obs, genes=GENES, min_cells=1)
    sp = make_split(d, test_conditions=["G1+G2", "G1+G4", "G4+G5", "G3+ctrl"])
    assert {c for c, _ in sp.train} == {"G1+ctrl", "G2+ctrl"}
    sub = {c: s for (c, _), s in sp.subgroup.items()}
    assert sub == {
        "G1+G2": "combo_seen2",
        "G1+G4": "combo_seen1",
        "G4+G5": "combo_seen0",
        "G3+ctrl": "unseen_single",
    }
    a, b = make_split(d, test_fraction=0.3, seed=3), make_split(d, test_fraction=0.3, seed=3)
    assert a == b
    assert len(a.test) == 2


def test_group_split_holds_out_a_group():
    obs = pd.concat([_obs({"ctrl": 3, "stim": 3}, g) for g in "ABC"], ignore_index=True)
    d = build_design(obs, match_key="cell_type", min_cells=1)
    sp = make_split(d, split="group", test_groups=["B"])
    assert sp.test == (("stim", "B"),)
    assert sp.subgroup[("stim", "B")] == "seen_label"


def test_held_out_group_not_present():
    obs = pd.concat([_obs({"ctrl": 3, "stim": 3}, g) for g in "AB"], ignore_index=True)
    d = build_design(obs, match_key="cell_type", min_cells=1)
    with pytest.raises(MsfmInputError, match=r"Held-out group\(s\) \['CD14 Mono'\] are not present"):
        make_split(d, split="group", test_groups=["CD14 Mono"])


def test_held_out_label_never_trained_is_refused():
    d = build_design(_obs({"ctrl": 3, "stim": 3, "drug": 3}), min_cells=1)
    with pytest.raises(
        MsfmInputError, match=r"\['drug'\] are non-gene perturbations that no training cell has"
    ):
        make_split(d, test_conditions=["drug"])


def test_control_pools_are_capped_and_seeded():
    d = build_design(_obs({"ctrl": 20, "stim": 3}), min_cells=1)
    a = control_pools(d, max_cells=5, seed=1)
    assert len(a["all"]) == 5
    assert (np.diff(a["all"]) > 0).all()
    np.testing.assert_array_equal(a["all"], control_pools(d, max_cells=5, seed=1)["all"])


def test_coexpression_graph_links_correlated_genes():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4))
    x[:, 1] = x[:, 0] * 2 + 0.01 * rng.normal(size=50)
    edges, w = coexpression_graph(x, k=1, threshold=0.9)
    assert {tuple(e) for e in edges.T.tolist()} == {(1, 0), (0, 1)}
    assert (w > 0.99).all()


def test_read_gene_graph_with_header_and_unknown_genes(tmp_path):
    path = tmp_path / "go.tsv"
    path.write_text("gene_a\tgene_b\tweight\nG1\tG2\t0.5\nG2\tG3\t0.8\nG1\tOTHER\t1\n")
    edges, w = read_gene_graph(path, GENES)
    assert {tuple(e) for e in edges.T.tolist()} == {(1, 2), (2, 1), (2, 3), (3, 2)}
    assert sorted(w.tolist()) == [0.5, 0.5, 0.800000011920929, 0.800000011920929]
    csv = tmp_path / "go.csv"
    csv.write_text("X1,X2\n")
    with pytest.raises(MsfmInputError, match="0 edges between the model's 10 genes"):
        read_gene_graph(csv, GENES)
