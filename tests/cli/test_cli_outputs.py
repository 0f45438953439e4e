"""What the CLI prints and writes around the work: help texts read literally, output suffixes checked before any
compute, the datasets table, one ``--device`` default and a ``--quiet`` on every verb that shows progress."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cli_runner import run_cli


def _commands() -> list[tuple[tuple[str, ...], object]]:
    """Every visible command of ``msfm`` with its path of names (``("scfoundation", "predict")``)."""
    import typer

    from msfm.cli import app

    found: list[tuple[tuple[str, ...], object]] = []

    def walk(cmd: object, path: tuple[str, ...]) -> None:
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                if not getattr(sub, "hidden", False):
                    walk(sub, (*path, name))
        elif path:
            found.append((path, cmd))

    walk(typer.main.get_command(app), ())
    return found


def _flat(text: str) -> str:
    return " ".join(text.split())


#: Bracketed strings as they are written in docstrings and option helps (obs["..."], obsm['...'], layers[...]).
_BRACKETED = re.compile(r"\b(?:obs|obsm|uns|layers|var|varm)\[[^\]\s]+\]")


def test_help_texts_keep_their_brackets():
    commands = _commands()
    assert len(commands) > 20
    checked = 0
    for path, cmd in commands:
        raw = " ".join([cmd.help or ""] + [getattr(p, "help", None) or "" for p in cmd.params])
        wanted = set(_BRACKETED.findall(raw))
        if not wanted:
            continue
        # The app's own formatter, as `msfm ... --help` runs it (built once: run_cli rebuilds the app per call).
        shown = _flat(cmd.get_help(cmd.context_class(cmd, info_name=" ".join(path))))
        lost = sorted(w for w in wanted if w not in shown)
        assert not lost, f"msfm {' '.join(path)} --help lost {lost}"
        checked += 1
    assert checked >= 5


def test_scfoundation_predict_help_names_the_obs_keys(capsys):
    assert run_cli("scfoundation", "predict", "--help") == 0
    out = _flat(capsys.readouterr().out)
    assert "obs['<key>_<labels_key>']" in out
    assert "obs['<key>_confidence']" in out


@pytest.mark.parametrize(
    "argv",
    [
        ("datasets", "export", "pbmc68k"),
        ("scfoundation", "embed", "cells.h5ad", "-c", "ckpt"),
        ("scmulan", "predict", "cells.h5ad", "-c", "ckpt"),
        ("gest", "embed", "cells.h5ad", "-c", "ckpt"),
    ],
)
@pytest.mark.parametrize("name", ["out.csv", "out.h5", "out"])
def test_anndata_outputs_refuse_another_suffix(tmp_path, capsys, argv, name):
    out = tmp_path / name
    assert run_cli(*argv, "-o", out) == 2
    err = _flat(capsys.readouterr().err)
    assert "this command writes an AnnData .h5ad file" in err
    assert Path(name).with_suffix(".h5ad").name in err
    assert not out.exists()


@pytest.mark.parametrize("verb", ["predict", "cascade"])
def test_table_outputs_refuse_another_suffix(tmp_path, capsys, verb):
    out = tmp_path / "preds.h5ad"
    where = ("-c", tmp_path) if verb == "predict" else ("--stage", f"a={tmp_path}")
    assert run_cli("roam", verb, tmp_path, *where, "-o", out) == 2
    err = _flat(capsys.readouterr().err)
    assert "has the suffix '.h5ad', but this command writes a CSV table" in err
    assert "preds.csv" in err
    assert not out.exists()


def test_datasets_export_refuses_an_existing_output_without_overwrite(tmp_path, capsys):
    out = tmp_path / "pbmc.h5ad"
    out.write_bytes(b"keep me")
    assert run_cli("datasets", "export", "pbmc68k", "-o", out) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"


def test_every_device_option_defaults_to_auto():
    # None: the value of the --config file (whose own default is auto); `bench` records fixed machines.
    wrong = [
        (" ".join(path), p.default)
        for path, cmd in _commands()
        for p in cmd.params
        if p.name == "device" and p.default not in ("auto", None) and path[0] != "bench"
    ]
    assert not wrong


@pytest.mark.parametrize(
    "path",
    [
        ("roam", "predict"),
        ("roam", "cascade"),
        ("roam", "heatmap"),
        ("gest", "generate"),
        ("gest", "embed"),
        ("gest", "perturb"),
        ("gest", "evaluate"),
    ],
)
def test_verbs_with_progress_bars_take_quiet(path):
    cmd = dict(_commands())[path]
    assert "--quiet" in [o for p in cmd.params for o in getattr(p, "opts", [])]


def test_slide_cohort_has_its_own_command_and_refuses_an_existing_folder(tmp_path, capsys):
    # The slide cohort is a folder of TIFFs, not an AnnData: export points to the right command.
    assert run_cli("datasets", "export", "histology_cohort", "-o", tmp_path / "x.h5ad") == 2
    assert "msfm datasets slides -o FOLDER" in capsys.readouterr().err
    existing = tmp_path / "cohort"
    existing.mkdir()
    (existing / "mine.txt").write_text("keep me")
    assert run_cli("datasets", "slides", "-o", existing) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (existing / "mine.txt").read_text() == "keep me"
    assert not (existing / "slides").exists()
