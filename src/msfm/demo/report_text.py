"""Plain-language building blocks of the demo report: number formatting, comparisons read out in words, a glossary.

Every sentence that judges a result is computed from the numbers of the run (never written in advance), so the
words cannot disagree with the table next to them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "GLOSSARY",
    "compare",
    "fmt",
    "glossary_section",
    "intro",
    "md_table",
    "pvalue",
    "reading",
    "timings",
]


def fmt(v: Any, digits: int = 3) -> str:
    """A number for a table: ``n/a`` for missing/NaN, small values in scientific form, integers as they are."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isnan(x):
        return "n/a"
    if x != 0 and abs(x) < 10 ** (-digits + 1):
        return f"{x:.2g}"
    return f"{x:.{digits}f}"


def pvalue(p: float) -> str:
    """A p-value as people write it: ``p < 0.001`` instead of ``p 0.000``."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "p n/a"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, align_right: bool = False) -> str:
    """A Markdown table; cells are formatted with :func:`fmt` unless they are strings."""
    sep = "|---|" + ("---:|" if align_right else "---|") * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", sep]
    for row in rows:
        lines.append("| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


def compare(
    name: str,
    value: float,
    baseline_name: str,
    baseline: float,
    *,
    metric: str,
    higher_is_better: bool = True,
    tie: float = 0.01,
) -> str:
    """One sentence that says which of two numbers is better and by how much.

    ``tie`` is the absolute difference below which the two are called level (differences that small move with
    the seed).
    """
    if value is None or baseline is None or math.isnan(float(value)) or math.isnan(float(baseline)):
        return f"{name} or {baseline_name} has no {metric} in this run."
    diff = float(value) - float(baseline)
    if abs(diff) < tie:
        return _capital(
            f"{name} ({metric} {fmt(value)}) and {baseline_name} ({fmt(baseline)}) are level: the difference is "
            "within what a different random seed moves."
        )
    better = diff > 0 if higher_is_better else diff < 0
    winner, loser = (name, baseline_name) if better else (baseline_name, name)
    wv, lv = (value, baseline) if better else (baseline, value)
    return _capital(f"{winner} is better here: {metric} {fmt(wv)} against {fmt(lv)} for {loser}.")


def _capital(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


def reading(*sentences: str) -> str:
    """A "How to read this" block (a Markdown quote) that follows a table or figure."""
    text = " ".join(s.strip() for s in sentences if s and s.strip())
    return f"> **How to read this.** {text}\n"


def intro(quick: bool) -> str:
    """The opening paragraph of the report."""
    lines = [
        "This report was written by `make demo` (`msfm demo`). Every number in it was computed in this run, on the "
        "data bundled with the installed packages, usually on a laptop-class CPU. Each table is followed by a "
        "short **How to read this** note that says what the numbers mean, which simple baseline they stand "
        "beside, and why they come out as they do. Terms are explained in the glossary at the end.",
        "",
        "The models here are **tiny** (a few hundred thousand parameters) and trained for **minutes** on hundreds "
        "of cells, so that the whole demo runs in about 10 minutes on 2 CPU cores. The released models are "
        "100 to 1,000 times larger and were trained for days on GPUs on millions of cells (scFoundation: "
        "about 50 million). A tiny model losing to a simple baseline here says nothing about the released "
        "weights; what the demo shows is that every step of the pipeline runs on real data and is scored "
        "honestly. `docs/weights.md` says where the official weights are published; the same commands run them.",
    ]
    if quick:
        lines += [
            "",
            "**Quick run:** step counts were cut to a smoke test; the numbers below are meaningless.",
        ]
    return "\n".join(lines) + "\n"


#: Terms used in the report, with a plain explanation each (only the ones that occur are listed).
GLOSSARY: dict[str, str] = {
    "ARI": "adjusted Rand index: agreement of two groupings of the same cells, 1 = identical, 0 = no better than "
    "chance (can be slightly negative).",
    "NMI": "normalised mutual information: how much knowing one grouping tells about the other, 0 to 1.",
    "AMI": "adjusted mutual information: NMI corrected for chance, so 0 means chance-level agreement.",
    "PCA": "principal component analysis: the standard linear summary of expression, the usual baseline for any "
    "cell embedding.",
    "UMAP": "a 2-D picture of a high-dimensional embedding; nearby points are similar cells. Distances between "
    "far-apart groups in a UMAP mean little.",
    "Leiden": "a graph clustering method (the scanpy default) run on a nearest-neighbour graph of the cells.",
    "k-means": "clustering into a fixed number k of groups by distance to group centres.",
    "embedding": "a vector per cell (or gene, or spot) computed by a model, used for clustering and comparison.",
    "Pearson": "Pearson correlation: how well two profiles rise and fall together on a straight line, -1 to 1.",
    "Spearman": "Spearman correlation: like Pearson but on ranks, so only the order matters.",
    "PCC": "Pearson correlation coefficient.",
    "SCC": "Spearman correlation coefficient.",
    "RMSE": "root mean squared error: the typical size of a prediction error, in the units of the data; lower is "
    "better.",
    "MAE": "mean absolute error; lower is better.",
    "MSE": "mean squared error; lower is better.",
    "accuracy": "the share of cells (or slides) given the right label.",
    "macro-F1": "F1 (the balance of precision and recall) computed per class and averaged with equal weight, so "
    "rare classes count as much as common ones; it is low when a model ignores rare classes.",
    "AUC": "area under the ROC curve: the chance that a random positive is scored above a random negative; 0.5 is "
    "guessing, 1.0 is perfect.",
    "AUROC": "the same as AUC.",
    "logistic regression": "a linear classifier; on log-normalised expression it is the method of CellTypist and "
    "a strong baseline for cell-type annotation.",
    "CP10k": "counts per 10,000: each cell's counts scaled to 10,000 in total, so deep and shallow cells compare.",
    "log1p": "log(1 + x), the usual transform of expression values.",
    "read depth": "the total number of counts (reads or UMIs) measured in a cell; shallow cells miss many genes.",
    "out-of-fold": "each sample scored by the model of the cross-validation fold that did not train on it.",
    "fold": "one of the k parts of a cross-validation split; each fold is held out once.",
    "ensemble": "the average of the fold models' predicted probabilities.",
    "attention": "the weight a model gives each region (ROI) when it forms the slide-level prediction; the "
    "weights of one slide add up to 1.",
    "ROI": "region of interest: a square tile of the slide (here 2048 pixels at 20x) that the model looks at.",
    "percentile": "the rank of a value among the slide's values, from 0 (lowest) to 100 (highest); it spreads the "
    "colours evenly even when the values themselves hardly differ.",
    "meta-cell": "one of GeST's prototype expression profiles (k-means centres of the training spots); the "
    "model writes a spot as its meta-cell plus a finer code.",
    "Moran's I": "a measure of how much a gene's expression clusters in space; genes with high Moran's I are "
    "called spatially variable genes (SVGs).",
    "SVG": "spatially variable gene (high Moran's I).",
    "FDR": "false discovery rate: the p-value corrected for testing many genes or sets at once.",
    "cosine": "cosine similarity: the angle between two directions, 1 = same direction, 0 = unrelated, -1 = "
    "opposite.",
    "two-sample test": "a classifier trained to tell real from generated cells; its AUC is 0.5 when it cannot.",
    "DE genes": "differentially expressed genes: the genes that change most between two conditions.",
    "cell sentence": "scMulan's input: a cell written as a list of its expressed genes and their binned levels, "
    "after a few words of metadata (organ, cell type, ...).",
    "in-silico perturbation": "changing the input of a model (a gene forced up or down) and reading how its output "
    "changes, instead of doing the experiment.",
}


def glossary_section(report_text: str) -> str:
    """The glossary, restricted to the terms that appear in ``report_text`` (whole words, case as written)."""
    used = [
        term
        for term in GLOSSARY
        if re.search(r"(?<![\w-])" + re.escape(term) + r"s?(?![\w-])", report_text, flags=re.IGNORECASE)
    ]
    if not used:
        return ""
    lines = ["## Glossary", ""]
    lines += [f"- **{term}**: {GLOSSARY[term]}" for term in sorted(used, key=str.lower)]
    return "\n".join(lines) + "\n"


def timings(parts: Mapping[str, float]) -> str:
    """``Time taken: pretraining 12 s, embedding 1.7 s.`` from a mapping of step to seconds."""
    items = ", ".join(f"{k} {v:.1f} s" if v < 10 else f"{k} {v:.0f} s" for k, v in parts.items())
    return f"*Time taken on this machine: {items}.*\n"
