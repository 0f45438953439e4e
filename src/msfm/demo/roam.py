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


def report_section(m: dict[str, Any]) -> str:
    """The ROAM section of the report: every table followed by a plain reading of it."""
    from msfm.demo.report_text import fmt, md_table, reading, timings

    t = m["timings"]
    rows = []
    for task in ("source", "restained"):
        s = m[task]
        rows.append(
            [
                task,
                ", ".join(s["classes"]),
                f"{fmt(s['oof']['accuracy'])} (n={s['n_oof']})",
                s["oof"]["macro_f1"],
                s["oof"]["auc_macro"],
                f"{fmt(s['test_ensemble']['accuracy'])} (n={s['n_test']})",
                s["test_ensemble"]["auc_macro"],
            ]
        )
    c = m["cascade"]
    lines = [
        "## ROAM: whole-slide images (synthetic labels)",
        "",
        "ROAM classifies a whole slide from many large tiles (ROIs): each ROI is described at three "
        "magnifications, a transformer combines them, and an attention layer weighs the ROIs to form the "
        "slide's prediction. The weights show which regions drove the call.",
        "",
        f"**Cohort.** {m['n_slides']} slides, written as pyramid TIFF files like a scanner's, cut from the two "
        f"real H&E images that ship with installed packages ({', '.join(f'{k}: {v}' for k, v in m['classes'].items())}). "
        "**The labels are synthetic**: which of the two images a slide was cut from (`source`), and whether its "
        "stain colours were altered (`restained`). No glioma slides with diagnoses are available offline, so "
        "these tasks test that the pipeline learns what it is shown; they say nothing about pathology.",
        "",
        f"**Preprocessing.** {m['n_slides_ok']} of {m['n_slides']} slides read; {m['n_rois']} ROIs of 2048 pixels "
        f"at 20x, each cut into 84 patches over three magnifications. Patches are described by `{m['encoder']}`: "
        "simple colour and texture statistics, because the ImageNet ResNet-50 weights the paper uses must be "
        "downloaded (`docs/weights.md`) and nothing is downloaded here. Quality-control images: "
        "`roam/preprocessed/qc/`.",
        "",
        "**Training.** `roam-tiny` per task with cross-validation; some slides are kept out of every fold as a "
        "test set and scored by the average of the fold models.",
        "",
        md_table(
            [
                "task",
                "classes",
                "out-of-fold accuracy",
                "out-of-fold macro-F1",
                "out-of-fold AUC",
                "test accuracy (ensemble)",
                "test AUC",
            ],
            rows,
        ),
        reading(
            "Out-of-fold numbers score every training slide with the fold model that did not see it; the test "
            "columns score slides no model saw. With this few slides one error moves accuracy by 10 to 30 "
            "points, so read the counts, not the decimals.",
            "`source` is easy (the two images differ in tissue and colour); `restained` is harder because the "
            "stain change is deliberately mild. A majority-class guess would score 0.5 on both balanced tasks.",
        ),
        f"**Cascade.** The two models chained as a pathologist's workflow would: `source` on every slide, then "
        f"`restained` only on slides called `cmu`, giving one of three final calls. Accuracy "
        f"{fmt(c['accuracy_test'])} on the {c['n_test']} slides that no model in the chain trained on "
        f"({fmt(c['accuracy_all'])} on all slides, most of them seen in training). Table: "
        "`roam/cascade_predictions.csv`.",
        "",
        "**Heatmaps** of test slides: where the attention of the predicted class lies. Left: the slide; right: "
        "each ROI coloured by its attention. The title gives the prediction and the raw attention range. Per "
        "slide, `roam/heatmaps/<slide>/` also holds the top and bottom ROIs (`gallery.png`) and maps inside the "
        "top ROIs at 20x, 10x and 5x (`roi_maps/`).",
        "",
    ]
    for sid in m["heatmap_slides"]:
        lines.append(f"![{sid} heatmap](roam/heatmaps/{sid}/heatmap.png)")
    lines += [
        "",
        reading(
            "Colours are percentiles of the attention within the slide (as in the ROAM and CLAM papers): red "
            "marks the ROIs ranked highest, blue the lowest, whatever the actual difference. When the raw "
            "range is narrow (the red note under the figure says so), the model spread its attention almost evenly and "
            "the colours exaggerate tiny differences: on these tasks colour and texture are the same all over a "
            "slide, so no region should stand out."
        ),
        timings(
            {
                "building the slides": t["cohort_s"],
                "preprocessing": t["preprocess_s"],
                "training source": t["train_source_s"],
                "training restained": t["train_restained_s"],
                "cascade": t["cascade_s"],
                "heatmaps": t["heatmaps_s"],
            }
        ),
    ]
    return "\n".join(lines)


def _main() -> None:  # pragma: no cover - manual runs
    import sys

    logging.basicConfig(level=logging.INFO)
    m = run(sys.argv[1] if len(sys.argv) > 1 else "demo_out", quick="--quick" in sys.argv)
    print(report_section(m))  # noqa: T201
    pd.set_option("display.width", 200)


if __name__ == "__main__":  # pragma: no cover
    _main()
