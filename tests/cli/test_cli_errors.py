"""Every `raise` in src/msfm/cli/*.py reached by a test: the CLI's own input checks (exit status 2, one red line
saying what was received and what is expected, nothing written), the entry point's error handling, and the
decorators' checks on how a command is declared.

The raises the other CLI tests already reach are not repeated here (coverage run of tests/cli, see the report of
issue 12).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from cli_runner import run_cli
from msfm.cli import main
from msfm.errors import MsfmInputError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


run = run_cli


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ")
    assert len(err.splitlines()) == 1  # one line, no traceback
    return err


# --- msfm.cli.main ------------------------------------------------------------------------------------------------


def test_msfm_debug_shows_the_traceback_instead_of_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MSFM_DEBUG", "1")
    with pytest.raises(MsfmInputError, match="Unknown dataset 'nope'"):
        main(["datasets", "export", "nope", "-o", str(tmp_path / "n.h5ad")])
    assert "error:" not in capsys.readouterr().err
    monkeypatch.delenv("MSFM_DEBUG")
    assert run("datasets", "export", "nope", "-o", tmp_path / "n.h5ad") == 2
    assert "Unknown dataset 'nope'" in _error_line(capsys)
    assert not list(tmp_path.iterdir())


def test_an_unexpected_exception_is_not_disguised_as_a_usage_error(monkeypatch):
    """A bug (any exception that is neither an msfm error nor a click usage error) keeps its traceback."""
    import msfm.datasets

    def broken() -> dict:
        raise RuntimeError("bug in list_datasets")

    monkeypatch.setattr(msfm.datasets, "list_datasets", broken)
    with pytest.raises(RuntimeError, match="bug in list_datasets"):
        main(["datasets", "list"])


# --- msfm datasets export ----------------------------------------------------------------------------------------


def test_datasets_export_of_an_image_dataset_points_to_the_python_function(tmp_path, capsys):
    assert run("datasets", "export", "cmu_small_region", "-o", tmp_path / "c.h5ad") == 2
    err = _error_line(capsys)
    assert "'cmu_small_region' is not an AnnData dataset" in err
    assert "msfm.datasets.histology.cmu_svs_path()" in err  # how to get it instead
    assert not list(tmp_path.iterdir())


def test_datasets_export_of_a_dataset_that_needs_arguments(tmp_path, capsys):
    assert run("datasets", "export", "pbmc68k_resampled", "-o", tmp_path / "r.h5ad") == 2
    err = _error_line(capsys)
    assert "'pbmc68k_resampled' needs arguments" in err
    assert "pbmc68k_resampled(n_cells, seed)" in err
    assert not list(tmp_path.iterdir())


# --- family commands: option values checked by the CLI -----------------------------------------------------------


def test_gest_embed_unknown_cluster_method(tmp_path, capsys):
    # Checked before anything is read: the data and the checkpoint need not exist.
    out = tmp_path / "o.h5ad"
    code = run(
        "gest", "embed", tmp_path / "cells.h5ad", "-c", tmp_path / "ckpt", "-o", out, "--cluster", "dbscan"
    )
    assert code == 2
    err = _error_line(capsys)
    assert "--cluster 'dbscan'" in err
    assert "expected kmeans, leiden or none" in err
    assert not out.exists()


def test_roam_preprocess_tissue_overrides_that_are_not_json(tmp_path, capsys):
    out = tmp_path / "features"
    code = run("roam", "preprocess", tmp_path / "slide.tif", "-o", out, "--tissue-overrides", "{min_area: 5")
    assert code == 2
    err = _error_line(capsys)
    assert "--tissue-overrides must be a JSON object" in err
    assert "'{min_area: 5'" in err  # what was received
    assert not out.exists()


def test_scmulan_perturb_levels_that_are_not_integers(tmp_path, capsys):
    out = tmp_path / "perturb"
    code = run(
        "scmulan", "perturb", "cell_type=T", "-c", tmp_path / "ckpt", "-o", out, "--genes", "CD3E",
        "--levels", "0,high,10",
    )  # fmt: skip
    assert code == 2
    err = _error_line(capsys)
    assert "--levels '0,high,10'" in err
    assert "comma-separated integers" in err
    assert not out.exists()


# --- msfm.cli.options: how commands declare the shared options (errors of the developer, at import time) -----------


def test_option_decorators_refuse_a_command_that_cannot_take_them():
    from msfm.cli.options import read_options, trainer_options

    def no_read_parameter(data: Path) -> None:
        """A command without the `read` parameter the options are collected into."""

    with pytest.raises(TypeError, match="no_read_parameter must take a 'read' parameter"):
        read_options("cells")(no_read_parameter)

    def declares_layer_itself(data: Path, read: dict, layer: str | None = None) -> None:
        """A command that declares a shared option itself."""

    with pytest.raises(TypeError, match=r"declares \['layer'\] itself"):
        read_options("cells")(declares_layer_itself)

    with pytest.raises(ValueError, match=r"unknown trainer options \['max_stepz'\]; known: \[.*'max_steps'"):
        trainer_options("max_stepz")

    def fine(data: Path, overrides: dict) -> None:
        """A command with the parameter: decorated, it exposes the options instead of `overrides`."""

    decorated = trainer_options("max_steps")(fine)
    params = inspect.signature(decorated).parameters
    assert "overrides" not in params
    assert "max_steps" in params
