"""scMulan checkpoints: write one, load one (``load`` returns the shared :class:`~msfm.runtime.loaded.Loaded`).

A checkpoint directory is the shared msfm layout (``model.safetensors``, ``config.json``, ``meta.json``,
``genes.txt``) with the whole vocabulary stored in ``meta.json`` under ``extra.vocabulary`` and the
preprocessing under ``preprocessing``. ``Loaded.vocab`` is the :class:`~msfm.tokenizers.CellSentenceVocab`;
:func:`tokenizer_for` gives the tokenizer the checkpoint was trained with.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from msfm.errors import CheckpointError, MsfmInputError
from msfm.models.scmulan.config import ScMulanConfig
from msfm.models.scmulan.model import ScMulan
from msfm.runtime.checkpoint import load_checkpoint, save_checkpoint
from msfm.runtime.config import checkpoint_config
from msfm.runtime.devices import resolve_device
from msfm.runtime.loaded import Loaded
from msfm.runtime.results import TrainResult
from msfm.runtime.weights_check import build_checked_model
from msfm.tokenizers.cell_sentence import CellSentenceTokenizer, CellSentenceVocab

__all__ = ["FAMILY", "Checkpoint", "load", "preprocessing_record", "save_model", "tokenizer_for"]

FAMILY = "scmulan"
GeneOrder = Literal["reverse", "forward", "random"]
#: What every verb takes as its checkpoint: an msfm checkpoint directory, a training result or a loaded model.
Checkpoint = str | os.PathLike[str] | TrainResult | Loaded


def preprocessing_record(*, n_levels: int = 10, gene_order: GeneOrder = "reverse") -> dict[str, Any]:
    """The preprocessing that travels with every scMulan checkpoint."""
    return {
        "normalization": "log1p(counts / total * 1e4), total over all genes of the cell, float64; already-normalised input as it is",
        "target_sum": 1e4,
        "log1p": True,
        "binning": "per cell: levels = digitize(v, linspace(0, max_v, n_levels + 1), right=True), float64",
        "n_levels": n_levels,
        "genes": "expressed (> 0) vocabulary genes only",
        "gene_order": gene_order,
        "meta_and_task_level": 0,
    }


def save_model(
    path: str | Path,
    model: ScMulan,
    vocab: CellSentenceVocab,
    *,
    preprocessing: Mapping[str, Any] | None = None,
    extra_meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` and its vocabulary as an msfm checkpoint directory (atomically)."""
    if len(vocab) != model.config.vocab_size:
        msg = f"vocabulary has {len(vocab)} tokens but the model expects {model.config.vocab_size}."
        raise CheckpointError(msg)
    extra = dict(extra_meta or {})
    extra["vocabulary"] = vocab.to_dict()
    extra["vocabulary_sha256"] = vocab.sha256()
    return save_checkpoint(
        path,
        family=FAMILY,
        config=model.config,
        state_dict=model.state_dict(),
        gene_panel=list(vocab.genes),
        gene_panel_name="scmulan",
        preprocessing=dict(preprocessing or preprocessing_record(n_levels=model.config.n_levels)),
        extra_meta=extra,
    )


def load(checkpoint: Checkpoint, *, device: str | torch.device = "auto") -> Loaded:
    """Load an msfm scMulan checkpoint (written by ``convert`` or ``train``) for inference.

    Args:
        checkpoint: the checkpoint directory, a ``TrainResult`` of ``train``, or a ``Loaded`` (returned as it
            is with ``device="auto"``, else moved to ``device``).
        device: ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda:1"`` ...

    Returns:
        ``Loaded("scmulan", model, config, meta, path, device, vocab)`` with the model in eval mode and
        ``vocab`` the checkpoint's :class:`~msfm.tokenizers.CellSentenceVocab`.

    Raises:
        MsfmInputError: the path does not exist, or ``checkpoint`` is a Loaded of another family.
        CheckpointError: the directory is not a valid scMulan checkpoint: a ``config.json`` field unknown,
            mistyped or out of range, a model larger than ``msfm.runtime.weights_check.MAX_PARAMETERS``, or
            tensors missing, unexpected or of another shape or dtype than the config's model (checked on the
            file's header before any weight is read).
    """
    if isinstance(checkpoint, Loaded):
        if checkpoint.family != FAMILY:
            msg = f"Expected a scMulan model; got a loaded {checkpoint.family} model. Load a scMulan checkpoint."
            raise MsfmInputError(msg)
        if device == "auto" or torch.device(resolve_device(device)) == checkpoint.device:
            return checkpoint
        return checkpoint.to(resolve_device(device))
    if isinstance(checkpoint, TrainResult):
        checkpoint = checkpoint.checkpoint
    if isinstance(checkpoint, str | os.PathLike):
        if not Path(checkpoint).exists():
            msg = (
                f"scMulan checkpoint {str(checkpoint)!r} does not exist. Pass an msfm checkpoint directory, e.g. "
                "one written by `msfm scmulan convert ckpt_scMulan.pt -o DIR` or by `msfm scmulan train`."
            )
            raise MsfmInputError(msg)
    else:
        msg = (
            f"checkpoint must be an msfm scMulan checkpoint directory, a TrainResult or a Loaded model; got "
            f"{type(checkpoint).__name__}. Verbs take the data first and the checkpoint second, e.g. "
            "msfm.scmulan.generate(prompts, 'ckpt/scmulan')."
        )
        raise MsfmInputError(msg)
    ckpt = load_checkpoint(checkpoint, family=FAMILY, weights=False)
    config = checkpoint_config(ScMulanConfig, ckpt.config, ckpt.config_file)
    vocab_dict = ckpt.meta.get("extra", {}).get("vocabulary")
    if vocab_dict is None:
        msg = f"{ckpt.path} has no vocabulary in meta.json (extra.vocabulary); re-create it with msfm scmulan convert."
        raise CheckpointError(msg)
    vocab = CellSentenceVocab.from_dict(vocab_dict)
    if len(vocab) != config.vocab_size:
        msg = (
            f"{ckpt.path}: the vocabulary in meta.json has {len(vocab)} tokens but config.json says "
            f"vocab_size={config.vocab_size}; the files do not belong together. Re-export the checkpoint."
        )
        raise CheckpointError(msg)
    model, _ = build_checked_model(
        lambda: ScMulan(config),
        ckpt.weights_file,
        header=ckpt.tensors,
        config_file=ckpt.config_file,
        fields=config.model_dump(),
    )
    dev = resolve_device(device)
    model.to(dev).eval()
    return Loaded(FAMILY, model, config, ckpt.meta, Path(ckpt.path), dev, vocab)


def fresh_copy(checkpoint: Checkpoint) -> Loaded:
    """A CPU copy of a checkpoint whose weights may be changed (fine-tuning never alters a caller's model)."""
    if isinstance(checkpoint, Loaded) and checkpoint.path is None:
        model = copy.deepcopy(checkpoint.model).cpu()
        return Loaded(
            FAMILY, model, checkpoint.config, checkpoint.meta, None, torch.device("cpu"), checkpoint.vocab
        )
    path = checkpoint.path if isinstance(checkpoint, Loaded) else checkpoint
    return load(path, device="cpu")


def tokenizer_for(
    loaded: Loaded, *, gene_order: GeneOrder | None = None, max_genes: int | None = None
) -> CellSentenceTokenizer:
    """The tokenizer a checkpoint was trained with (its vocabulary, levels and gene order).

    Args:
        loaded: the model (``msfm.scmulan.load``).
        gene_order: override the checkpoint's order; ``"random"`` (a training augmentation) becomes
            ``"reverse"``, the release's deterministic inference order.
        max_genes: keep only the top-expressed genes of a cell.
    """
    order = gene_order or loaded.preprocessing.get("gene_order", "reverse")
    if order == "random":
        order = "reverse"
    return CellSentenceTokenizer(
        loaded.vocab, n_levels=loaded.config.n_levels, gene_order=order, max_genes=max_genes
    )
