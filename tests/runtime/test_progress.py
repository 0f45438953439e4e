"""The shared progress bar: quiet in logs (few redraws when stderr is not a terminal), off with progress=False."""

from __future__ import annotations

import io

from msfm.runtime import progress
from msfm.runtime.progress import progress_bar, progress_iter


def test_bar_redraws_seldom_when_stderr_is_a_file(monkeypatch):
    log = io.StringIO()  # not a terminal
    monkeypatch.setattr("sys.stderr", log)
    assert progress._min_interval() == progress.LOG_INTERVAL_S
    with progress_bar(2000, "work") as bar:
        for _ in range(2000):
            bar.update(1)
    assert log.getvalue().count("\r") <= 3  # opening and closing draws, not one per update


def test_progress_iter_yields_every_item_and_can_be_silenced(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    assert list(progress_iter([1, 2, 3], "slides", enabled=False, unit="slide")) == [1, 2, 3]
    assert log.getvalue() == ""
