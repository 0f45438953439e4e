"""The public shape every family shares (docs/architecture.md, "One public shape").

A user who learned one family guesses the next: ``msfm.<family>.<verb>(data, checkpoint, *, key_added=<family>,
device="auto", ...)``, the same verb names, one ``Loaded`` type, results that are AnnData or a ``Result``, reading
options taken as ``**read_options`` (never repeated), and a CLI that mirrors the API with one set of options.
"""

from __future__ import annotations

import inspect
import typing
import warnings
from pathlib import Path

import pytest
import typer
from anndata import AnnData

import msfm
from msfm.runtime.loaded import Loaded
from msfm.runtime.results import Result, TrainResult

FAMILIES = ("scfoundation", "scmulan", "roam", "gest")

# verb -> kind. Kinds fix the signature and the return type (see _check_kind).
VERBS: dict[str, dict[str, str]] = {
    "scfoundation": {
        "load": "load", "convert": "convert", "train": "train", "embed": "annotate", "enhance": "annotate",
        "embed_genes": "result", "fit_classifier": "fit", "predict": "annotate",
        "perturb_fit": "fit_task", "perturb": "new", "gene_network": "new", "drug_fit": "fit_task",
        "drug_predict": "annotate", "sensitivity_fit": "fit_task", "sensitivity_predict": "annotate",
    },
    "scmulan": {
        "load": "load", "convert": "convert", "train": "train", "predict": "annotate", "embed": "annotate",
        "generate": "new", "perturb": "result", "perturb_screen": "result", "next_state": "new",
    },
    "roam": {
        "load": "load", "convert": "convert", "train": "train", "predict": "result", "heatmap": "result",
        "preprocess": "make", "evaluate": "result", "cascade": "result",
    },
    "gest": {
        "load": "load", "train": "train", "generate": "new", "embed": "annotate", "perturb": "result",
        "fit_classifier": "fit", "predict": "annotate", "evaluate": "result",
    },
}  # fmt: skip

# Old public names that keep working for one release, with a DeprecationWarning naming the new call.
DEPRECATED: dict[str, dict[str, str]] = {
    "scfoundation": {
        "pretrain": "train", "embed_file": "embed", "embed_distributed": "embed", "gene_embeddings": "embed_genes",
        "predict_cell_types": "predict", "load_model": "load", "LoadedModel": "Loaded",
        "PretrainRunConfig": "ScFoundationTrainConfig",
    },
    "scmulan": {"annotate": "predict", "predict_organ": "predict", "load_model": "load", "LoadedScMulan": "Loaded"},
    "roam": {
        "convert_official": "convert", "predict_slides": "predict", "write_heatmaps": "heatmap",
        "preprocess_slides": "preprocess", "load_model": "load", "load_ensemble": "load",
    },
    "gest": {
        "train_niche_classifier": "fit_classifier", "annotate_niches": "predict",
        "evaluate_generation": "evaluate", "load_model": "load", "LoadedGest": "Loaded",
    },
}  # fmt: skip

# Reading options are declared once (msfm.data.CellReadOptions / SpatialReadOptions); verbs never list them.
READ_OPTIONS = {
    "layer", "pre_normalized", "gene_column", "species", "use_aliases", "min_panel_fraction",
    "spatial_key", "scale", "section_key", "duplicates",
}  # fmt: skip
READS_CELLS = {"scfoundation", "scmulan", "gest"}


def _family(name: str):
    return getattr(msfm, name)


def _hints(fn) -> dict:
    return typing.get_type_hints(fn)


def _returns(fn, *types: type) -> bool:
    ret = _hints(fn).get("return")
    options = typing.get_args(ret) or (ret,)
    return all(isinstance(t, type) and any(issubclass(t, want) for want in types) for t in options)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_reachable_after_import_msfm(family: str) -> None:
    import importlib

    mod = _family(family)
    assert mod is importlib.import_module(f"msfm.models.{family}")
    missing = sorted(set(VERBS[family]) - set(mod.__all__))
    assert not missing, f"msfm.{family}.__all__ lacks the verbs {missing}"
    for verb in VERBS[family]:
        assert callable(getattr(mod, verb)), verb
    assert mod.Loaded is Loaded


@pytest.mark.parametrize("family", FAMILIES)
def test_no_public_name_is_shadowed_by_a_submodule(family: str) -> None:
    # Importing package.sub sets the attribute package.sub to the module, hiding a lazily exported function of the
    # same name (msfm.scfoundation.gene_network became a module once its file was imported).
    import pkgutil

    mod = _family(family)
    submodules = {m.name for m in pkgutil.iter_modules(mod.__path__)}
    clash = sorted(set(mod.__all__) & submodules)
    assert not clash, f"msfm.{family}: public names that are also submodule names: {clash}"


def _params(fn) -> list[inspect.Parameter]:
    return list(inspect.signature(fn).parameters.values())


def _positional(fn) -> list[str]:
    return [p.name for p in _params(fn) if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _kw(fn) -> dict[str, inspect.Parameter]:
    return {p.name: p for p in _params(fn) if p.kind is p.KEYWORD_ONLY}


def _has_var_kw(fn) -> bool:
    return any(p.kind is p.VAR_KEYWORD for p in _params(fn))


CASES = [(f, v) for f in FAMILIES for v in VERBS[f]]


@pytest.mark.parametrize(("family", "verb"), CASES, ids=[f"{f}.{v}" for f, v in CASES])
def test_verb_signature_and_return_type(family: str, verb: str) -> None:
    fn = getattr(_family(family), verb)
    kind = VERBS[family][verb]
    pos, kw = _positional(fn), _kw(fn)
    where = f"msfm.{family}.{verb}{inspect.signature(fn)}"
    listed = sorted(READ_OPTIONS & {p.name for p in _params(fn)})
    assert not listed, f"{where} lists reading options {listed}; take them as **read_options"
    if kind == "load":
        assert pos == ["checkpoint"], where
        assert kw["device"].default == "auto", where
        assert _returns(fn, Loaded), where
    elif kind == "convert":
        assert pos == ["official", "out"], where
        assert kw["overwrite"].default is False, where
        assert _returns(fn, Path), where
    elif kind in ("train", "make"):
        assert pos == ["data", "out"], where
        if kind == "train":
            assert {"config", "checkpoint"} <= set(kw), where
            assert kw["checkpoint"].default is None, where
            assert _has_var_kw(fn), f"{where}: flat setting overrides come as **overrides"
            assert _returns(fn, TrainResult), where
        else:
            assert _returns(fn, Result), where
    else:
        assert pos[:2] == ["data", "checkpoint"] or (family, verb) in {
            ("roam", "evaluate"),
            ("roam", "cascade"),
        }, where
        assert len(pos) <= 2 or (family, verb) in {("roam", "evaluate"), ("roam", "cascade")}, where
        if "device" in kw:
            assert kw["device"].default == "auto", where
        if kind == "annotate":
            assert kw["key_added"].default == family, where
            assert {"device", "copy", "progress", "out", "overwrite"} <= set(kw), where
            assert _returns(fn, AnnData), where
        elif kind == "new":
            assert {"device", "progress", "out", "overwrite"} <= set(kw), where
            assert _returns(fn, AnnData), where
        elif kind == "fit":
            assert {"out", "labels_key"} <= set(kw), where
            assert _returns(fn, TrainResult), where
        elif kind == "fit_task":  # a head trained for a task other than labels (perturbation, drug response)
            assert {"out", "overwrite", "progress", "seed", "allow_config_change"} <= set(kw), where
            assert _returns(fn, TrainResult), where
        else:
            assert _returns(fn, Result), where
        if family in READS_CELLS and kind in ("annotate", "new", "fit", "fit_task") and verb != "generate":
            assert _has_var_kw(fn), f"{where}: reading options come as **read_options"


DEP_CASES = [(f, old, new) for f in FAMILIES for old, new in DEPRECATED[f].items()]


@pytest.mark.parametrize(("family", "old", "new"), DEP_CASES, ids=[f"{f}.{o}" for f, o, _ in DEP_CASES])
def test_old_names_warn_and_name_the_new_call(family: str, old: str, new: str) -> None:
    mod = _family(family)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        obj = getattr(mod, old)
        if callable(obj) and not isinstance(obj, type):
            try:
                obj()
            except TypeError:  # called without arguments: the warning is given first
                pass
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert any(new in m for m in messages), (
        f"msfm.{family}.{old}: no DeprecationWarning naming {new} ({messages})"
    )


# ---------------------------------------------------------------------------------------------------------------
# the CLI mirrors the API
# ---------------------------------------------------------------------------------------------------------------
def _commands(family: str) -> dict:
    import importlib

    app = importlib.import_module(f"msfm.cli.{family}").app
    return typer.main.get_command(app).commands


def _shared_help() -> dict[str, str]:
    """Help text of every shared option, as cli/options.py declares it."""
    app = typer.Typer()

    from msfm.cli.options import read_options, trainer_options

    @app.command()
    @read_options("spatial")
    @trainer_options()
    def probe(read: dict, overrides: dict) -> None:  # pragma: no cover - only inspected
        """Probe."""

    cmd = typer.main.get_command(app)
    return {p.name: p.help for p in cmd.params}


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_options_are_the_shared_ones(family: str) -> None:
    shared = _shared_help()
    for name, cmd in _commands(family).items():
        if cmd.hidden or getattr(cmd, "deprecated", False):
            continue
        by_dest = {p.name: p for p in cmd.params}
        where = f"msfm {family} {name}"
        for bad in ("--model", "--run", "--classifier", "--features"):
            assert not any(bad in p.opts for p in cmd.params), f"{where} uses {bad}; use the shared options"
        if "checkpoint" in by_dest:
            assert sorted(by_dest["checkpoint"].opts) == ["--checkpoint", "-c"], where
        if "out" in by_dest:
            assert sorted(by_dest["out"].opts) == ["--out", "-o"], where
        for dest, p in by_dest.items():
            if dest in shared and dest not in ("checkpoint", "out", "batch_size", "seed"):
                assert p.help == shared[dest], f"{where} --{dest}: declare it through msfm.cli.options"
        if "preset" in by_dest:
            assert name == "train", f"{where}: --preset names a model preset, only on train"


def test_cli_roam_preprocess_has_no_preset_clash() -> None:
    cmd = _commands("roam")["preprocess"]
    assert not any("--preset" in p.opts for p in cmd.params)
