"""The resume guard: a run folder resumes only with the settings it was started with.

:func:`check_resume` compares the new settings with the latest version stored in ``RUN_DIR/config.json`` and raises
:class:`~msfm.errors.ConfigChangedError` naming every change, unless the change is resume-safe or
``allow_config_change`` is set; :func:`run_config_document` writes ``config.json`` with the history of versions.
:func:`msfm.engine.trainer.fit` calls both; family ``train`` functions call :func:`check_resume` early, before they
read data or write anything.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from msfm._version import __version__
from msfm.engine.run_layout import RUN_CONFIG, PathLike, last_checkpoint
from msfm.errors import ConfigChangedError
from msfm.runtime.jsonable import to_jsonable

logger = logging.getLogger(__name__)

__all__ = [
    "ALLOW_KEY",
    "RESUME_SAFE_SETTINGS",
    "changed_settings",
    "check_resume",
    "run_config_document",
    "settings_record",
]

#: Settings (matched by their last name, in any section) that may differ when a run is resumed: how long it runs
#: (``max_steps``/``max_epochs``, to extend a finished run), how often it logs and saves, what it displays, and the
#: accelerator. Everything else (model, data, objective, optimiser, batch size, accumulation, seed, precision,
#: devices, strategy, ...) must be the one the run started with, unless ``allow_config_change`` is set. Families
#: add their own safe settings through ``fit(..., resume_safe=...)`` (DataLoader workers where the stream does not
#: depend on them; ROAM its runtime fields).
RESUME_SAFE_SETTINGS = frozenset(
    {
        "max_steps",
        "max_epochs",
        "log_every_n_steps",
        "checkpoint_every_n_steps",
        "progress_bar",
        "model_summary",
        "accelerator",
    }
)
#: Never stored nor compared: it only says whether a change is accepted.
ALLOW_KEY = "allow_config_change"


class _NotSet:
    """A setting one of two records lacks (shown as ``(not set)``)."""

    def __repr__(self) -> str:
        return "(not set)"


_NOT_SET: Any = _NotSet()


def _strip_allow(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _strip_allow(v) for k, v in value.items() if k != ALLOW_KEY}
    if isinstance(value, list):
        return [_strip_allow(v) for v in value]
    return value


def _plain(value: Any) -> Any:
    """JSON-plain form (tuples -> lists, models -> dicts), as it reads back from ``config.json``."""

    return json.loads(json.dumps(to_jsonable(value)))


def settings_record(trainer_options: Any, optim: Any, run_config: Any) -> dict[str, Any]:
    """``{"trainer", "optim", "run"}`` as stored in ``config.json`` (``allow_config_change`` left out)."""
    return {
        "trainer": _strip_allow(_plain(trainer_options)),
        "optim": _strip_allow(_plain(optim)),
        "run": _strip_allow(_plain(run_config)),
    }


def changed_settings(
    old: Mapping[str, Any], new: Mapping[str, Any], *, lenient: bool = False
) -> dict[str, tuple[Any, Any]]:
    """Every setting that differs between two settings records, as ``{"optim.lr": (old, new)}``.

    Mappings are compared key by key (a dotted name per leaf); lists and plain values as a whole. A key present on
    one side only counts as a change (shown as ``"(not set)"``), except, with ``lenient``, keys the old record's
    non-empty mappings lack (settings added by a later msfm).
    """
    out: dict[str, tuple[Any, Any]] = {}

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for key in [*a, *(k for k in b if k not in a)]:
                name = f"{prefix}.{key}" if prefix else str(key)
                if key not in a:
                    if not (lenient and a):
                        out[name] = (_NOT_SET, b[key])
                elif key not in b:
                    out[name] = (a[key], _NOT_SET)
                else:
                    walk(a[key], b[key], name)
        elif a != b:
            out[prefix] = (a, b)

    walk(dict(old), dict(new), "")
    return out


def _is_safe(name: str, safe: Collection[str]) -> bool:
    return name.rsplit(".", 1)[-1] in safe or name in safe


def _read_run_config(run: Path) -> dict[str, Any] | None:
    import warnings

    path = run / RUN_CONFIG
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        msg = (
            f"{path} is unreadable ({err}); the settings of the resumed run cannot be compared with the ones it was "
            "started with. Restore the file, or start a new run in another folder."
        )
        warnings.warn(msg, UserWarning, stacklevel=3)
        return None
    return doc if isinstance(doc, dict) else None


def _short(name: str) -> str:
    # The run config is what the user set (batch_size, optim.lr, trainer.seed): show its keys without "run.".
    return name.removeprefix("run.")


def _describe(changes: Mapping[str, tuple[Any, Any]]) -> str:
    seen: dict[str, str] = {}
    for name, (a, b) in changes.items():
        seen.setdefault(_short(name), f"{_short(name)} {a!r} -> {b!r}")
    return ", ".join(seen.values())


def check_resume(
    run_dir: PathLike,
    *,
    trainer: Any = None,
    optim: Any = None,
    run_config: Any = None,
    allow_change: bool | None = None,
    resume_safe: Collection[str] = (),
    warn: bool = True,
) -> dict[str, tuple[Any, Any]]:
    """Refuse to resume ``run_dir`` with settings other than the ones it was started with.

    Nothing happens for a new run (no ``checkpoints/last.ckpt``). Otherwise the given sections (``trainer``,
    ``optim``, ``run_config``; ``None`` = not compared) are compared with the latest version in ``config.json``.
    Family ``train`` functions call this as soon as their settings are resolved, before reading data or writing
    anything; :func:`fit` calls it again with everything it stores.

    Args:
        run_dir: the run directory.
        trainer: the :class:`TrainerOptions` of the new call.
        optim: the optimiser settings of the new call.
        run_config: the run config of the new call (as given to :func:`fit`).
        allow_change: accept changed settings (default: ``trainer.allow_config_change``).
        resume_safe: settings (last names) that may change besides :data:`RESUME_SAFE_SETTINGS`.
        warn: log a warning when changed settings are accepted.

    Returns:
        Every changed setting, ``{"optim.lr": (old, new)}`` (safe ones included; empty for a new run).

    Raises:
        ConfigChangedError: A setting outside the safe ones changed and ``allow_change`` is False; the message
            names each one as ``old -> new``.
    """
    run = Path(run_dir)
    if last_checkpoint(run) is None:
        return {}
    doc = _read_run_config(run)
    if doc is None:
        logger.warning("resuming %s without %s: its settings cannot be compared", run, RUN_CONFIG)
        return {}
    new = settings_record(trainer, optim, run_config)
    sections = [k for k, v in (("trainer", trainer), ("optim", optim), ("run", run_config)) if v is not None]
    old = {k: _strip_allow(doc.get(k)) for k in sections if doc.get(k) is not None}
    lenient = doc.get("msfm_version") != __version__
    changes = changed_settings(old, {k: new[k] for k in old}, lenient=lenient)
    safe = set(RESUME_SAFE_SETTINGS) | set(resume_safe)
    unsafe = {k: v for k, v in changes.items() if not _is_safe(k, safe)}
    allow = bool(getattr(trainer, ALLOW_KEY, False)) if allow_change is None else allow_change
    if unsafe and not allow:
        msg = (
            f"{run} holds a run started with other settings ({run / RUN_CONFIG}): {_describe(unsafe)}. Resuming "
            "would continue its weights under settings they were not trained with, and the data order would no "
            "longer be the run's. Repeat the original settings to resume; pass allow_config_change=True (CLI "
            "--allow-config-change) to continue with the new ones (recorded as a new version in config.json); "
            "or choose another output folder for a new run."
        )
        raise ConfigChangedError(msg)
    if unsafe and warn:
        logger.warning("resuming %s with changed settings (allow_config_change): %s", run, _describe(unsafe))
    return changes


def _json_value(value: Any) -> Any:
    return repr(value) if isinstance(value, _NotSet) else value


def run_config_document(
    run: Path,
    record: Mapping[str, Any],
    *,
    step: int | None,
    changes: Mapping[str, tuple[Any, Any]],
    resume_safe: Collection[str],
    accepted_by: str = ALLOW_KEY,
) -> dict[str, Any]:
    """``config.json``: the current settings on top (``trainer``, ``optim``, ``run``), and ``versions``.

    ``versions`` lists every version of the settings: its number, the step it started at, the time, the msfm
    version and, from version 2 on, what changed (``{"optim.lr": [old, new]}``) and what allowed it. The latest
    version's settings are the top-level ones; each earlier version keeps its own full settings, so the original
    values are never lost.
    """
    now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    versions: list[dict[str, Any]] = []
    old = _read_run_config(run) if step is not None else None
    if old is not None:
        versions = [dict(v) for v in old.get("versions") or [] if isinstance(v, Mapping)]
        if not versions:  # written by an msfm without versions: its settings are version 1
            versions = [
                {
                    "version": 1,
                    "started_at_step": 0,
                    "time": old.get("written"),
                    "msfm_version": old.get("msfm_version"),
                }
            ]
    if not versions or changes:
        if versions and "trainer" not in versions[-1]:
            # The version being superseded keeps its settings (until now they were the top-level ones).
            versions[-1].update({k: old.get(k) for k in ("trainer", "optim", "run")} if old else {})
        safe = set(RESUME_SAFE_SETTINGS) | set(resume_safe)
        entry: dict[str, Any] = {
            "version": len(versions) + 1,
            "started_at_step": int(step or 0),
            "time": now,
            "msfm_version": __version__,
        }
        if changes:
            entry["changed"] = {k: [_json_value(a), _json_value(b)] for k, (a, b) in changes.items()}
            entry["allowed_by"] = (
                "resume-safe settings" if all(_is_safe(k, safe) for k in changes) else accepted_by
            )
        versions.append(entry)
    return {
        "msfm_version": __version__,
        "written": now,
        "resumed_from_step": step,
        **record,
        "versions": versions,
    }
