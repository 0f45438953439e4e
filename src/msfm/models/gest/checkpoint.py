"""Save and load GeST models with their meta-cell vocabulary as one msfm checkpoint directory.

The vocabulary (PCA, meta-cell centroids and profiles, hierarchy) is stored in the same safetensors file as the
weights, under ``metacells.*``, so a checkpoint can quantise new cells exactly as in training. The window settings
(side in µm, ordering) and the expression preprocessing travel in ``meta.json``.

:func:`load` reads both kinds of GeST checkpoint: a pretrained model (``train``) and a niche classifier
(``fit_classifier``, meta family ``gest-niche``). Both come back as :class:`msfm.runtime.loaded.Loaded` with the
meta-cell vocabulary in ``vocab``; :func:`window_settings` gives the window settings the model was trained with.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from msfm.errors import CheckpointError
from msfm.models.gest.config import GestConfig
from msfm.models.gest.model import Gest, GestNicheClassifier
from msfm.runtime.checkpoint import load_checkpoint, save_checkpoint
from msfm.runtime.config import MAX_VOCAB, checkpoint_config
from msfm.runtime.devices import resolve_device
from msfm.runtime.loaded import Loaded
from msfm.runtime.weights_check import build_checked_model
from msfm.tokenizers.spatial import MetaCellVocab

__all__ = [
    "FAMILY",
    "NICHE_FAMILY",
    "VOCAB_PREFIX",
    "CheckpointLike",
    "WindowSettings",
    "checkpoint_state",
    "generative_model",
    "is_classifier",
    "load",
    "save_model",
    "window_settings",
]

FAMILY = "gest"
NICHE_FAMILY = "gest-niche"
VOCAB_PREFIX = "metacells."

#: What every GeST verb accepts as ``checkpoint``: a checkpoint directory, a ``TrainResult`` or a ``Loaded``.
CheckpointLike = str | os.PathLike[str] | Loaded


@dataclass(frozen=True)
class WindowSettings:
    """The window settings a GeST checkpoint was trained with (``meta["extra"]["window"]``).

    Attributes:
        side_um: window side in µm.
        max_cells: most cells per training window.
        order: serialisation order.
        jitter_um: corner-sweep jitter (None: 5 % of the side).
        niche_side_um: niche window side of a niche classifier (None for a pretrained model).
        niche_max_cells: cells per niche sequence of a niche classifier (None for a pretrained model).
    """

    side_um: float = 600.0
    max_cells: int = 1024
    order: str = "corner_sweep"
    jitter_um: float | None = None
    niche_side_um: float | None = None
    niche_max_cells: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """The settings as stored in ``meta.json``."""
        out: dict[str, Any] = {
            "side_um": self.side_um,
            "max_cells": self.max_cells,
            "order": self.order,
            "jitter_um": self.jitter_um,
        }
        if self.niche_side_um is not None:
            out["niche_side_um"] = self.niche_side_um
        if self.niche_max_cells is not None:
            out["niche_max_cells"] = self.niche_max_cells
        return out


def window_settings(loaded: Loaded) -> WindowSettings:
    """Window settings of a loaded GeST checkpoint (defaults for fields an older checkpoint lacks)."""
    raw = dict(loaded.extra.get("window") or {})
    known = {k: raw[k] for k in WindowSettings.__dataclass_fields__ if raw.get(k) is not None}
    return WindowSettings(**known)


def checkpoint_state(model: Gest | GestNicheClassifier, vocab: MetaCellVocab) -> dict[str, torch.Tensor]:
    """Weights plus vocabulary tensors, as stored in ``model.safetensors``."""
    state = dict(model.state_dict().items())
    state.update({VOCAB_PREFIX + k: v for k, v in vocab.to_tensors().items()})
    return state


def save_model(
    path: str | Path,
    model: Gest,
    vocab: MetaCellVocab,
    *,
    window: Mapping[str, Any] | WindowSettings,
    preprocessing: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` and ``vocab`` as an msfm checkpoint directory (atomically).

    Args:
        path: directory to create or replace.
        model: the network.
        vocab: its meta-cell vocabulary.
        window: window settings (``side_um`` at least).
        preprocessing: expression preprocessing record.
        extra: further provenance for ``meta.json['extra']``.

    Returns:
        The checkpoint directory.
    """
    win = window.as_dict() if isinstance(window, WindowSettings) else dict(window)
    return save_checkpoint(
        path,
        family=FAMILY,
        config=model.config,
        state_dict=checkpoint_state(model, vocab),
        gene_panel=vocab.genes,
        gene_panel_name="gest",
        preprocessing=dict(preprocessing or {}),
        extra_meta={"window": win, "vocab": vocab.meta_dict(), **dict(extra or {})},
    )


def is_classifier(loaded: Loaded) -> bool:
    """True when ``loaded`` is a niche classifier (``fit_classifier``), not a pretrained generative model."""
    return isinstance(loaded.model, GestNicheClassifier)


def generative_model(loaded: Loaded, verb: str) -> Gest:
    """The pretrained GeST network of ``loaded``.

    Raises:
        CheckpointError: ``loaded`` is a niche classifier.
    """
    if is_classifier(loaded):
        msg = (
            f"{loaded.path or 'this checkpoint'} is a GeST niche classifier (msfm.gest.fit_classifier); "
            f"msfm.gest.{verb} needs a pretrained GeST checkpoint (msfm.gest.train, RUN/model)."
        )
        raise CheckpointError(msg)
    return loaded.model


def load(checkpoint: CheckpointLike, *, device: str | torch.device = "auto") -> Loaded:
    """Load a GeST checkpoint directory (a pretrained model or a niche classifier).

    Args:
        checkpoint: the checkpoint directory (``RUN/model``), a ``TrainResult``, or a ``Loaded`` (passed through,
            moved to ``device``).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Returns:
        ``Loaded(family="gest", model, config=GestConfig, meta, path, device, vocab=MetaCellVocab)``; the model is
        a :class:`~msfm.models.gest.model.Gest` or, for a niche classifier, a
        :class:`~msfm.models.gest.model.GestNicheClassifier` (classes in ``loaded.extra["classes"]``).

    Raises:
        CheckpointError: not a GeST checkpoint, a ``config.json`` field unknown, mistyped or out of range, a model
            larger than ``msfm.runtime.weights_check.MAX_PARAMETERS``, tensors missing, unexpected or of another
            shape or dtype than the config's model (checked on the file's header before any weight is read), or a
            vocabulary that does not match the config.
    """
    dev = resolve_device(device)
    if isinstance(checkpoint, Loaded):
        if checkpoint.family != FAMILY:
            msg = f"Expected a GeST model; got a loaded {checkpoint.family!r} model. Load a GeST checkpoint."
            raise CheckpointError(msg)
        return checkpoint.to(dev)
    path = Path(checkpoint)
    ckpt = load_checkpoint(path, map_location="cpu", weights=False)
    if ckpt.family not in (FAMILY, NICHE_FAMILY):
        msg = (
            f"Checkpoint {path} is a {ckpt.family!r} checkpoint, but a GeST checkpoint was requested. "
            f"Use msfm.{ckpt.family} to load it, or pass a GeST checkpoint (msfm.gest.train writes RUN/model)."
        )
        raise CheckpointError(msg)
    config = checkpoint_config(GestConfig, ckpt.config, ckpt.config_file)
    extra = ckpt.meta.get("extra", {})
    if not any(k.startswith(VOCAB_PREFIX) for k in ckpt.tensors) or "vocab" not in extra:
        msg = f"{path} has no meta-cell vocabulary (no '{VOCAB_PREFIX}*' tensors); it cannot tokenise cells."
        raise CheckpointError(msg)
    n_classes = 0
    if ckpt.family == NICHE_FAMILY:
        classes = extra.get("classes")
        if not classes or not isinstance(classes, list) or len(classes) > MAX_VOCAB:
            msg = (
                f"{path} lacks the class list of a GeST niche classifier (meta.json extra.classes: a list of "
                f"1 to {MAX_VOCAB} names); re-export it with msfm.gest.fit_classifier."
            )
            raise CheckpointError(msg)
        n_classes = len(classes)

    def build() -> Gest | GestNicheClassifier:
        return GestNicheClassifier(Gest(config), n_classes) if n_classes else Gest(config)

    model, others = build_checked_model(
        build,
        ckpt.weights_file,
        header=ckpt.tensors,
        config_file=ckpt.config_file,
        fields={**config.model_dump(), **({"classes": n_classes} if n_classes else {})},
        skip_prefixes=(VOCAB_PREFIX,),
    )
    vocab_state = {k[len(VOCAB_PREFIX) :]: v for k, v in others.items()}
    vocab = MetaCellVocab.from_tensors(vocab_state, extra["vocab"])
    if vocab.n_metacells != config.n_metacells or vocab.n_genes != config.n_genes:
        msg = (
            f"{path}: vocabulary has K={vocab.n_metacells}, T={vocab.n_genes}; the model expects "
            f"K={config.n_metacells}, T={config.n_genes}."
        )
        raise CheckpointError(msg)
    model.eval().to(dev)
    return Loaded(
        family=FAMILY, model=model, config=config, meta=ckpt.meta, path=path, device=dev, vocab=vocab
    )
