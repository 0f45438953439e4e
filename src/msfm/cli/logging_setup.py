"""The command line's one logging setup: every message printed once, Lightning's chatter only with ``--verbose``.

Three levels:

* default: msfm's own messages from INFO up; Lightning's only from WARNING up, so its banners ("GPU available",
  "TPU available"), its advertisements ("💡 Tip: ... litlogger") and the model summary stay off;
* ``verbose`` (``msfm --verbose ...`` or ``MSFM_VERBOSE=1``): everything from INFO up, Lightning included;
* ``quiet`` (``msfm --quiet ...`` or ``MSFM_QUIET=1``): warnings and errors only.

At every level, a note (INFO or lower) repeated word for word by the same logger is printed once per command.

``MSFM_LOG_LEVEL`` (e.g. ``DEBUG``) still sets msfm's level explicitly. Python warnings that msfm itself raises (for
example about the data) are never hidden; the user, deprecation and future warnings attributed to Lightning's own
modules (its configuration hints, its deprecations) are, unless ``verbose``.

Why messages used to come out twice: importing ``lightning`` gives the ``lightning`` logger its own stderr handler
("INFO: ...") while records still propagate to the root handler. Here Lightning's handlers are removed and its
records reach the root handler only. ``lightning`` takes seconds to import, so it is not imported here; when it is
imported later, an import hook tidies its loggers right after.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys
import warnings
from typing import Any

#: Loggers that the Lightning packages (and torchmetrics, which they import) give their own handlers on import.
LIGHTNING_LOGGERS = (
    "lightning",
    "lightning.pytorch",
    "lightning.fabric",
    "pytorch_lightning",
    "lightning_fabric",
    "torchmetrics",
)
_LIGHTNING_MODULES = r"(lightning|pytorch_lightning|lightning_fabric)(\..*)?"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_TRUE = frozenset({"1", "true", "yes", "on"})

_state: dict[str, Any] = {"lightning_level": logging.WARNING}


class _MsfmHandler(logging.StreamHandler):
    """The root handler this module installs (a class of its own so a second call replaces it, not adds one)."""


class _OnceFilter(logging.Filter):
    """Drops an INFO (or lower) record whose logger and text were already printed in this command.

    Loops repeat some notes word for word (the same gene mapping for every evaluation, the same checkpoint path at
    every save); the first copy says it all. Warnings and errors always pass.
    """

    def __init__(self, limit: int = 10_000) -> None:
        super().__init__()
        self._seen: set[tuple[str, str]] = set()
        self._limit = limit

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        key = (record.name, record.getMessage())
        if key in self._seen:
            return False
        if len(self._seen) < self._limit:
            self._seen.add(key)
        return True


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def configure_logging(*, verbose: bool = False, quiet: bool = False) -> None:
    """Set up console logging for one ``msfm`` command; safe to call again (the last call wins).

    Args:
        verbose: Also show Lightning's INFO messages, model summaries and configuration warnings (also
            ``MSFM_VERBOSE=1``).
        quiet: Only warnings and errors (also ``MSFM_QUIET=1``); ``verbose`` wins if both are set.
    """
    verbose = verbose or _env_flag("MSFM_VERBOSE")
    quiet = (quiet or _env_flag("MSFM_QUIET")) and not verbose
    level: int | str = logging.WARNING if quiet else logging.INFO
    explicit = os.environ.get("MSFM_LOG_LEVEL", "").strip().upper()
    known = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    if explicit in known and not quiet:
        level = explicit
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _MsfmHandler)]:
        root.removeHandler(handler)
    # Bound to the current sys.stderr, which a test runner may have swapped since the last call.
    handler = _MsfmHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(_OnceFilter())
    root.addHandler(handler)
    root.setLevel(level)
    if explicit and explicit not in known and _state.get("bad_level_warned") != explicit:
        _state["bad_level_warned"] = explicit  # main() and the root options both call here: warn once
        logging.getLogger(__name__).warning(
            "MSFM_LOG_LEVEL=%r is not a logging level; expected one of %s. Using %s; set it to one of those or unset it.",
            explicit,
            ", ".join(known),
            logging.getLevelName(level),
        )

    _state["lightning_level"] = logging.INFO if verbose else logging.WARNING
    for category in (UserWarning, DeprecationWarning, FutureWarning):
        if verbose:  # undo the filters of an earlier, non-verbose call in the same process
            warnings.filters[:] = [
                f for f in warnings.filters if not (f[0] == "ignore" and f[2] is category and _is_ours(f[3]))
            ]
        else:
            warnings.filterwarnings("ignore", category=category, module=_LIGHTNING_MODULES)
    if "lightning" in sys.modules or "pytorch_lightning" in sys.modules:
        _tame_lightning()
    if not any(isinstance(finder, _LightningImportHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _LightningImportHook())


def _is_ours(module_pattern: Any) -> bool:
    return getattr(module_pattern, "pattern", module_pattern) in (
        _LIGHTNING_MODULES,
        _LIGHTNING_MODULES + r"\Z",
    )


def _tame_lightning() -> None:
    """Route Lightning's records to the root handler only, at the level chosen by :func:`configure_logging`."""
    for name in LIGHTNING_LOGGERS:
        lg = logging.getLogger(name)
        for handler in list(lg.handlers):
            lg.removeHandler(handler)
        lg.propagate = True
        lg.setLevel(_state["lightning_level"])


class _LightningImportHook(importlib.abc.MetaPathFinder):
    """Runs :func:`_tame_lightning` right after ``lightning`` (or ``pytorch_lightning``) finishes importing."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in ("lightning", "pytorch_lightning"):
            return None
        sys.meta_path.remove(self)  # look the package up with the ordinary finders, without coming back here
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            run_module(module)
            _tame_lightning()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec
