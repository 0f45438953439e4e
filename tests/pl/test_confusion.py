"""msfm.pl.confusion_matrix: numbers, labels seen in one column only, clear errors."""

from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest

import msfm.pl
from msfm.errors import MsfmInputError
from msfm.pl.confusion import confusion_table

TRUE = ["B", "B", "B", "T", "T", "NK"]
PRED = ["B", "B", "T", "T", "T", "Mono"]  # "Mono" is only predicted, "NK" only true


def test_confusion_table_normalisation() -> None:
    labels, counts, frac = confusion_table(np.array(TRUE), np.array(PRED))
    assert labels == ["B", "Mono", "NK", "T"]
    np.testing.assert_array_equal(counts, [[2, 0, 0, 1], [0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 2]])
    np.testing.assert_allclose(frac[0], [2 / 3, 0, 0, 1 / 3])
    np.testing.assert_allclose(frac[2], [0, 1, 0, 0])
    np.testing.assert_allclose(frac[3], [0, 0, 0, 1])
    assert np.isnan(frac[1]).all()  # nobody is truly "Mono": no fractions, not zeros
    _, _, by_pred = confusion_table(np.array(TRUE), np.array(PRED), normalize="pred")
    np.testing.assert_allclose(by_pred[:, 3], [1 / 3, 0, 0, 2 / 3])
    assert np.isnan(by_pred[:, 2]).all()
    _, _, by_all = confusion_table(np.array(TRUE), np.array(PRED), normalize="all")
    assert by_all.sum() == pytest.approx(1.0)
    assert by_all[0, 0] == pytest.approx(2 / 6)


def test_confusion_figure(tmp_path: Path) -> None:
    a = anndata.AnnData(
        obs=pd.DataFrame({"cell_type": TRUE, "pred": PRED}, index=[f"c{i}" for i in range(6)])
    )
    fig = msfm.pl.confusion_matrix(a, "cell_type", "pred", save=tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 2000
    ax, bar = fig.axes
    assert ax.get_xlabel() == "predicted pred"
    assert ax.get_ylabel() == "true cell_type"
    assert "rows sum to 1" in bar.get_ylabel()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["B", "Mono", "NK", "T"]
    cells = sorted(t.get_text() for t in ax.texts)
    assert cells.count("0") == 12
    assert cells.count("2") == 2
    assert cells.count("1") == 2
    with pytest.raises(MsfmInputError, match=r"true_key='celltype' is not a column.*'cell_type', 'pred'"):
        msfm.pl.confusion_matrix(a, "celltype", "pred")
    with pytest.raises(MsfmInputError, match="normalize"):
        msfm.pl.confusion_matrix(a, "cell_type", "pred", normalize="rows")
