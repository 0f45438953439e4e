"""The scMulan part of ``make demo`` and its quality numbers (docs/benchmarks.md).

On scanpy's bundled 700 real PBMCs (10 labels), in one run on CPU:

1. split the cells 70/30 (stratified by label) and train the tiny scMulan from scratch on the training cells,
   with a vocabulary built from the data (its genes, the 10 labels as fine cell types and 6 lineages derived from
   them as coarse cell types) and two tasks mixed: annotation (``<PCT>``) and conditional generation
   (``<SPToken1>``);
2. annotate the held-out cells (constrained greedy decoding) and score accuracy / macro-F1 beside a
   logistic-regression baseline (CellTypist's method: log1p CP10k, scaled, multinomial LR) trained on the same
   split in the same run;
3. generate cells from label prompts and measure their fidelity against the real held-out cells of each label
   in the same binned space: Pearson correlation of the mean profile (own label vs the best other label) and a
   classifier two-sample test (cross-validated AUC of real vs generated; 0.5 = indistinguishable);
4. in-silico perturbation: B-cell prompts with a monocyte marker forced to levels 0..10, scored by the
   centroid shift toward monocytes vs T cells (the release's HSC-case score).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from msfm.demo._runs import run_dir

logger = logging.getLogger(__name__)

#: The coarse lineage of each of the 10 PBMC labels (used as the coarse cell-type category).
PBMC_LINEAGE = {
    "CD4+/CD25 T Reg": "T cell",
    "CD4+/CD45RO+ Memory": "T cell",
    "CD4+/CD45RA+/CD25- Naive T": "T cell",
    "CD8+ Cytotoxic T": "T cell",
    "CD8+/CD45RA+ Naive Cytotoxic": "T cell",
    "CD19+ B": "B cell",
    "CD56+ NK": "NK cell",
    "CD14+ Monocyte": "Monocyte",
    "Dendritic": "Dendritic cell",
    "CD34+": "Progenitor",
}


def _logreg_baseline(train_x: sp.spmatrix, train_y: np.ndarray, test_x: sp.spmatrix, seed: int) -> np.ndarray:
    """CellTypist's recipe: log1p CP10k, scaled to unit variance (clipped at 10), multinomial logistic regression."""
    from sklearn.linear_model import LogisticRegression

    def lognorm(m: sp.spmatrix) -> np.ndarray:
        x = m.toarray().astype(np.float64)
        return np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4)

    a, b = lognorm(train_x), lognorm(test_x)
    mu, sd = a.mean(0), a.std(0)
    sd = np.where(sd > 0, sd, 1)
    a = np.clip((a - mu) / sd, -10, 10)
    b = np.clip((b - mu) / sd, -10, 10)
    clf = LogisticRegression(max_iter=2000, C=0.1, random_state=seed)
    clf.fit(a, train_y)
    return clf.predict(b)


def _two_sample_auc(real: np.ndarray, generated: np.ndarray, seed: int) -> float:
    """Cross-validated ROC AUC of a logistic regression telling real from generated cells (0.5 = same)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    x = np.vstack([real, generated])
    y = np.r_[np.zeros(len(real)), np.ones(len(generated))]
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    proba = cross_val_predict(
        LogisticRegression(max_iter=2000, C=0.1, random_state=seed), x, y, cv=folds, method="predict_proba"
    )[:, 1]
    return float(roc_auc_score(y, proba))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def run(out: str | Path, *, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Run the scMulan part; returns its metrics (figures go to ``out/figures``)."""
    import msfm
    from msfm.data import CellSource
    from msfm.data.normalize import normalized_rows
    from msfm.eval.metrics import classification_scores
    from msfm.pl import line_plot, metric_bars

    sm = msfm.scmulan

    out = Path(out)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    adata = msfm.datasets.pbmc68k()
    adata.obs["lineage"] = adata.obs["cell_type"].astype(str).map(PBMC_LINEAGE).astype("category")
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    from sklearn.model_selection import train_test_split

    idx_train, idx_test = train_test_split(
        np.arange(adata.n_obs), test_size=0.3, stratify=labels, random_state=seed
    )
    train_cells = adata[np.sort(idx_train)].copy()
    test_cells = adata[np.sort(idx_test)].copy()

    # 1. train ------------------------------------------------------------------------------------------------
    steps = 30 if quick else 1000
    cfg = sm.ScMulanTrainConfig(
        preset="scmulan-tiny",
        meta_columns={"cell_type": "cell_type", "coarse_cell_type": "lineage"},
        tasks={"annotate": 2.0, "generate": 1.0},
        # The release weighs the expression MSE 200x; for a tiny model trained from scratch for minutes that
        # term swamps the label signal (held-out accuracy 0.34 = the majority class at 200, 0.73 at 1, measured
        # with 300 annotation-only steps), so the demo uses 1.
        loss={"expression_weight": 1.0},
        vocabulary="data",
        # The 256 most variable genes (cells express ~66 of them): sentences stay short enough to train in
        # minutes on 2 cores; the release's vocabulary is likewise a set of highly variable genes (2,000).
        n_genes=256,
        seed=seed,
    )
    t0 = time.perf_counter()
    run = sm.train(
        train_cells,
        run_dir(out, "scmulan_run", quick=quick, seed=seed),
        config=cfg,
        max_steps=steps,
        batch_size=16,
        lr=1e-3,
        warmup_steps=max(1, steps // 20),
        accelerator="cpu",
        devices=1,
        checkpoint_every_n_steps=max(10, steps // 5),
        progress_bar=True,
    )
    timings["train_s"] = time.perf_counter() - t0
    loaded = sm.load(run, device="cpu")

    # 2. annotation vs logistic regression -------------------------------------------------------------------
    t0 = time.perf_counter()
    sm.predict(test_cells, loaded, min_confidence=0.0, batch_size=32, device="cpu", progress=False)
    timings["annotate_s"] = time.perf_counter() - t0
    truth = test_cells.obs["cell_type"].astype(str).to_numpy()
    pred_fine = test_cells.obs["scmulan_cell_type_fine"].astype(str).to_numpy()
    pred_coarse = test_cells.obs["scmulan_cell_type"].astype(str).to_numpy()
    lr_pred = _logreg_baseline(
        sp.csr_matrix(train_cells.layers["counts"]),
        train_cells.obs["cell_type"].astype(str).to_numpy(),
        sp.csr_matrix(test_cells.layers["counts"]),
        seed,
    )
    annotation = {
        "scMulan-tiny (fine label)": classification_scores(truth, pred_fine),
        "logistic regression (CellTypist recipe)": classification_scores(truth, lr_pred),
    }
    annotation = {
        k: {"accuracy": float(v["accuracy"]), "macro_f1": float(v["macro_f1"])} for k, v in annotation.items()
    }
    coarse_truth = test_cells.obs["lineage"].astype(str).to_numpy()
    coarse_acc = float(np.mean(pred_coarse == coarse_truth))
    metric_bars(
        annotation,
        metrics=("accuracy", "macro_f1"),
        title="Annotation of held-out PBMCs (30 %)",
        save=fig_dir / "scmulan_annotation.png",
    )

    # 3. generation fidelity ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    n_gen = 6 if quick else 40
    types = sorted(set(truth))
    gen = sm.generate(
        [{"cell_type": t, "coarse_cell_type": PBMC_LINEAGE[t]} for t in types],
        loaded,
        n_per_prompt=n_gen,
        seed=seed,
        device="cpu",
        progress=False,
    )
    timings["generate_s"] = time.perf_counter() - t0
    tok = sm.tokenizer_for(loaded)
    from msfm.data import GenePanel, harmonize_genes

    mapping = harmonize_genes(test_cells.var, GenePanel.from_symbols(loaded.vocab.genes, name="scmulan"))
    real_binned = tok.binned_matrix(normalized_rows(CellSource(test_cells), None, mapping)).toarray()
    gen_x = sp.csr_matrix(gen.X).toarray()
    gen_type = gen.obs["cell_type"].astype(str).to_numpy()
    fidelity: dict[str, dict[str, float]] = {}
    for t in types:
        real_mean = real_binned[truth == t].mean(0)
        own = _pearson(gen_x[gen_type == t].mean(0), real_mean)
        others = [_pearson(gen_x[gen_type == u].mean(0), real_mean) for u in types if u != t]
        fidelity[t] = {
            "r_own": own,
            "r_best_other": float(np.nanmax(others)),
            "n_real": int((truth == t).sum()),
            "n_generated": int((gen_type == t).sum()),
            "mean_genes_generated": float((gen_x[gen_type == t] > 0).sum(1).mean()),
            "mean_genes_real": float((real_binned[truth == t] > 0).sum(1).mean()),
        }
    c2st = _two_sample_auc(real_binned, gen_x, seed)
    n_own_best = int(sum(v["r_own"] > v["r_best_other"] for v in fidelity.values()))

    # 4. perturbation ----------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    source, target, other = "CD19+ B", "CD14+ Monocyte", "CD8+ Cytotoxic T"
    ref_binned = tok.binned_matrix(normalized_rows(CellSource(adata), None, mapping)).toarray()
    all_labels = labels
    diff = ref_binned[all_labels == target].mean(0) - ref_binned[all_labels == source].mean(0)
    gene = loaded.vocab.genes[int(np.argmax(diff))]
    levels = [0, 5, 10] if quick else [0, 2, 4, 6, 8, 10]
    scores = sm.perturb(
        {"cell_type": source, "coarse_cell_type": PBMC_LINEAGE[source]},
        loaded,
        genes=[gene],
        levels=levels,
        n_cells=6 if quick else 40,
        reference=adata,
        group_key="cell_type",
        source=source,
        targets=[target, other],
        seed=seed,
        device="cpu",
        progress=False,
    ).scores
    timings["perturb_s"] = time.perf_counter() - t0
    rows = scores[scores["gene"] == gene].sort_values("level")
    score_cols = [c for c in rows.columns if c.startswith("score_")]
    line_plot(
        rows["level"].tolist(),
        {c.removeprefix("score_"): rows[c].tolist() for c in score_cols},
        xlabel=f"forced level of {gene}",
        ylabel="cos(shift, source -> target)",
        title=f"In-silico perturbation of {source} prompts",
        save=fig_dir / "scmulan_perturbation.png",
    )
    timings["total_s"] = time.perf_counter() - t_all
    return {
        "train_steps": steps,
        "n_train": len(idx_train),
        "n_test": len(idx_test),
        "vocab_size": len(loaded.vocab),
        "n_vocab_genes": len(loaded.vocab.genes),
        "n_parameters": int(loaded.model.num_parameters()),
        "annotation": annotation,
        "coarse_accuracy": coarse_acc,
        "generation": {
            "per_type": fidelity,
            "c2st_auc": c2st,
            "n_types_own_best": n_own_best,
            "n_types": len(types),
        },
        "perturbation": {
            "source": source,
            "targets": [target, other],
            "gene": gene,
            "table": json.loads(rows.to_json(orient="records")),  # JSON-safe (numpy scalars, NaN -> null)
        },
        "timings": timings,
    }


def _perturbation_summary(p: dict[str, Any]) -> str:
    """One sentence with the scores at the lowest and highest forced level."""
    rows = p["table"]
    if not rows:
        return ""
    lo, hi = rows[0], rows[-1]
    parts = []
    for target in p["targets"]:
        key = f"score_{target}_vs_control"
        if key in lo and key in hi and lo[key] is not None and hi[key] is not None:
            parts.append(
                f"toward {target} {lo[key]:+.2f} at level {lo['level']} and {hi[key]:+.2f} at level {hi['level']}"
            )
    if not parts:
        return ""
    return (
        "Shift of the perturbed cells from the unperturbed controls (cosine with the source -> target direction): "
        + "; ".join(parts)
        + ". `_vs_control` curves measure the effect of the forced word alone; the others include the model's "
        "baseline error in generating the source cells."
    )


def report_section(m: dict[str, Any]) -> str:
    """Markdown section of the demo report for the scMulan metrics."""
    t = m["timings"]
    g = m["generation"]
    p = m["perturbation"]
    lines = [
        "## scMulan",
        "",
        f"**Training.** The tiny preset ({m['n_parameters']:,} parameters) trained from scratch for "
        f"{m['train_steps']} steps on {m['n_train']} cells (70 %, stratified) in {t['train_s']:.0f} s, with a "
        f"vocabulary built from the data ({m['n_vocab_genes']} genes, {m['vocab_size']} tokens) and two tasks "
        "mixed: annotation (`<PCT>` -> lineage, label) and conditional generation (`<SPToken1>` -> genes).",
        "",
        f"**Annotation** of the {m['n_test']} held-out cells (constrained greedy decoding), beside a logistic "
        "regression trained on the same cells in the same run:",
        "",
        "| method | accuracy | macro-F1 |",
        "|---|---|---|",
    ]
    for k, v in m["annotation"].items():
        lines.append(f"| {k} | {v['accuracy']:.3f} | {v['macro_f1']:.3f} |")
    lines += [
        "",
        f"Lineage (coarse) accuracy of scMulan: {m['coarse_accuracy']:.3f}.",
        "",
        "![annotation](figures/scmulan_annotation.png)",
        "",
        "**Generation.** Cells generated from each label prompt, compared with the real held-out cells of that "
        "label in the same space (per-cell binned levels / 10). `r own` is the Pearson correlation of the "
        "generated mean profile with the real mean profile of the same label, `r best other` the best one among "
        "the other labels' generated profiles.",
        "",
        "| label | n real | r own | r best other | genes / cell (gen / real) |",
        "|---|---|---|---|---|",
    ]
    for k, v in g["per_type"].items():
        lines.append(
            f"| {k} | {v['n_real']} | {v['r_own']:.3f} | {v['r_best_other']:.3f} | "
            f"{v['mean_genes_generated']:.0f} / {v['mean_genes_real']:.0f} |"
        )
    lines += [
        "",
        f"The own label's profile is the closest for {g['n_types_own_best']} of {g['n_types']} labels. "
        f"Classifier two-sample test (real vs generated, 5-fold logistic regression): AUC {g['c2st_auc']:.3f} "
        "(0.5 = indistinguishable, 1.0 = fully separable).",
        "",
        f"**In-silico perturbation.** `{p['source']}` prompts with `{p['gene']}` (the strongest "
        f"{p['targets'][0]} marker among the vocabulary genes) forced to a level after `<SPToken1>`; score = "
        "cosine between the shift of the generated centroid from the real source centroid and the direction to "
        "each target centroid (PCA of the real cells).",
        "",
        "![perturbation](figures/scmulan_perturbation.png)",
        "",
        _perturbation_summary(p),
        "",
        f"Timings: train {t['train_s']:.0f} s, annotate {t['annotate_s']:.1f} s, generate {t['generate_s']:.0f} s, "
        f"perturb {t['perturb_s']:.0f} s.",
        "",
    ]
    return "\n".join(lines)
