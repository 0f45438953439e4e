"""Shared pieces of the browser tests: finding Chromium, serving an app from a thread, reading screenshots.

Chromium is Debian's ``/usr/bin/chromium`` (or ``MSFM_CHROMIUM``) driven by Playwright. Without it the browser tests
skip with the reason, unless ``MSFM_REQUIRE_BROWSER=1`` (then they fail: CI sets it so that a missing browser cannot
pass silently).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


def chromium_path() -> str | None:
    """The Chromium executable to drive, or None."""
    given = os.environ.get("MSFM_CHROMIUM")
    if given:
        return given if Path(given).exists() else None
    for c in CANDIDATES:
        if Path(c).exists():
            return c
    return shutil.which("chromium")


def require_browser() -> str:
    """Chromium's path; skips (or fails under MSFM_REQUIRE_BROWSER=1) when it or Playwright is missing."""
    required = os.environ.get("MSFM_REQUIRE_BROWSER") == "1"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reason = (
            "playwright is not installed (pip install playwright; the browser tests use the system Chromium)"
        )
        if required:
            pytest.fail(f"MSFM_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    path = chromium_path()
    if path is None:
        reason = "no Chromium found at /usr/bin/chromium (apt-get install chromium, or set MSFM_CHROMIUM=/path/to/chrome)"
        if required:
            pytest.fail(f"MSFM_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    return path


@contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a free loopback port from a daemon thread; yields its base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start within 20 s")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextmanager
def browser_page(width: int = 1300, height: int = 800) -> Iterator[Any]:
    """A headless Chromium page; page errors are collected in ``page.msfm_errors``."""
    from playwright.sync_api import sync_playwright

    path = require_browser()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.msfm_errors = errors
            yield page
        finally:
            browser.close()


def rgb(png: bytes) -> np.ndarray:
    """A screenshot as an (h, w, 3) int array."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int32)


def save(png: bytes, folder: Path, name: str) -> np.ndarray:
    """Write a screenshot under the test's folder (kept for a failing run) and return its pixels."""
    (folder / name).write_bytes(png)
    return rgb(png)


def colourful(img: np.ndarray, min_chroma: int = 40) -> float:
    """Fraction of pixels whose channels differ by at least ``min_chroma`` (not grey, white or black)."""
    chroma = img.max(axis=2) - img.min(axis=2)
    return float((chroma >= min_chroma).mean())


def state(page: Any, key: str) -> Any:
    """A field of ``window.msfmState``."""
    return page.evaluate(f"window.msfmState[{key!r}]")
