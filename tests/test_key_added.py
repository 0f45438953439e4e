"""``key_added`` is validated by every verb that takes it, before any data is read or model loaded (issue 12).

Before, ``--key-added a/b`` wrote a file anndata could not read back and exited with status 0.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import typer

import msfm
from msfm.errors import MsfmInputError
from msfm.runtime.adata import MAX_KEY_LENGTH, check_key_added

FAMILIES = ("scfoundation", "scmulan", "roam", "gest")
# Verbs known to take key_added; the enumeration below must find at least these (and tests any new one).
KNOWN = {
    ("scfoundation", "embed"), ("scfoundation", "enhance"), ("scfoundation", "predict"),
    ("scfoundation", "perturb"), ("scfoundation", "gene_network"), ("scfoundation", "drug_predict"),
    ("scfoundation", "sensitivity_predict"),
    ("scmulan", "predict"), ("scmulan", "embed"), ("scmulan", "smooth_labels"),
    ("gest", "embed"), ("gest", "predict"), ("gest", "cluster_niches"),
}  # fmt: skip


def _verbs_with_key_added() -> list[tuple[str, str]]:
    found = []
    for family in FAMILIES:
        mod = getattr(msfm, family)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.isfunction(obj) and "key_added" in inspect.signature(obj).parameters:
                found.append((family, name))
    return found


VERBS = _verbs_with_key_added()
BAD_KEYS = [
    ("a/b", "contains '/'"),
    ("", "non-empty"),
    (" a", "without surrounding spaces"),
    (".", "HDF5 path name"),
    ("a\nb", "control character"),
    ("a\x00b", "control character"),
    ("k" * (MAX_KEY_LENGTH + 1), "characters long"),
    ("X_scf", "looks like a full obsm key"),
]


def test_every_verb_taking_key_added_is_enumerated() -> None:
    assert set(VERBS) >= KNOWN, sorted(KNOWN - set(VERBS))


@pytest.mark.parametrize(("key", "why"), BAD_KEYS, ids=[repr(k)[:12] for k, _ in BAD_KEYS])
def test_check_key_added_refuses_what_h5ad_cannot_store(key: str, why: str) -> None:
    with pytest.raises(MsfmInputError, match=why):
        check_key_added(key)


@pytest.mark.parametrize("key", ["scmulan", "my-run.2", "Ü_key", "a b"])
def test_storable_keys_pass_and_round_trip(key: str, tmp_path: Path) -> None:
    assert check_key_added(key) == key
    a = ad.AnnData(np.zeros((2, 2), np.float32))
    a.obsm[f"X_{key}"] = np.ones((2, 2), np.float32)
    a.obs[f"{key}_label"] = ["x", "y"]
    a.uns[key] = {"embed": {"p": 1}}
    a.write_h5ad(tmp_path / "k.h5ad")
    back = ad.read_h5ad(tmp_path / "k.h5ad")
    assert f"X_{key}" in back.obsm
    assert f"{key}_label" in back.obs
    assert back.uns[key]["embed"]["p"] == 1


def _cells() -> ad.AnnData:
    a = ad.AnnData(np.ones((3, 2), np.float32), var=pd.DataFrame(index=["ACTB", "GAPDH"]))
    a.obsm["spatial"] = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    return a


@pytest.mark.parametrize(("family", "verb"), VERBS, ids=[f"{f}.{v}" for f, v in VERBS])
@pytest.mark.parametrize("key", ["a/b", "."])
def test_every_verb_checks_key_added_before_any_work(
    family: str, verb: str, key: str, tmp_path: Path
) -> None:
    fn = getattr(getattr(msfm, family), verb)
    params = inspect.signature(fn).parameters
    data = _cells()
    before = data.copy()
    kwargs: dict = {"key_added": key}
    if "out" in params:
        kwargs["out"] = tmp_path / "out.h5ad"
    args: list = [data]
    if "checkpoint" in params:
        # A checkpoint that does not exist: loading it first would raise about the checkpoint, not the key.
        args.append(tmp_path / "no_such_checkpoint")
    with pytest.raises(MsfmInputError, match=rf"key_added={key!r}"):
        fn(*args, **kwargs)
    assert not (tmp_path / "out.h5ad").exists()
    assert list(data.obsm) == list(before.obsm)
    assert list(data.obs.columns) == list(before.obs.columns)
    assert list(data.uns) == list(before.uns)


def _cli_commands() -> list[tuple[str, str]]:
    import importlib

    found = []
    for family in FAMILIES:
        app = importlib.import_module(f"msfm.cli.{family}").app
        for name, cmd in typer.main.get_command(app).commands.items():
            if any(p.name == "key_added" for p in cmd.params) and not cmd.hidden:
                found.append((family, name))
    return found


CLI = _cli_commands()


def test_cli_commands_with_key_added_are_enumerated() -> None:
    assert {("scmulan", "predict"), ("scfoundation", "embed"), ("gest", "embed")} <= set(CLI)


@pytest.mark.parametrize(("family", "command"), CLI, ids=[f"{f}.{c}" for f, c in CLI])
def test_cli_key_added_with_slash_exits_2_and_writes_nothing(family, command, tmp_path, capsys) -> None:
    from msfm.cli import main

    data = tmp_path / "cells.h5ad"
    _cells().write_h5ad(data)
    out = tmp_path / "out.h5ad"
    argv = [family, command, str(data), "-c", str(tmp_path / "no_such_checkpoint"), "-o", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--key-added", "a/b"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "key_added='a/b' contains '/'" in err
    assert "Traceback" not in err
    assert not out.exists()
