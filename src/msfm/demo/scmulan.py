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
    from msfm.pl import confusion_matrix, line_plot, metric_bars

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
    # Which cell types are confused with which (held-out cells; rows = true type, colours sum to 1 per row).
    confusion_matrix(
        test_cells,
        "cell_type",
        "scmulan_cell_type_fine",
        title="scMulan-tiny on held-out PBMCs: true vs predicted fine type",
        save=fig_dir / "scmulan_confusion.png",
    )

    # For `msfm view demo_out`: the held-out cells with scMulan's calls and confidence on a UMAP of its embedding.
    if "X_scmulan" in test_cells.obsm and test_cells.n_obs > 20:
        from msfm.demo.scfoundation import _umap
        from msfm.runtime.h5ad import write_h5ad_atomic

        test_cells.obsm["X_umap"] = _umap(np.asarray(test_cells.obsm["X_scmulan"], dtype=np.float32), seed)
        (out / "viewer").mkdir(exist_ok=True)
        write_h5ad_atomic(test_cells, out / "viewer" / "pbmc_scmulan_heldout.h5ad", compression="gzip")

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
        {
            c.removeprefix("score_").replace("_vs_control", " (vs control)"): rows[c].tolist()
            for c in score_cols
        },
        xlabel=f"{gene} forced to expression level (0 = off, {loaded.config.n_levels} = cell's maximum)",
        ylabel=f"cos(shift, {source} -> target type)",
        title=f"{source} prompts with {gene} forced to levels {', '.join(map(str, levels))}",
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
    """The shift toward each target at the lowest and the highest forced level, read out in words."""
    rows = p["table"]
    if not rows:
        return ""
    lo, hi = rows[0], rows[-1]
    parts = []
    for target in p["targets"]:
        key = f"score_{target}_vs_control"
        if key in lo and key in hi and lo[key] is not None and hi[key] is not None:
            parts.append(
                f"toward {target}: {lo[key]:+.2f} with {p['gene']} forced to level {lo['level']}, "
                f"{hi[key]:+.2f} at level {hi['level']}"
            )
    if not parts:
        return ""
    return (
        "Shift of the perturbed cells away from the same prompt without the forced gene, measured as the cosine "
        "with the direction from the source to each target cell type (+1 = straight toward it, 0 = unrelated, "
        "-1 = away): " + "; ".join(parts) + "."
    )


def report_section(m: dict[str, Any]) -> str:
    """The scMulan section of the report: every table followed by a plain reading of it."""
    from msfm.demo.report_text import compare, md_table, reading, timings

    t = m["timings"]
    g = m["generation"]
    p = m["perturbation"]
    ann = m["annotation"]
    model_key = next((k for k in ann if k.startswith("scMulan")), next(iter(ann)))
    base_key = next((k for k in ann if k != model_key), model_key)
    lines = [
        "## scMulan: cell sentences for annotation, generation and perturbation",
        "",
        "scMulan writes each cell as a **cell sentence**: a few words of metadata (organ, cell type, ...) "
        "followed by the cell's expressed genes, each with a binned expression level. One language model then "
        "reads or writes such sentences: reading a cell's genes and writing its cell type is annotation; reading "
        "a cell type and writing genes is generation.",
        "",
        f"**Training.** The tiny preset ({m['n_parameters']:,} parameters; the released model has about 368 "
        f"million) was trained from scratch for {m['train_steps']} steps on {m['n_train']} of the "
        f"700 PBMCs (70 %, every cell type in proportion), with a vocabulary built from the data "
        f"({m['n_vocab_genes']} genes). It learned two tasks at once: annotation and generation from a cell-type "
        f"prompt. The remaining {m['n_test']} cells are held out.",
        "",
        f"**Annotation** of the {m['n_test']} held-out cells, beside a logistic regression on log-normalised "
        "expression (the method of CellTypist) trained on the same cells in the same run:",
        "",
        md_table(
            ["method", "accuracy", "macro-F1"], [[k, v["accuracy"], v["macro_f1"]] for k, v in ann.items()]
        ),
        "![annotation](figures/scmulan_annotation.png)",
        "",
        "![confusion matrix](figures/scmulan_confusion.png)",
        "",
        reading(
            compare(
                "scMulan-tiny",
                ann[model_key]["accuracy"],
                "logistic regression",
                ann[base_key]["accuracy"],
                metric="accuracy",
            ),
            f"On the coarse lineage (T cell, B cell, myeloid, ...) scMulan-tiny is right for "
            f"{m['coarse_accuracy']:.0%} of the cells.",
            "Its macro-F1 is much lower than its accuracy: it gets the common cell types right and rarely "
            "predicts the rare ones. 490 training cells, some types with only a handful, are far too few for "
            "a generative model to learn every label, while a linear classifier needs little data. The released "
            "scMulan was trained on 10 million cells; this comparison says how the pipeline behaves, not how "
            "good the released model is.",
            "In the confusion matrix each row is a true cell type and shows where its cells were put; a perfect "
            "annotator fills only the diagonal.",
        ),
        "**Generation.** For each cell type, 40 cells were generated from a prompt naming that type and "
        "compared with the real held-out cells of the type. `r own` correlates the average generated profile "
        "with the average real profile of the same type; `r best other` is the best correlation of that real "
        "profile with another type's generated cells. A faithful generator has `r own` above `r best other`.",
        "",
        md_table(
            ["cell type", "real cells", "r own", "r best other", "genes per cell (generated / real)"],
            [
                [
                    k,
                    v["n_real"],
                    v["r_own"],
                    v["r_best_other"],
                    f"{v['mean_genes_generated']:.0f} / {v['mean_genes_real']:.0f}",
                ]
                for k, v in g["per_type"].items()
            ],
        ),
        reading(
            f"The own type's profile is the closest for {g['n_types_own_best']} of {g['n_types']} cell types. "
            "The correlations are high for every row because all blood cells share most of their expressed "
            "genes; the gap between the two columns is what shows cell-type-specific generation, and it is "
            "small or reversed for the types with few real cells.",
            f"A classifier asked to tell real from generated cells reaches AUC {g['c2st_auc']:.2f} (0.5 would mean "
            "it cannot tell them apart, 1.0 that it always can)"
            + (
                ": the generated cells are still easy to spot, as expected from a model this small."
                if g["c2st_auc"] > 0.75
                else "."
            ),
        ),
        f"**In-silico perturbation.** Cells were generated from `{p['source']}` prompts with one gene, "
        f"`{p['gene']}` (the strongest {p['targets'][0]} marker the vocabulary has), forced into the sentence "
        "at a chosen level before the model writes the rest. Does forcing a monocyte gene make the generated "
        f"B cells look more like {p['targets'][0]}, and not like the control type {p['targets'][-1]}?",
        "",
        "![perturbation](figures/scmulan_perturbation.png)",
        "",
        reading(
            _perturbation_summary(p),
            "A rising curve toward the marker's own cell type and a flat one toward the control type is the "
            "expected behaviour; the curves ending in `vs_control` measure the effect of the forced gene alone, "
            "the others also include how far the model's unperturbed cells already sit from the real ones.",
        ),
        timings(
            {
                "training": t["train_s"],
                "annotation": t["annotate_s"],
                "generation": t["generate_s"],
                "perturbation": t["perturb_s"],
            }
        ),
    ]
    return "\n".join(lines)
