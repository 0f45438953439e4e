"""Drug tables, response tables, fingerprints and folds (msfm.data.drugs, msfm.data.folds)."""

from __future__ import annotations

import builtins

import numpy as np
import pandas as pd
import pytest

from msfm.data.drugs import (
    atom_graph,
    binary_labels,
    check_response_ids,
    morgan_fingerprints,
    read_drugs,
    read_responses,
)
from msfm.data.folds import assign_folds, check_fold_classes
from msfm.errors import MsfmInputError

DRUGS = {"Fluorouracil": "Fc1c[nH]c(=O)[nH]c1=O", "Vorinostat": "ONC(=O)CCCCCCC(=O)Nc1ccccc1"}


def test_fingerprints_shape_bits_and_tsv(tmp_path):
    path = tmp_path / "drugs.tsv"
    pd.DataFrame({"DRUG_ID": list(DRUGS), "SMILES": list(DRUGS.values())}).to_csv(path, sep="\t", index=False)
    table = read_drugs(path)  # column names match case-insensitively
    assert table.ids == ("Fluorouracil", "Vorinostat")
    fp = morgan_fingerprints(table, radius=2, n_bits=256)
    assert fp.shape == (2, 256)
    assert fp.dtype == np.float32
    assert set(np.unique(fp)) <= {0.0, 1.0}
    assert (fp.sum(1) > 3).all()
    assert not np.array_equal(fp[0], fp[1])
    # one drug at a time gives the same bits (no batch effect)
    np.testing.assert_array_equal(morgan_fingerprints(table.subset(["Vorinostat"]), n_bits=256)[0], fp[1])
    graphs = atom_graph(table)
    assert graphs[0][0].shape == (9, 8)
    assert graphs[0][1].shape == (2, 18)


def test_smiles_that_do_not_parse_are_all_named():
    table = read_drugs({"good": "CCO", "bad1": "C1CC(", "bad2": "not-a-smiles"})
    with pytest.raises(MsfmInputError, match=r"2 SMILES do not parse.*bad1 \('C1CC\('\).*bad2.*PubChem"):
        morgan_fingerprints(table)


def test_rdkit_missing_gives_the_pip_command(monkeypatch):
    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == "rdkit" or name.startswith("rdkit."):
            raise ImportError("No module named 'rdkit'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(MsfmInputError, match="pip install rdkit"):
        morgan_fingerprints(read_drugs(DRUGS))


def test_response_ids_missing_from_drug_table_or_expression():
    table = read_drugs(DRUGS)
    resp = read_responses(
        pd.DataFrame({"cell_line": ["A", "B", "Z"], "drug_id": ["Fluorouracil", "Aspirin", "Vorinostat"],
                      "ln_ic50": ["1.0", "2", "3"]})
    )  # fmt: skip
    with pytest.raises(
        MsfmInputError, match=r"1 cell line\(s\) of the response table are not in the expression.*'Z'"
    ):
        check_response_ids(resp, ["A", "B"], table)
    with pytest.raises(MsfmInputError, match=r"not in the drug table: \['Aspirin'\]"):
        check_response_ids(resp, ["A", "B", "Z"], table)


def test_non_numeric_or_nan_ic50_is_refused_naming_rows():
    df = pd.DataFrame(
        {"cell_line": ["A", "B", "C"], "drug_id": ["d", "d", "d"], "LN_IC50": ["1.5", "high", None]}
    )
    with pytest.raises(MsfmInputError, match=r"2 ln\(IC50\) value\(s\).*rows \[1, 2\].*'high'"):
        read_responses(df)
    assert read_responses(df.iloc[:1])["value"].tolist() == [1.5]


def test_labels_must_be_binary():
    np.testing.assert_array_equal(binary_labels(["Sensitive", "resistant", "1", "0"], "x"), [1, 0, 1, 0])
    with pytest.raises(MsfmInputError, match=r"\['partial'\] that are not binary"):
        binary_labels(["sensitive", "partial"], "obs['label']")
    with pytest.raises(MsfmInputError, match="not binary"):
        read_responses(
            pd.DataFrame({"cell_line": ["A"], "drug_id": ["d"], "label": ["2"]}),
            kind="binary",
            value_column="label",
        )


def test_folds_grouped_stratified_and_seeded():
    groups = np.repeat(np.arange(10), 3)
    f = assign_folds(30, folds=5, seed=1, groups=groups)
    assert all(len(set(f[groups == g])) == 1 for g in range(10))  # a group never spans two folds
    assert sorted(np.bincount(f).tolist()) == [6] * 5
    np.testing.assert_array_equal(f, assign_folds(30, folds=5, seed=1, groups=groups))
    y = np.array([0] * 20 + [1] * 10)
    s = assign_folds(30, folds=5, seed=0, labels=y)
    assert all(((s == k) & (y == 1)).sum() == 2 for k in range(5))


def test_more_folds_than_units_is_refused():
    with pytest.raises(MsfmInputError, match="folds=5 is more than the 3 drugs"):
        assign_folds(30, folds=5, groups=np.repeat(["a", "b", "c"], 10), what="drugs")


def test_a_fold_with_one_class_is_refused():
    y = np.array([0] * 9 + [1])
    fold = assign_folds(10, folds=3, seed=0, labels=y)
    with pytest.raises(MsfmInputError, match=r"Fold \d has only one class.*fewer folds"):
        check_fold_classes(fold, y)
