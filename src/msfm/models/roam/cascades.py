"""``msfm.roam.cascade``: tasks chained the way the ROAM paper's clinical workflow does.

A stage runs only on the slides selected by a condition on earlier stages' predictions, e.g. tumour detection on
every slide, subtyping on the slides predicted ``tumour``, then the markers (IDH, 1p/19q, MGMT) on the tumours::

    stages = [
        CascadeStage("detection", "runs/detection"),
        CascadeStage("subtyping", "runs/subtyping", when="detection==tumour"),
        CascadeStage("idh", "runs/idh", when="detection==tumour"),
        CascadeStage("grade_oligo", "runs/oligo_grade", when="subtyping==oligodendroglioma"),
    ]
    result = msfm.roam.cascade("features/", stages)   # result.table

Condition syntax (``when``): ``STAGE==A`` (the earlier stage predicted ``A``), ``STAGE==A,B`` (``A`` or ``B``),
``STAGE!=A,B`` (neither), and several conditions joined by ``&`` (all must hold), e.g.
``detection==tumour&subtyping!=ependymoma``. A slide that an earlier stage did not reach never satisfies
``==`` and does not satisfy ``!=`` either (it has no prediction). Class names are compared as strings.

The output has, per stage in stage order, ``<stage>`` (the predicted class, ``""`` when the stage did not apply),
``<stage>_confidence`` and ``<stage>_prob_<class>`` (NaN when it did not apply), and a ``stages`` column
listing the stages that ran on the slide (``"detection>subtyping>idh"``). :class:`CascadeResult` holds the table,
the stage names in order and what each stage ran.

Stages can also be text, ``"NAME=RUN[:CONDITION]"`` (:func:`parse_stage`), as on the command line
(``msfm roam cascade FEATURES --stage detection=RUN1 --stage subtyping=RUN2:detection==tumour``), or a YAML/JSON
spec file (see :func:`read_cascade_spec`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from msfm.errors import MsfmInputError
from msfm.models.roam.ensemble import checkpoint_sources, ensemble_of, load
from msfm.models.roam.feature_store import list_feature_slides, resolve_feature_files
from msfm.models.roam.prediction import check_file_out, predict, probability_table, write_csv
from msfm.models.roam.tables import SLIDE_ID, prob_column, slide_ids_from
from msfm.runtime.devices import resolve_device
from msfm.runtime.results import Result

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

__all__ = [
    "CascadeResult",
    "CascadeStage",
    "Condition",
    "cascade",
    "parse_condition",
    "parse_stage",
    "read_cascade_spec",
    "stage_names",
]

_COND_RE = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*(==|!=)\s*(.+?)\s*$")
_NAME_RE = re.compile(r"^[A-Za-z_][\w.\-]*$")


@dataclass(frozen=True)
class Condition:
    """``stage == any of values`` (``negate=False``) or ``stage != all of values`` (``negate=True``)."""

    stage: str
    values: tuple[str, ...]
    negate: bool = False

    def __str__(self) -> str:
        return f"{self.stage}{'!=' if self.negate else '=='}{','.join(self.values)}"


def parse_condition(text: str | None) -> list[Condition]:
    """Parse ``"detection==tumour&subtyping!=ependymoma"`` into conditions (all must hold).

    Raises:
        MsfmInputError: On text that is not ``STAGE==V[,V...]`` or ``STAGE!=V[,V...]`` joined by ``&``.
    """
    if text is None or not str(text).strip():
        return []
    out = []
    for part in str(text).split("&"):
        m = _COND_RE.match(part)
        values = tuple(v.strip() for v in m.group(3).split(",")) if m else ()
        if m is None or not all(values):
            msg = (
                f"Cannot parse the stage condition {part.strip()!r} (in {text!r}); expected STAGE==CLASS, "
                "STAGE==A,B (any of), STAGE!=A,B (none of), joined by '&', e.g. 'detection==tumour'."
            )
            raise MsfmInputError(msg)
        out.append(Condition(m.group(1), values, m.group(2) == "!="))
    return out


@dataclass(frozen=True)
class CascadeStage:
    """One task of a cascade.

    Attributes:
        name: Stage name (the output column); letters, digits, ``_``, ``-``, ``.``.
        source: A run directory, a checkpoint directory, a list of them or a ``Loaded`` (see ``msfm.roam.load``).
        when: Condition on earlier stages selecting the slides this stage runs on (None: every slide). See the
            module docstring for the syntax.
        features: Features folder for this stage when its models use another encoder (None: the cascade's).
    """

    name: str
    source: Any
    when: str | None = None
    features: str | None = None

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name) or self.name in (SLIDE_ID, "stages"):
            msg = (
                f"Stage name {self.name!r} is not usable; use letters, digits, '_', '-' or '.', starting with a "
                f"letter (and not {SLIDE_ID!r} or 'stages')."
            )
            raise MsfmInputError(msg)
        parse_condition(self.when)


def parse_stage(text: str) -> CascadeStage:
    """Parse the command-line form ``NAME=SOURCE[:CONDITION]``.

    ``SOURCE`` is a run or checkpoint directory; several checkpoints can be joined with ``+``. The condition
    follows the last ``:`` whose remainder parses as a condition, so paths containing ``:`` still work.

    Example:
        >>> parse_stage("subtyping=runs/sub:detection==tumour")
        CascadeStage(name='subtyping', source='runs/sub', when='detection==tumour', features=None)

    Raises:
        MsfmInputError: If the text has no ``=`` or the name/condition is invalid.
    """
    if "=" not in text or text.startswith("="):
        msg = f"--stage {text!r}: expected NAME=RUN_DIR[:CONDITION], e.g. 'subtyping=runs/sub:detection==tumour'."
        raise MsfmInputError(msg)
    name, rest = text.split("=", 1)
    source, when = rest, None
    if ":" in rest:
        head, tail = rest.rsplit(":", 1)
        if _COND_RE.match(tail.split("&")[0]) and head:
            source, when = head, tail
    if not source:
        msg = f"--stage {text!r} names no run or checkpoint directory."
        raise MsfmInputError(msg)
    src = checkpoint_sources(source) if "+" in source else source
    if isinstance(src, list):
        src = [str(p) for p in src]
    return CascadeStage(name.strip(), src, when)


def read_cascade_spec(path: PathLike) -> list[CascadeStage]:
    """Read stages from YAML/JSON: ``{"stages": [{"name", "run" | "checkpoints", "when", "features"}, ...]}``.

    Example YAML::

        stages:
          - {name: detection, run: runs/detection}
          - {name: subtyping, run: runs/subtyping, when: "detection==tumour"}
          - {name: idh, checkpoints: [ckpt/idh_f0, ckpt/idh_f1], when: "detection==tumour"}

    Relative paths are taken relative to the spec file's folder.

    Raises:
        MsfmInputError: If the file is missing, unparsable or a stage lacks a name or a source.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        msg = f"Cascade spec {p} does not exist."
        raise MsfmInputError(msg)
    try:
        doc = (
            yaml.safe_load(p.read_text())
            if p.suffix.lower() in (".yaml", ".yml")
            else json.loads(p.read_text())
        )
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        msg = f"Cannot parse the cascade spec {p}: {err}"
        raise MsfmInputError(msg) from err
    entries = doc.get("stages") if isinstance(doc, dict) else doc
    if not isinstance(entries, list) or not entries:
        msg = f"Cascade spec {p} must hold a non-empty list 'stages' of {{name, run, when}} entries."
        raise MsfmInputError(msg)

    def rel(v: Any) -> str:
        q = Path(str(v))
        return str(q if q.is_absolute() else p.parent / q)

    stages = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "name" not in e or not ({"run", "checkpoints", "source"} & set(e)):
            msg = f"Stage {i} of {p} needs 'name' and 'run' (or 'checkpoints'); got {e!r}."
            raise MsfmInputError(msg)
        unknown = set(e) - {"name", "run", "checkpoints", "source", "when", "features"}
        if unknown:
            msg = f"Stage {e['name']!r} of {p} has unknown keys {sorted(unknown)}."
            raise MsfmInputError(msg)
        src = e.get("run", e.get("source", e.get("checkpoints")))
        src = [rel(s) for s in src] if isinstance(src, list) else rel(src)
        feats = rel(e["features"]) if e.get("features") else None
        stages.append(CascadeStage(str(e["name"]), src, e.get("when"), feats))
    return stages


def _selected(table: pd.DataFrame, conditions: Sequence[Condition]) -> np.ndarray:
    keep = np.ones(len(table), dtype=bool)
    for cond in conditions:
        col = table[cond.stage].astype(str)
        ran = col != ""
        hit = col.isin(cond.values).to_numpy()
        keep &= ran.to_numpy() & (~hit if cond.negate else hit)
    return keep


@dataclass(frozen=True)
class CascadeResult(Result):
    """What :func:`cascade` returns.

    Attributes:
        table: One row per slide, columns per stage (see the module docstring).
        stage_order: Stage names in order.
        stages: Per stage: name, checkpoints, condition, classes, task and the number of slides it ran on.
    """

    table: pd.DataFrame
    stage_order: list[str] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)


def _as_stages(stages: Any) -> list[CascadeStage]:
    """Stages from CascadeStage objects, ``"NAME=RUN[:CONDITION]"`` texts, or one YAML/JSON spec file."""
    spec_suffix = isinstance(stages, str) and Path(stages).suffix.lower() in (".yaml", ".yml", ".json")
    if isinstance(stages, os.PathLike) or spec_suffix:
        return read_cascade_spec(stages)
    items = [stages] if isinstance(stages, str | CascadeStage) else list(stages or [])
    out = []
    for item in items:
        if isinstance(item, CascadeStage):
            out.append(item)
        elif isinstance(item, str):
            out.append(parse_stage(item))
        else:
            msg = f"A cascade stage must be a CascadeStage or 'NAME=RUN[:CONDITION]' text; got {item!r}."
            raise MsfmInputError(msg)
    return out


def cascade(
    data: PathLike,
    stages: Any,
    *,
    slides: Any = None,
    device: str | torch.device = "auto",
    roi_chunk: int | None = None,
    skip_missing: bool = False,
    out: PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> CascadeResult:
    """Run tasks in order, each on the slides its condition selects (see the module docstring).

    Args:
        data: Feature folder used by every stage without its own ``features``.
        stages: The stages in order (a condition may only name earlier stages): :class:`CascadeStage` objects,
            ``"NAME=RUN[:CONDITION]"`` texts, or a YAML/JSON spec file (a ``Path``, or text ending in ``.yaml``,
            ``.yml`` or ``.json``).
        slides: Slide ids, a table with ``slide_id`` or a CSV path; None for every feature file.
        device: Device for the models.
        roi_chunk: Encode at most this many ROIs at once.
        skip_missing: Leave out slides without a feature file instead of raising.
        out: Also write the table to this CSV (refused if it exists, unless ``overwrite``).
        overwrite: Replace an existing ``out``.
        progress: Show a progress bar over the slides of each stage.

    Returns:
        The result: ``table`` (one row per slide, columns per stage), ``stage_order`` and ``stages``.

    Raises:
        MsfmInputError: No stage, duplicate stage names, a condition naming a later/unknown stage or a class the
            stage cannot predict, missing feature files, an existing ``out``.
    """
    stages = _as_stages(stages)
    if not stages:
        msg = "cascade needs at least one stage (CLI: --stage NAME=RUN[:CONDITION] or --spec FILE)."
        raise MsfmInputError(msg)
    names = [s.name for s in stages]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        msg = f"Stage names repeat: {dup}. Give each stage its own name."
        raise MsfmInputError(msg)
    out_path = check_file_out(out, overwrite=overwrite)
    ids = list_feature_slides(data) if slides is None else slide_ids_from(slides)
    if skip_missing:
        found, _ = resolve_feature_files(ids, data, skip_missing=True)
        ids = [s for s in ids if s in found]
    table = pd.DataFrame({SLIDE_ID: ids})
    applied: list[list[str]] = [[] for _ in ids]
    classes: dict[str, list[str]] = {}
    info = []
    dev = resolve_device(device)
    for i, stage in enumerate(stages):
        conds = parse_condition(stage.when)
        for cond in conds:
            if cond.stage not in names[:i]:
                where = "a later stage" if cond.stage in names else "no stage"
                msg = (
                    f"Stage {stage.name!r}: its condition {stage.when!r} names {cond.stage!r}, which is {where}. "
                    f"Conditions may only use earlier stages: {names[:i]}."
                )
                raise MsfmInputError(msg)
            unknown = [v for v in cond.values if v not in classes[cond.stage]]
            if unknown:
                msg = (
                    f"Stage {stage.name!r}: condition {stage.when!r} uses {unknown}, which stage {cond.stage!r} never "
                    f"predicts; its classes are {classes[cond.stage]}."
                )
                raise MsfmInputError(msg)
        loaded = load(stage.source, device="cpu")
        ens = ensemble_of(loaded)
        classes[stage.name] = list(ens.class_names)
        mask = _selected(table, conds)
        chosen = [s for s, m in zip(ids, mask) if m]
        logger.info(
            "cascade stage %s: %d of %d slides (%s)", stage.name, len(chosen), len(ids), stage.when or "all"
        )
        pred = (
            predict(
                stage.features or data,
                loaded,
                slides=chosen,
                device=dev,
                roi_chunk=roi_chunk,
                skip_missing=skip_missing,
                progress=progress,
            ).table
            if chosen
            else probability_table([], np.zeros((0, len(ens.class_names))), ens.class_names)
        )
        by_id = pred.set_index(SLIDE_ID)
        col = [str(by_id.at[s, "pred"]) if s in by_id.index else "" for s in ids]
        table[stage.name] = col
        table[f"{stage.name}_confidence"] = [
            float(by_id.at[s, "confidence"]) if s in by_id.index else math.nan for s in ids
        ]
        for name in ens.class_names:
            pc = prob_column(name)
            table[prob_column(name, stage.name)] = [
                float(by_id.at[s, pc]) if s in by_id.index else math.nan for s in ids
            ]
        for j, s in enumerate(ids):
            if s in by_id.index:
                applied[j].append(stage.name)
        info.append(
            {
                "name": stage.name,
                "source": [str(p) for p in ens.sources],
                "when": stage.when,
                "classes": list(ens.class_names),
                "task": ens.task,
                "n_slides": len(chosen),
            }
        )
        ens.to("cpu")
    table["stages"] = [">".join(a) for a in applied]
    table.attrs["stage_order"] = names
    table.attrs["stages"] = info
    if out_path is not None:
        write_csv(table, out_path)
    return CascadeResult(table, names, info)


def stage_names(stages: Iterable[CascadeStage]) -> list[str]:
    """Names of the stages in order."""
    return [s.name for s in stages]
