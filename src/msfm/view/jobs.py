"""Background jobs of ``msfm view``: one worker thread, so a GeST perturbation never runs on a request thread.

A job is a function ``fn(job)`` that reports with ``job.stage(progress, message)`` and may write files into
``job.folder`` (a private folder under the server's temporary directory). States: ``queued`` -> ``running`` ->
``done`` | ``failed`` | ``cancelled``. Cancelling a queued job drops it before it starts; a running job is stopped
at its next ``job.stage(...)`` call (the verbs themselves, e.g. :func:`msfm.gest.perturb`, cannot be interrupted in
the middle: cancellation takes effect between stages). A job that fails or is cancelled has its folder removed, so
it never leaves a half-written file.
"""

from __future__ import annotations

import logging
import queue
import shutil
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["Job", "JobCancelled", "JobRunner"]

#: Finished jobs kept (with their result files); the oldest are forgotten and their files removed.
MAX_FINISHED = 32


class JobCancelled(Exception):
    """Raised inside a job at a stage boundary once cancellation was asked for."""


@dataclass
class Job:
    """One background job (read its fields with :meth:`as_dict`)."""

    id: str
    kind: str
    fn: Callable[[Job], Any] = field(repr=False)
    folder: Path
    state: str = "queued"
    progress: float = 0.0
    message: str = "queued"
    error: str | None = None
    result: Any = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    def stage(self, progress: float, message: str) -> None:
        """Report progress (0..1) and a message; raises :class:`JobCancelled` when cancellation was asked."""
        if self._cancel.is_set():
            raise JobCancelled
        self.progress = float(min(max(progress, 0.0), 1.0))
        self.message = message

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def as_dict(self) -> dict[str, Any]:
        """State, progress, message, error and timings (the result is added by the caller, which knows its shape)."""
        out: dict[str, Any] = {
            "job": self.id,
            "kind": self.kind,
            "state": self.state,
            "progress": self.progress,
            "message": self.message,
        }
        if self.error is not None:
            out["error"] = self.error
        if self.started is not None:
            out["elapsed_s"] = round((self.finished or time.time()) - self.started, 3)
        return out


class JobRunner:
    """A queue of jobs run one at a time on a daemon thread.

    Args:
        root: Folder for job outputs (default: a fresh temporary folder, removed by :meth:`close`).
    """

    def __init__(self, root: Path | None = None) -> None:
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="msfm-view-")) if root is None else Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._jobs: dict[str, Job] = {}
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="msfm-view-jobs", daemon=True)
        self._thread.start()

    def submit(self, kind: str, fn: Callable[[Job], Any]) -> Job:
        """Queue ``fn(job)``; its return value becomes ``job.result``."""
        jid = uuid.uuid4().hex[:16]
        job = Job(id=jid, kind=kind, fn=fn, folder=self.root / jid)
        with self._lock:
            self._jobs[jid] = job
            self._forget_old()
        self._queue.put(job)
        return job

    def get(self, jid: str) -> Job | None:
        """The job with this id, or None (ids are looked up, never used as paths)."""
        with self._lock:
            return self._jobs.get(jid)

    def cancel(self, jid: str) -> Job | None:
        """Ask a job to stop: a queued job is cancelled at once, a running one at its next stage."""
        job = self.get(jid)
        if job is None:
            return None
        job._cancel.set()
        if job.state == "queued":
            job.state, job.message, job.finished = "cancelled", "cancelled before it started", time.time()
        elif job.state == "running":
            job.message = "cancelling (at the end of the current stage)"
        return job

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.state in ("done", "failed", "cancelled")]
        for j in sorted(finished, key=lambda j: j.created)[: max(0, len(finished) - MAX_FINISHED)]:
            self._jobs.pop(j.id, None)
            shutil.rmtree(j.folder, ignore_errors=True)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.state != "queued":  # cancelled while waiting
                continue
            job.state, job.started, job.message = "running", time.time(), "starting"
            job.folder.mkdir(parents=True, exist_ok=True)
            try:
                job.result = job.fn(job)
                if job._cancel.is_set():
                    raise JobCancelled
            except JobCancelled:
                shutil.rmtree(job.folder, ignore_errors=True)
                job.state, job.message, job.result = "cancelled", "cancelled", None
            except Exception as err:
                shutil.rmtree(job.folder, ignore_errors=True)
                job.state, job.result = "failed", None
                job.error = f"{type(err).__name__}: {err}"
                job.message = "failed"
                logger.warning(
                    "job %s failed: %s", job.id, "".join(traceback.format_exception_only(err)).strip()
                )
            else:
                job.state, job.progress, job.message = "done", 1.0, "done"
            finally:
                job.finished = time.time()

    def wait(self, jid: str, timeout: float = 60.0) -> Job:
        """Block until a job has finished (tests and scripts)."""
        end = time.time() + timeout
        job = self.get(jid)
        while job is not None and job.state in ("queued", "running") and time.time() < end:
            time.sleep(0.05)
        if job is None:
            raise KeyError(jid)
        return job

    def close(self) -> None:
        """Stop the worker after the current job and remove the temporary folder it owns."""
        for j in list(self._jobs.values()):
            j._cancel.set()
        self._queue.put(None)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)
