"""``msfm.roam.preprocess``: whole slides in, one ROI feature file per slide out (see :mod:`.slide_pipeline` for one
slide).

* inputs: slide files, folders (searched recursively for :data:`~msfm.data.slides.SLIDE_EXTENSIONS`) or CSV files
  with a ``path`` column and an optional ``slide_id`` column (relative paths are relative to the CSV's folder);
* resumable: a slide whose feature file exists, reads, and was made with the same encoder and the same
  feature-relevant configuration is skipped; files are written atomically, so a partial file never exists;
* one failing slide (unreadable, too small, no tissue, no mpp, ...) is reported and the batch goes on;
* ``shard=(i, n)``: the slides ``i, i+n, i+2n, ...`` of the sorted slide ids, for splitting a cohort across jobs;
* ``workers > 1``: slides in parallel in spawned processes, the CPU threads split between them;
* outputs: ``out/features/<slide_id>.h5``, ``out/qc/<slide_id>.png`` (thumbnail, tissue mask tint and
  outline, kept ROIs in blue, background-skipped ROIs in grey), ``out/reports/report[.shard-i-of-n].csv``
  and ``out/preprocess_config.json``.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import multiprocessing as mp
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from msfm._version import __version__
from msfm.errors import MsfmInputError
from msfm.models.roam.encoders import torch_threads_for
from msfm.models.roam.features import TOKENS_PER_ROI, feature_path
from msfm.models.roam.preprocess_config import PreprocessConfig, run_signature
from msfm.models.roam.slide_inputs import collect_slides, parse_shard
from msfm.models.roam.slide_pipeline import REPORT_COLUMNS, finished_attrs, process_slide
from msfm.runtime.atomic import atomic_write_json, atomic_write_text, probe_writable
from msfm.runtime.config import build_settings
from msfm.runtime.devices import resolve_device
from msfm.runtime.progress import progress_bar
from msfm.runtime.results import Result

logger = logging.getLogger(__name__)

__all__ = ["PreprocessResult", "iter_failed", "preprocess", "summarize"]


@dataclass(frozen=True)
class PreprocessResult(Result):
    """What :func:`preprocess` returns; path-like: its feature folder (pass it as ``data`` to the other verbs).

    Attributes:
        report: One row per slide: ``slide_id, path, status (ok|skipped|failed), n_roi, n_background, seconds,
            slide_mpp, error``.
        out: The output folder.
        counts: Slides per status (``ok``, ``skipped``, ``failed``).
    """

    report: pd.DataFrame
    out: Path
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def features(self) -> Path:
        """The feature folder, ``out/features``."""
        return self.out / "features"

    @property
    def n_failed(self) -> int:
        """Slides that failed."""
        return int(self.counts.get("failed", 0))

    def __fspath__(self) -> str:
        return str(self.features)


def _settings(config: Any, overrides: Mapping[str, Any]) -> PreprocessConfig:
    """The settings of a run: ``config`` (object, mapping or file) plus flat overrides."""
    given = dict(overrides)
    # roi_size and patch_size fix each other; overriding one replaces both.
    if given.get("roi_size") is not None and given.get("patch_size") is None:
        given["patch_size"] = max(1, int(given["roi_size"]) // 8)
    elif given.get("patch_size") is not None and given.get("roi_size") is None:
        given["roi_size"] = 8 * int(given["patch_size"])
    if isinstance(config, str | os.PathLike):
        return build_settings(PreprocessConfig, file=config, overrides=given)
    return build_settings(PreprocessConfig, base=config, overrides=given)


_WORKER: dict[str, Any] = {}


def _init_worker(config_json: str, threads: int) -> None:
    torch.set_num_threads(threads)
    config = PreprocessConfig.model_validate_json(config_json)
    device = resolve_device(config.device)
    encoder = config.build_encoder().to(device)
    normalizer = config.build_normalizer()
    _WORKER.update(
        config=config,
        encoder=encoder,
        normalizer=normalizer,
        device=device,
        signature=run_signature(config, encoder, normalizer),
    )


def _worker_slide(path: str, slide_id: str, out_dir: str) -> dict[str, Any]:
    w = _WORKER
    return process_slide(
        path,
        slide_id,
        out_dir,
        w["config"],
        w["encoder"],
        w["normalizer"],
        signature=w["signature"],
        device=w["device"],
    )


def preprocess(
    data: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | pd.DataFrame,
    out: str | os.PathLike[str],
    *,
    config: PreprocessConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    shard: tuple[int, int] | str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> PreprocessResult:
    """Preprocess a batch of slides into ROI feature files (resumable, fault-tolerant, shardable).

    Args:
        data: Slide files, folders, CSVs with a ``path`` column, or a DataFrame (see :func:`collect_slides`).
        out: Output folder (``features/``, ``qc/``, ``reports/``, ``preprocess_config.json``); a folder of an
            earlier run resumes it.
        config: Settings: a :class:`PreprocessConfig`, a mapping or a YAML/JSON file (default: the ROAM settings,
            whose ``resnet50_trunc`` encoder needs ``weights``).
        shard: ``(i, n)`` or ``"i/n"``: process only slides ``i, i+n, ...`` of the sorted slide ids.
        overwrite: Redo slides whose feature file is already complete.
        progress: Show progress bars.
        **overrides: :class:`PreprocessConfig` fields, e.g. ``encoder="tiny"``, ``weights=...``,
            ``roi_size=512``, ``tissue_preset="biopsy"``, ``stain_norm="macenko"``, ``device="cuda"``,
            ``workers=2``; they take precedence over ``config``.

    Returns:
        The result: ``report`` (one row per slide of the shard, columns :data:`REPORT_COLUMNS`; ``status`` is
        ``ok``, ``skipped`` or ``failed``; also written to ``out/reports/report[.shard-i-of-n].csv``), ``out``,
        ``features`` and ``counts``. It is path-like (the feature folder): pass it as ``data`` of ``train``,
        ``predict``, ``heatmap`` or ``cascade``.

    Raises:
        MsfmInputError: Bad inputs or settings (per-slide problems are reported, not raised).
    """
    config = _settings(config, overrides)
    shard_t = parse_shard(shard)
    out = Path(out)
    if out.exists() and not out.is_dir():
        msg = f"Output {out} is a file; pass a folder for --out."
        raise MsfmInputError(msg)
    table = collect_slides(data, exclude=out)
    if shard_t is not None:
        table = table.iloc[shard_t[0] :: shard_t[1]].reset_index(drop=True)
    device = resolve_device(config.device)
    # Built here (even when workers do the encoding) so that bad weights or settings fail before any slide.
    encoder = config.build_encoder()
    normalizer = config.build_normalizer()
    signature = run_signature(config, encoder, normalizer)
    probe_writable(out)  # a read-only or full folder: OutputError before any slide is encoded
    for sub in ("features", "qc", "reports"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        out / "preprocess_config.json",
        {
            "config": json.loads(config.model_dump_json()),
            "signature": signature,
            "encoder": encoder.describe(),
            "msfm_version": __version__,
            "tokens_per_roi": TOKENS_PER_ROI,
        },
    )

    rows: dict[str, dict[str, Any]] = {}
    todo: list[tuple[str, str]] = []
    for sid, path in zip(table["slide_id"], table["path"], strict=True):
        done = (
            None if overwrite else finished_attrs(feature_path(out / "features", sid), signature, encoder.dim)
        )
        if done is not None:
            rows[sid] = {
                "slide_id": sid,
                "path": path,
                "status": "skipped",
                "n_roi": int(done.get("n_roi", 0)),
                "n_background": int(done.get("n_background") or 0),
                "seconds": 0.0,
                "slide_mpp": done.get("slide_mpp"),
                "error": "",
            }
        else:
            todo.append((sid, path))

    bar = progress_bar(len(table), "slides", enabled=progress, unit="slide")
    bar.update(len(rows))
    workers = min(config.workers, max(1, len(todo)))

    def record(row: dict[str, Any]) -> None:
        rows[row["slide_id"]] = row
        bar.update(1)
        bar.set_postfix_str(f"{row['slide_id']}: {row['status']}", refresh=False)

    try:
        if workers == 1:
            prev_threads = torch.get_num_threads()
            if config.torch_threads:
                torch.set_num_threads(config.torch_threads)
            try:
                encoder = encoder.to(device)
                for sid, path in todo:
                    record(
                        process_slide(
                            path,
                            sid,
                            out,
                            config,
                            encoder,
                            normalizer,
                            signature=signature,
                            device=device,
                            progress=progress,
                        )
                    )
            finally:
                torch.set_num_threads(prev_threads)
        elif todo:
            threads = config.torch_threads or torch_threads_for(workers)
            # spawn, not fork: forking a process whose torch/OpenMP thread pools are running can deadlock.
            with cf.ProcessPoolExecutor(
                max_workers=workers,
                mp_context=mp.get_context("spawn"),
                initializer=_init_worker,
                initargs=(config.model_dump_json(), threads),
            ) as pool:
                futures = {pool.submit(_worker_slide, path, sid, str(out)): (sid, path) for sid, path in todo}
                for fut in cf.as_completed(futures):
                    sid, path = futures[fut]
                    try:
                        record(fut.result())
                    except Exception as err:  # a worker that died (out of memory, killed)
                        record(_failed_row(sid, path, err))
    finally:
        bar.close()

    report = pd.DataFrame([rows[s] for s in table["slide_id"] if s in rows], columns=REPORT_COLUMNS)
    name = "report.csv" if shard_t is None else f"report.shard-{shard_t[0]}-of-{shard_t[1]}.csv"
    atomic_write_text(out / "reports" / name, report.to_csv(index=False))
    return PreprocessResult(report, out, summarize(report))


def _failed_row(slide_id: str, path: str, err: BaseException) -> dict[str, Any]:
    row = dict.fromkeys(REPORT_COLUMNS)
    row.update(slide_id=slide_id, path=path, status="failed", n_roi=0, n_background=0, seconds=0.0)
    row["error"] = f"{type(err).__name__}: {err}"
    return row


def summarize(report: pd.DataFrame) -> dict[str, int]:
    """Counts per status of a report."""
    counts = report["status"].value_counts().to_dict() if len(report) else {}
    return {k: int(counts.get(k, 0)) for k in ("ok", "skipped", "failed")}


def iter_failed(report: pd.DataFrame) -> Iterable[tuple[str, str]]:
    """``(slide_id, error)`` of every failed slide."""
    for rec in report[report["status"] == "failed"].itertuples():
        yield str(rec.slide_id), str(rec.error)
