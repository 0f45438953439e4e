"""Plain-language pieces of the demo report: the words are computed from the numbers, never written in advance."""

from __future__ import annotations

import math

from msfm.demo.report_text import compare, fmt, glossary_section, md_table, pvalue, reading


def test_compare_names_the_better_method_in_both_directions():
    assert compare("the model", 0.2, "PCA", 0.5, metric="ARI").startswith("PCA is better here: ARI 0.500")
    assert compare("the model", 0.6, "PCA", 0.5, metric="ARI").startswith("The model is better here")
    # Lower is better for errors.
    low = compare("GeST", 0.23, "mean", 0.24, metric="RMSE", higher_is_better=False, tie=0.001)
    assert low.startswith("GeST is better here: RMSE 0.230 against 0.240")
    assert "level" in compare("a", 0.500, "b", 0.505, metric="AUC")
    assert "no AUC" in compare("a", math.nan, "b", 0.5, metric="AUC")


def test_numbers_read_as_people_write_them():
    assert pvalue(1e-8) == "p < 0.001"
    assert pvalue(0.0132) == "p = 0.013"
    assert fmt(float("nan")) == "n/a"
    assert fmt(0.00009) == "9e-05"
    assert fmt(1500) == "1,500"
    table = md_table(["method", "ARI"], [["PCA", 0.4774]])
    assert "| PCA | 0.477 |" in table


def test_glossary_lists_only_terms_that_occur():
    text = "ARI and RMSE appear; macro-F1 too."
    g = glossary_section(text)
    assert "**ARI**" in g
    assert "**RMSE**" in g
    assert "**macro-F1**" in g
    assert "**AMI**" not in g
    assert "**Moran's I**" not in g
    assert glossary_section("nothing to explain") == ""
    assert reading("One.", "", "Two.").startswith("> **How to read this.** One. Two.")
