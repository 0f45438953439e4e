"""``msfm.roam.load``: one ROAM checkpoint, or the fold ensemble of a training run, ready for inference.

What ``checkpoint`` may be, wherever a ROAM verb takes one:

* an msfm ROAM checkpoint directory (``model.safetensors`` + ``config.json`` + ``meta.json``): ``Loaded.model`` is
  the :class:`~msfm.models.roam.model.Roam`;
* a finished ``msfm roam train`` run directory, or the :class:`~msfm.runtime.results.TrainResult` that ``train``
  returned: ``Loaded.model`` is a :class:`RoamEnsemble` of its ``fold*/best`` models (predictions are the mean
  softmax over the folds, as the release does);
* a list of checkpoint or run directories (or, as text, several joined by ``+``): one :class:`RoamEnsemble`;
* a :class:`~msfm.runtime.loaded.Loaded`: passed through, moved to ``device``.

The class names, task, patch encoder and feature dimension are in ``Loaded.extra`` (``meta["extra"]``) either way,
and are properties of :class:`RoamEnsemble`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from msfm.errors import MsfmInputError
from msfm.models.roam.checkpoint import FAMILY, read_model
from msfm.models.roam.model import Roam
from msfm.runtime.checkpoint import is_checkpoint_dir
from msfm.runtime.devices import resolve_device
from msfm.runtime.loaded import Loaded

__all__ = [
    "BEST_DIR",
    "DONE_FILE",
    "RoamEnsemble",
    "checkpoint_sources",
    "ensemble_for",
    "ensemble_of",
    "load",
    "run_checkpoints",
]

BEST_DIR = "best"
DONE_FILE = "done.json"


class RoamEnsemble(nn.Module):
    """ROAM models predicting the same task (the folds of a run), averaged as the release does.

    ``forward`` returns the mean softmax probabilities over the models; :attr:`models` is an ``nn.ModuleList``, so
    ``.to(device)``, ``.eval()`` and ``.parameters()`` reach every fold.

    Args:
        models: The models (same classes and feature dimension).
        class_names: Class names in logit order.
        task: Task name stored with the models (None if unknown or mixed).
        encoder: Patch encoder the models were trained on (None if unknown).
        sources: Checkpoint directory of each model.
        metas: ``meta.json`` of each model.
    """

    def __init__(
        self,
        models: Sequence[Roam],
        *,
        class_names: Sequence[str],
        task: str | None = None,
        encoder: str | None = None,
        sources: Sequence[Path] = (),
        metas: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        super().__init__()
        if not models:
            msg = "A ROAM ensemble needs at least one model."
            raise MsfmInputError(msg)
        self.models = nn.ModuleList(models)
        self.class_names = [str(c) for c in class_names]
        self.task = task
        self.encoder = encoder
        self.sources = [Path(s) for s in sources]
        self.metas = [dict(m) for m in metas]

    @property
    def config(self) -> Any:
        """The :class:`~msfm.models.roam.config.RoamConfig` of the first model."""
        return self.models[0].config

    @property
    def feature_dim(self) -> int:
        """Input feature dimension (``d_in``) shared by the models."""
        return int(self.models[0].config.d_in)

    def forward(
        self, features: torch.Tensor, roi_mask: torch.Tensor | None = None, *, roi_chunk: int | None = None
    ) -> torch.Tensor:
        """Mean softmax class probabilities of the models.

        Shape:
            features ``[B, K, 84, d_in]``, roi_mask ``[B, K]`` -> ``[B, C]``.
        """
        probs = [m(features, roi_mask, roi_chunk=roi_chunk).logits.float().softmax(-1) for m in self.models]
        return torch.stack(probs).mean(0)

    def __len__(self) -> int:
        return len(self.models)


def run_checkpoints(run: Path) -> list[Path]:
    """The ``fold*/best`` checkpoints of a finished run (empty when ``run`` has no fold folders).

    Raises:
        MsfmInputError: A fold is not finished.
    """
    folds = sorted(
        (p for p in run.glob("fold*") if p.is_dir() and p.name[4:].isdigit()), key=lambda p: int(p.name[4:])
    )
    if not folds:
        return []
    unfinished = [p.name for p in folds if not (p / DONE_FILE).is_file() or not (p / BEST_DIR).is_dir()]
    if unfinished:
        msg = (
            f"Run {run} is not finished: {unfinished} have no exported best model yet. Finish it by repeating the "
            "same `msfm roam train` command (it resumes), or pass the finished fold checkpoints (RUN/foldK/best)."
        )
        raise MsfmInputError(msg)
    return [p / BEST_DIR for p in folds]


def checkpoint_sources(source: Any) -> list[Path] | Path:
    """One path, or the list of paths of a list or of ``"a+b"`` text (several checkpoints joined by ``+``)."""
    if isinstance(source, str | os.PathLike):
        p = Path(source)
        text = os.fspath(source)
        if "+" in text and not p.exists():
            return [Path(s) for s in text.split("+") if s]
        return p
    if isinstance(source, Sequence) and not isinstance(source, bytes):
        out: list[Path] = []
        for item in source:
            found = checkpoint_sources(item)
            out.extend(found if isinstance(found, list) else [found])
        return out
    msg = (
        f"A ROAM checkpoint must be a path (checkpoint or run directory), a list of them, a TrainResult or a Loaded; "
        f"got {type(source).__name__}."
    )
    raise MsfmInputError(msg)


def _checkpoint_dirs(source: Any) -> tuple[list[Path], bool]:
    """The checkpoint directories of ``source`` and whether they form an ensemble (a run or a list)."""
    found = checkpoint_sources(source)
    items = found if isinstance(found, list) else [found]
    dirs: list[Path] = []
    for p in items:
        if is_checkpoint_dir(p):
            dirs.append(p)
            continue
        runs = run_checkpoints(p) if p.is_dir() else []
        if not runs:
            msg = (
                f"{p} is neither an msfm ROAM checkpoint directory (model.safetensors + config.json + meta.json) "
                "nor a finished `msfm roam train` run directory (fold*/best)."
            )
            raise MsfmInputError(msg)
        dirs.extend(runs)
    if not dirs:
        msg = f"No ROAM model found in {source!r}."
        raise MsfmInputError(msg)
    return dirs, isinstance(found, list) or len(dirs) > 1 or dirs[0] != found


def _class_names(model: Roam, meta: Mapping[str, Any]) -> list[str]:
    extra = meta.get("extra", {}) or {}
    names = extra.get("class_names") or model.config.class_names
    if names is None:
        return [str(i) for i in range(model.config.n_classes)]
    return [str(n) for n in names]


def _encoder_name(extra: Mapping[str, Any]) -> str | None:
    enc = extra.get("encoder")
    return enc.get("name") if isinstance(enc, Mapping) else enc


def _ensemble(
    models: Sequence[Roam], metas: Sequence[Mapping[str, Any]], sources: Sequence[Path]
) -> RoamEnsemble:
    names = [_class_names(m, meta) for m, meta in zip(models, metas)]
    if any(n != names[0] for n in names):
        msg = (
            f"The models disagree on the classes: {dict(zip(map(str, sources), names))}. Ensemble models of one "
            "task only."
        )
        raise MsfmInputError(msg)
    dims = {int(m.config.d_in) for m in models}
    if len(dims) != 1:
        msg = (
            f"The models expect different feature dimensions {sorted(dims)}; they cannot share feature files."
        )
        raise MsfmInputError(msg)
    extras = [meta.get("extra", {}) or {} for meta in metas]
    tasks = {e.get("task") for e in extras}
    encoders = {_encoder_name(e) for e in extras}
    return RoamEnsemble(
        models,
        class_names=names[0],
        task=next(iter(tasks)) if len(tasks) == 1 else None,
        encoder=next(iter(encoders)) if len(encoders) == 1 else None,
        sources=sources,
        metas=metas,
    )


def _ensemble_meta(ens: RoamEnsemble) -> dict[str, Any]:
    first = ens.metas[0] if ens.metas else {}
    first_extra = first.get("extra", {}) or {}
    return {
        "family": FAMILY,
        "msfm_version": first.get("msfm_version"),
        "preprocessing": first.get("preprocessing") or {},
        "extra": {
            "task": ens.task,
            "class_names": list(ens.class_names),
            "encoder": first_extra.get("encoder") if ens.encoder is not None else None,
            "feature_dim": ens.feature_dim,
            "n_models": len(ens),
            "checkpoints": [str(s) for s in ens.sources],
        },
        "members": list(ens.metas),
    }


def load(checkpoint: Any, *, device: str | torch.device = "auto") -> Loaded:
    """Load a ROAM checkpoint, a training run's fold ensemble, or a list of checkpoints.

    Args:
        checkpoint: A checkpoint directory, a run directory (or the ``TrainResult`` of ``train``), a list of those,
            or a ``Loaded`` (passed through). See the module docstring.
        device: ``"auto"`` (CUDA, else MPS, else CPU), ``"cpu"``, ``"cuda:N"``, ...

    Returns:
        ``Loaded("roam", model, config, meta, path, device)``: ``model`` is a :class:`Roam` for one checkpoint
        directory and a :class:`RoamEnsemble` for a run or a list (``path`` is then the run, or None for a list);
        ``meta["extra"]`` holds ``class_names``, ``task``, ``encoder`` and ``feature_dim``.

    Raises:
        MsfmInputError: An unfinished run, a path that is neither a checkpoint nor a run, or models that disagree
            on classes or feature dimension.
        CheckpointError: A damaged checkpoint or one of another family.
    """
    dev = resolve_device(device)
    if isinstance(checkpoint, Loaded):
        if checkpoint.family != FAMILY:
            msg = f"This is a {checkpoint.family} model; ROAM verbs need a ROAM checkpoint or run."
            raise MsfmInputError(msg)
        return checkpoint if checkpoint.device == dev else checkpoint.to(dev)
    dirs, is_ensemble = _checkpoint_dirs(checkpoint)
    models, metas = [], []
    for d in dirs:
        model, meta = read_model(d, map_location="cpu")
        models.append(model.to(dev).eval())
        metas.append(meta)
    if not is_ensemble:
        return Loaded(FAMILY, models[0], models[0].config, metas[0], dirs[0], dev)
    ens = _ensemble(models, metas, dirs).eval()
    found = checkpoint_sources(checkpoint)
    path = found if isinstance(found, Path) else None
    return Loaded(FAMILY, ens, ens.config, _ensemble_meta(ens), path, dev)


def ensemble_of(loaded: Loaded) -> RoamEnsemble:
    """The models of a loaded ROAM checkpoint as an ensemble (one checkpoint: an ensemble of one)."""
    if isinstance(loaded.model, RoamEnsemble):
        return loaded.model
    sources = [loaded.path] if loaded.path is not None else []
    return _ensemble([loaded.model], [loaded.meta], sources)


def ensemble_for(checkpoint: Any, *, device: str | torch.device = "auto") -> RoamEnsemble:
    """:func:`load`, then :func:`ensemble_of`: the models every prediction verb averages."""
    return ensemble_of(load(checkpoint, device=device))
