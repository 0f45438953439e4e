"""``make demo``: the main job, end to end on bundled real data, on CPU, in minutes.

One module per family, each with ``run(out, quick=, seed=) -> metrics`` and ``report_section(metrics) -> str``:

* :mod:`msfm.demo.scfoundation`: pretrain the tiny scFoundation on 700 real PBMCs, embed and cluster them beside
  PCA, read-depth enhancement of cells downsampled to 20 %;
* :mod:`msfm.demo.scfoundation_downstream`: on Kang et al. 2018 PBMCs, perturbation response of a cell type
  never seen stimulated and gene modules of the interferon genes, each beside baselines; drug response and
  single-cell drug sensitivity on constructed data;
* :mod:`msfm.demo.scmulan`: train the tiny scMulan on 70 % of the cells, annotate the rest beside logistic
  regression, generate cells from label prompts, in-silico perturbation;
* :mod:`msfm.demo.roam`: pyramid TIFF slides from the two bundled real H&E images (labels synthetic),
  multi-scale ROI features, cross-validated training of two tasks, a cascade, slide- and ROI-level heatmaps;
* :mod:`msfm.demo.gest`: GeST on 621 real spatial spots with held-out windows beside baselines, niche clusters,
  in-silico perturbation, domains of a semi-real tissue.

Everything is written to ``OUT/report.md`` with PNG figures in ``OUT/figures`` and ``OUT/metrics.json``, and the
same report as one self-contained HTML file, ``OUT/report.html`` (figures inlined; opens offline). Each table is
followed by a plain reading of it (:mod:`msfm.demo.report_text`), and a glossary closes the report.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Any

__all__ = ["PARTS", "run_demo"]

#: The demo's parts, in the order they run and appear in the report.
PARTS: tuple[str, ...] = ("scfoundation", "scfoundation_downstream", "scmulan", "roam", "gest")


def run_demo(out: str | Path, *, quick: bool = False, seed: int = 0, parts: tuple[str, ...] = PARTS) -> Path:
    """Run the demo parts, write ``report.md``, ``report.html`` and ``metrics.json``; return the Markdown path.

    Args:
        out: output folder (created).
        quick: tiny step counts (a smoke run in about a minute, numbers meaningless).
        seed: seed of every part.
        parts: which parts to run (default: all).
    """
    from msfm.demo.report_text import glossary_section, intro
    from msfm.errors import MsfmInputError
    from msfm.pl.html_report import write_html_report
    from msfm.runtime.atomic import atomic_write_json, atomic_write_text

    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        msg = f"Unknown demo part(s) {unknown}; the parts are {list(PARTS)}."
        raise MsfmInputError(msg)
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    metrics: dict[str, Any] = {}
    sections = ["# msfm demo report", "", intro(quick)]
    for part in parts:
        module = importlib.import_module(f"msfm.demo.{part}")
        metrics[part] = module.run(out, quick=quick, seed=seed)
        sections.append(module.report_section(metrics[part]))
    metrics["total_s"] = time.perf_counter() - t0
    from msfm.runtime.precision import cpu_capability

    sections.append(
        f"*The whole demo took {metrics['total_s']:.0f} s on this machine ({cpu_capability().line()}).*\n"
    )
    atomic_write_json(out / "metrics.json", metrics)
    body = "\n".join(sections)
    report = out / "report.md"
    atomic_write_text(report, body + "\n" + glossary_section(body))
    write_html_report(report)
    return report
