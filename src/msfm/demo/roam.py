"""The ROAM part of ``make demo``: whole slides to a cross-validated classifier, a cascade and heatmaps.

Everything runs on CPU from the two real H&E images msfm bundles (the Aperio SVS region of OpenSlide's CMU-1
and tiatoolbox's stain target). **The labels are synthetic** and say so everywhere: no glioma slide ships in
any installable package.

1. Build a cohort of multi-level pyramid TIFF slides (0.5 µm/px, 3 levels, white background) with 1-4 tissue
   pieces each, cut from one source image: class ``cmu``, ``tia`` or ``cmu_restained`` (CMU pieces after a fixed
   change of the H&E stain vectors in optical-density space), see :func:`msfm.datasets.histology.build_cohort`.
2. Preprocess every slide: tissue mask on a thumbnail, 2048-px ROIs at 20x, each ROI as 84 patches of 256 px
   (8x8 at 20x, 4x4 at 10x, 2x2 at 5x), patch features from the weight-free ``colour_stats`` encoder (no
   pretrained CNN weights can be downloaded here), one HDF5 per slide and a QC image.
3. Two tasks, each trained with K-fold cross-validation and a held-out test set evaluated with the fold
   ensemble: ``source`` (which image the tissue came from; every slide) and ``restained`` (stain changed or not;
   only CMU slides are labelled). Then a cascade: ``source`` on every slide, ``restained`` only on slides
   predicted ``cmu``, the way ROAM chains detection, subtyping and markers.
4. Slide-level attention heatmaps, ROI galleries and ROI-level gradient rollout maps for test slides.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

logger = logging.getLogger(__name__)

__all__ = ["report_section", "run"]


def _train(table: Path, features: Path, run: Path, task: str, *, quick: bool, seed: int) -> Any:
    import msfm

    return msfm.roam.train(
        features,
        run,
        slides=table,
        task=task,
        preset="roam-tiny",
        folds=2 if quick else 3,
        test_frac=0.25,
        seed=seed,
        max_epochs=3 if quick else 25,
        warmup_epochs=1 if quick else 3,
        best_from_epoch=1 if quick else 3,
        stop_epoch=10,
        patience=8,
        lr=5e-4,
        progress_bar=False,
        overwrite=True,
    )


def _test_ids(run: Any) -> set[str]:
    """Slides of the run's held-out test set (none without ``test_predictions.csv``)."""
    path = Path(run.run_dir) / "test_predictions.csv"
    return set(pd.read_csv(path, dtype={"slide_id": str})["slide_id"]) if path.is_file() else set()


def run(out: str | Path, *, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Run the ROAM demo into ``out/roam`` and return its metrics (also written to ``out/roam/metrics.json``)."""
    import msfm
    from msfm.datasets.histology import build_cohort
    from msfm.runtime.atomic import atomic_write_json

    root = Path(out) / "roam"
    root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    per_class = 3 if quick else 6
    cohort = build_cohort(root / "cohort", n_slides_per_class=per_class, seed=seed)
    # Task columns: `source` for every slide, `restained` only where it is defined (CMU pieces).
    cohort["restained"] = [
        ("yes" if int(r) else "no") if src == "cmu_small_region.svs" else ""
        for r, src in zip(cohort["restained"], cohort["source"])
    ]
    cohort["source"] = cohort["source"].map({"cmu_small_region.svs": "cmu", "target_image.png": "tia"})
    if cohort["source"].isna().any():
        msg = f"Unexpected cohort sources: {sorted(set(cohort['source'].astype(str)))}."
        raise RuntimeError(msg)
    table = root / "slides.csv"
    cohort.to_csv(table, index=False)
    timings["cohort_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    encoder = "colour_stats"
    prep = msfm.roam.preprocess(
        cohort, root / "preprocessed", encoder=encoder, min_tissue=0.1, progress=False
    )
    timings["preprocess_s"] = time.perf_counter() - t0
    n_ok = int((prep.report["status"] != "failed").sum())
    n_roi = int(prep.report["n_roi"].fillna(0).sum())
    features = prep.features

    t0 = time.perf_counter()
    source_run = _train(table, features, root / "run_source", "source", quick=quick, seed=seed)
    timings["train_source_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    restained_run = _train(table, features, root / "run_restained", "restained", quick=quick, seed=seed)
    timings["train_restained_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    stages = [
        msfm.roam.CascadeStage("source", source_run),
        msfm.roam.CascadeStage("restained", restained_run, when="source==cmu"),
    ]
    casc = msfm.roam.cascade(
        features,
        stages,
        slides=cohort[["slide_id"]],
        device="cpu",
        out=root / "cascade_predictions.csv",
        overwrite=True,
    ).table
    truth = cohort.set_index("slide_id")
    merged = casc.set_index("slide_id").join(truth[["source", "restained", "label"]], rsuffix="_true")
    # The cascade's final call for each slide: tia, cmu (original stain) or cmu_restained.
    final = (
        merged["source"]
        .astype(str)
        .where(
            merged["source"] != "cmu",
            merged["restained"].map({"yes": "cmu_restained", "no": "cmu"}).fillna("cmu"),
        )
    )
    test_ids = _test_ids(source_run)
    restained_test = _test_ids(restained_run)
    # Held out from every model the slide passes through: the source test set, and for CMU slides also the
    # restained test set (the two runs draw their own splits).
    held_out = [
        sid in test_ids and (merged.at[sid, "source_true"] == "tia" or sid in restained_test)
        for sid in merged.index
    ]
    in_test = pd.Series(held_out, index=merged.index).to_numpy()
    cascade_acc_all = float((final == merged["label"]).mean())
    cascade_acc_test = (
        float((final[in_test] == merged["label"][in_test]).mean()) if in_test.any() else float("nan")
    )
    timings["cascade_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    heat_ids = sorted(test_ids)[: (1 if quick else 2)] or list(cohort["slide_id"][:1])
    msfm.roam.heatmap(
        features,
        source_run,
        out=root / "heatmaps",
        slides=heat_ids,
        top_k=4,
        bottom_k=2,
        roi_maps=1 if quick else 2,
        thumbnail_size=1200,
        roi_px=384,
        device="cpu",
        overwrite=True,
    )
    timings["heatmaps_s"] = time.perf_counter() - t0

    def summary(run: Any) -> dict[str, Any]:
        m = run.metrics
        keep = ("accuracy", "balanced_accuracy", "macro_f1", "auc_macro")
        return {
            "classes": m["classes"],
            "n_folds": m["n_folds"],
            "oof": {k: m["oof"].get(k) for k in keep},
            "test_ensemble": {k: (m.get("test_ensemble") or {}).get(k) for k in keep},
            "n_test": (m.get("test_ensemble") or {}).get("n"),
            "n_oof": m["oof"].get("n"),
            "best_epochs": [f["best_epoch"] for f in m["folds"]],
        }

    metrics = {
        "labels_are_synthetic": True,
        "n_slides": len(cohort),
        "n_slides_ok": n_ok,
        "n_rois": n_roi,
        "encoder": encoder,
        "classes": cohort["label"].value_counts().to_dict(),
        "source": summary(source_run),
        "restained": summary(restained_run),
        "cascade": {
            "accuracy_all": cascade_acc_all,
            "accuracy_test": cascade_acc_test,
            "n_test": int(in_test.sum()),
        },
        "heatmap_slides": heat_ids,
        "timings": timings,
    }
    atomic_write_json(root / "metrics.json", metrics)
    return metrics


def _fmt(x: Any) -> str:
    return "n/a" if x is None or x != x else f"{x:.3f}"  # x != x: NaN


def report_section(m: dict[str, Any]) -> str:
    """Markdown section of the demo report for the ROAM metrics."""
    t = m["timings"]
    lines = [
        "## ROAM (whole-slide images; synthetic labels)",
        "",
        f"**Cohort.** {m['n_slides']} pyramid TIFF slides built from the two bundled real H&E images "
        f"({', '.join(f'{k}: {v}' for k, v in m['classes'].items())}). **The labels are synthetic**: which image "
        "the tissue was cut from, and whether its stain was changed. They test the pipeline, not pathology.",
        "",
        f"**Preprocessing** ({t['preprocess_s']:.0f} s): {m['n_slides_ok']}/{m['n_slides']} slides, "
        f"{m['n_rois']} ROIs of 2048 px at 20x, 84 patches each, `{m['encoder']}` features (weight-free colour "
        "and texture statistics; no pretrained CNN weights are available offline). QC images: `roam/preprocessed/qc/`.",
        "",
        "**Cross-validated training** of `roam-tiny` per task, with a held-out test set scored by the fold ensemble "
        "(mean softmax):",
        "",
        "| task | classes | out-of-fold acc | OOF macro-F1 | OOF AUC | test acc (ensemble) | test AUC | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task in ("source", "restained"):
        s = m[task]
        lines.append(
            f"| {task} | {', '.join(s['classes'])} | {_fmt(s['oof']['accuracy'])} (n={s['n_oof']}) | "
            f"{_fmt(s['oof']['macro_f1'])} | {_fmt(s['oof']['auc_macro'])} | "
            f"{_fmt(s['test_ensemble']['accuracy'])} (n={s['n_test']}) | {_fmt(s['test_ensemble']['auc_macro'])} | "
            f"{t[f'train_{task}_s']:.0f} |"
        )
    c = m["cascade"]
    lines += [
        "",
        f"**Cascade** (`source` on every slide, then `restained` on slides predicted `cmu`): final three-way call "
        f"accuracy {_fmt(c['accuracy_test'])} on the {c['n_test']} slides held out from every model they pass "
        f"through ({_fmt(c['accuracy_all'])} on all slides, most of which the models were trained on). "
        "Table: `roam/cascade_predictions.csv`.",
        "",
        "**Heatmaps** of test slides (`roam/heatmaps/<slide>/`): slide-level attention of the predicted class "
        "(percentiles, fold ensemble), the top and bottom ROIs, and gradient-weighted attention rollout inside "
        "the top ROIs at 20x, 10x and 5x.",
        "",
    ]
    for sid in m["heatmap_slides"]:
        lines.append(f"![{sid} heatmap](roam/heatmaps/{sid}/heatmap.png)")
    lines.append("")
    return "\n".join(lines)


def _main() -> None:  # pragma: no cover - manual runs
    import sys

    logging.basicConfig(level=logging.INFO)
    m = run(sys.argv[1] if len(sys.argv) > 1 else "demo_out", quick="--quick" in sys.argv)
    print(report_section(m))  # noqa: T201
    pd.set_option("display.width", 200)


if __name__ == "__main__":  # pragma: no cover
    _main()
