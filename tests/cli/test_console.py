"""What `msfm` prints around the work: `--version`, one line per message, Lightning's chatter only with `--verbose`."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest

from cli_runner import run_cli
from msfm._version import __version__

BANNERS = ("GPU available", "TPU available", "LitLogger", "litlogger")


@pytest.fixture(scope="module")
def cells(tmp_path_factory) -> Path:
    import msfm
    import msfm.engine.trainer  # imports Lightning in setup, so the tests time only their own work

    path = tmp_path_factory.mktemp("console") / "pbmc.h5ad"
    msfm.datasets.pbmc68k()[:24].copy().write_h5ad(path)
    return path


def _train(cells: Path, run_dir: Path, *root_options: str) -> int:
    return run_cli(
        *root_options,
        "scfoundation",
        "train",
        cells,
        "-o",
        run_dir,
        "--preset",
        "scfoundation-fixture",
        "--batch-size",
        4,
        "--max-steps",
        1,
        "--accelerator",
        "cpu",
        "--quiet",
    )


def _lines(captured: pytest.CaptureResult[str]) -> list[str]:
    return [line.strip() for line in (captured.out + captured.err).splitlines() if line.strip()]


def test_version_flag(capsys):
    assert run_cli("--version") == 0
    assert capsys.readouterr().out.strip() == f"msfm {__version__}"


def test_training_hides_lightning_banners_by_default(cells, tmp_path, capsys):
    assert _train(cells, tmp_path / "run") == 0
    lines = _lines(capsys.readouterr())
    assert not [line for line in lines if any(b in line for b in BANNERS)]
    assert not [line for line in lines if "Trainable params" in line]  # no model summary
    twice = [line for line, n in Counter(lines).items() if n > 1]
    assert not twice, twice
    assert any("msfm." in line for line in lines)  # msfm's own messages still show


def test_verbose_shows_lightning_banners_once(cells, tmp_path, capsys):
    assert _train(cells, tmp_path / "run", "--verbose") == 0
    lines = _lines(capsys.readouterr())
    gpu = [line for line in lines if "GPU available" in line]
    assert len(gpu) == 1, lines
    assert any("LitLogger" in line for line in lines)
    assert any("Trainable params" in line for line in lines)
    twice = [
        line for line, n in Counter(lines).items() if n > 1 and not set(line) <= set("-─━┃│┏┓┗┛┡┩└┘╇╈┳┻ ")
    ]
    assert not twice, twice


def test_quiet_keeps_warnings_only(cells, tmp_path, capsys):
    assert _train(cells, tmp_path / "run", "--quiet") == 0
    lines = _lines(capsys.readouterr())
    assert not [line for line in lines if " INFO " in line or any(b in line for b in BANNERS)], lines
    assert logging.getLogger().getEffectiveLevel() == logging.WARNING


def test_repeated_note_printed_once_but_warnings_always(capsys):
    from msfm.cli.logging_setup import configure_logging

    configure_logging()
    log = logging.getLogger("msfm.test_console")
    for _ in range(3):
        log.info("same note")
        log.warning("same warning")
    err = capsys.readouterr().err
    assert err.count("same note") == 1
    assert err.count("same warning") == 3
