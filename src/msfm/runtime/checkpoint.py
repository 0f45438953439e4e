"""msfm checkpoint directories: weights in safetensors plus the JSON that makes them self-describing.

Layout (see ``docs/architecture.md``)::

    CKPT_DIR/
      model.safetensors   # weights under our key names
      config.json         # {"family": ..., "config": {...}}
      meta.json           # msfm/schema version, family, created, gene panel, preprocessing, extra
      genes.txt           # gene panel, one symbol a line (only when the family has a panel)

Checkpoints are written with :func:`msfm.runtime.atomic.atomic_dir` and never contain pickles, so loading one runs no
code from the file.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from msfm._version import CHECKPOINT_SCHEMA_VERSION, __version__
from msfm.errors import CheckpointError, MsfmInputError
from msfm.runtime.atomic import atomic_dir, atomic_write_json, atomic_write_text
from msfm.runtime.safetensors import write_safetensors_atomic
from msfm.runtime.weights_check import TensorSpec, read_safetensors_header, read_safetensors_tensors

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
META_FILE = "meta.json"
GENES_FILE = "genes.txt"
REQUIRED_FILES = (WEIGHTS_FILE, CONFIG_FILE, META_FILE)
# Files that are training snapshots of a foreign format; pointing at one means the user wants `convert`.
_FOREIGN_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".tar"}

__all__ = [
    "CONFIG_FILE",
    "GENES_FILE",
    "META_FILE",
    "REQUIRED_FILES",
    "WEIGHTS_FILE",
    "LoadedCheckpoint",
    "gene_panel_sha256",
    "is_checkpoint_dir",
    "load_checkpoint",
    "save_checkpoint",
]


@dataclass(frozen=True)
class LoadedCheckpoint:
    """Everything read back from an msfm checkpoint directory.

    Attributes:
        family: Model family name (``"scfoundation"``, ...).
        config: The family's model config as a plain dict (build the typed config with ``Config(**config)``).
        state_dict: Weights, keyed by our parameter names.
        meta: Contents of ``meta.json``.
        gene_panel: Gene symbols in panel order, or None when the checkpoint has no panel.
        path: The checkpoint directory.
        tensors: Name, shape and dtype of every tensor in ``model.safetensors`` (its header; always read).
            Family loaders check these against the model the config describes before reading any weight
            (:func:`msfm.runtime.weights_check.build_checked_model`).
    """

    family: str
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]
    gene_panel: list[str] | None
    path: Path
    tensors: Mapping[str, TensorSpec] = field(default_factory=dict)

    @property
    def weights_file(self) -> Path:
        """The checkpoint's ``model.safetensors``."""
        return self.path / WEIGHTS_FILE

    @property
    def config_file(self) -> Path:
        """The checkpoint's ``config.json``."""
        return self.path / CONFIG_FILE


def gene_panel_sha256(symbols: Sequence[str]) -> str:
    """Hash an ordered gene panel.

    Args:
        symbols: Gene symbols in panel order.

    Returns:
        Hex SHA-256 of the symbols joined by newlines (UTF-8). Order matters, as it does for the model.
    """
    return hashlib.sha256("\n".join(symbols).encode("utf-8")).hexdigest()


def _config_to_dict(config: Any) -> dict[str, Any]:
    # pydantic models dump to JSON-safe types (tuples -> lists, enums -> values); dicts must already be JSON-safe.
    if hasattr(config, "model_dump"):
        dumped = config.model_dump(mode="json")
    elif isinstance(config, Mapping):
        dumped = dict(config)
    else:
        msg = (
            f"save_checkpoint got config of type {type(config).__name__}; expected a pydantic model or a dict. "
            "Pass the family's config object (or config.model_dump())."
        )
        raise MsfmInputError(msg)
    try:
        json.dumps(dumped)
    except (TypeError, ValueError) as err:
        msg = (
            f"The model config is not JSON-serialisable ({err}). Use plain numbers, strings, lists and dicts."
        )
        raise MsfmInputError(msg) from err
    return dumped


def save_checkpoint(
    path: PathLike,
    *,
    family: str,
    config: Any,
    state_dict: Mapping[str, torch.Tensor],
    gene_panel: Sequence[str] | None = None,
    gene_panel_name: str | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    extra_meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write an msfm checkpoint directory atomically.

    An existing directory at ``path`` is replaced only once the new one is completely written.

    Args:
        path: Checkpoint directory to create (or replace).
        family: Model family name; stored in ``config.json`` and ``meta.json``.
        config: The model config (pydantic model or JSON-serialisable dict).
        state_dict: Weights. Tensors are copied to CPU, made contiguous, and tied tensors are stored once per name.
        gene_panel: Gene symbols in panel order; written to ``genes.txt`` and hashed into ``meta.json``.
        gene_panel_name: Name of the panel (defaults to ``gene_panel.name`` when the panel object has one).
        preprocessing: Preprocessing parameters that travel with the weights (normalisation, target sum, ...).
        extra_meta: Further JSON-serialisable provenance (train step, source checkpoint, ...).

    Returns:
        The checkpoint directory.

    Raises:
        MsfmInputError: If the family is empty, the config/meta is not JSON-serialisable or a gene symbol is
            unusable.
    """
    if not isinstance(family, str) or not family:
        msg = (
            f"save_checkpoint got family={family!r}; expected a non-empty family name such as 'scfoundation'."
        )
        raise MsfmInputError(msg)
    config_dict = _config_to_dict(config)
    panel: list[str] | None = None
    panel_meta: dict[str, Any] | None = None
    if gene_panel is not None:
        panel = [str(g) for g in gene_panel]
        bad = [g for g in panel if not g or "\n" in g or "\r" in g or g != g.strip()]
        if bad:
            msg = (
                f"The gene panel has {len(bad)} unusable symbols (empty, surrounding whitespace or line breaks), "
                f"e.g. {bad[:3]!r}. Clean the symbols before saving."
            )
            raise MsfmInputError(msg)
        name = gene_panel_name if gene_panel_name is not None else getattr(gene_panel, "name", None)
        panel_meta = {
            "name": name,
            "size": len(panel),
            "sha256": gene_panel_sha256(panel),
            "file": GENES_FILE,
        }
    meta = {
        "msfm_version": __version__,
        "schema_version": CHECKPOINT_SCHEMA_VERSION,
        "family": family,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "gene_panel": panel_meta,
        "preprocessing": dict(preprocessing) if preprocessing is not None else None,
        "extra": dict(extra_meta) if extra_meta is not None else {},
    }
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as err:
        msg = f"preprocessing/extra_meta are not JSON-serialisable ({err}). Use plain Python values."
        raise MsfmInputError(msg) from err

    target = Path(path)
    with atomic_dir(target) as tmp:
        write_safetensors_atomic(
            state_dict,
            tmp / WEIGHTS_FILE,
            metadata={"format": "pt", "family": family, "msfm_version": __version__},
        )
        atomic_write_json(tmp / CONFIG_FILE, {"family": family, "config": config_dict})
        atomic_write_json(tmp / META_FILE, meta)
        if panel is not None:
            atomic_write_text(tmp / GENES_FILE, "\n".join(panel) + "\n")
    logger.info("saved %s checkpoint to %s (%d tensors)", family, target, len(state_dict))
    return target


def is_checkpoint_dir(path: PathLike) -> bool:
    """Tell whether ``path`` looks like an msfm checkpoint directory (all required files present).

    Args:
        path: Candidate directory.

    Returns:
        True when ``path`` is a directory holding ``model.safetensors``, ``config.json`` and ``meta.json``.
    """
    p = Path(path)
    return p.is_dir() and all((p / name).is_file() for name in REQUIRED_FILES)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        msg = f"Cannot read {path}: {err}. The checkpoint is damaged; re-export or re-download it."
        raise CheckpointError(msg) from err
    if not isinstance(data, dict):
        msg = f"{path} holds a JSON {type(data).__name__}; expected an object. The checkpoint is damaged."
        raise CheckpointError(msg)
    return data


def _check_layout(p: Path, family: str | None) -> None:
    fam = family or "<family>"
    if not p.exists():
        msg = (
            f"Checkpoint directory {p} does not exist. Pass a directory written by msfm (save/train/convert)."
        )
        raise CheckpointError(msg)
    if p.is_file():
        if p.suffix.lower() in _FOREIGN_SUFFIXES:
            hint = f"Convert it once with `msfm {fam} convert {p} OUT_DIR`, then load OUT_DIR."
        elif p.name == WEIGHTS_FILE:
            hint = f"Pass its folder instead: {p.parent}."
        else:
            hint = f"If it is an upstream checkpoint, convert it with `msfm {fam} convert {p} OUT_DIR`."
        msg = f"Expected an msfm checkpoint directory, got the file {p}. {hint}"
        raise CheckpointError(msg)
    missing = [name for name in REQUIRED_FILES if not (p / name).is_file()]
    if missing:
        msg = (
            f"Checkpoint directory {p} is missing {', '.join(missing)} (expected {', '.join(REQUIRED_FILES)}). "
            "It may be incomplete or not an msfm checkpoint; re-export it, or convert an upstream checkpoint "
            f"with `msfm {fam} convert`."
        )
        raise CheckpointError(msg)


def _check_schema(meta: dict[str, Any], p: Path) -> None:
    schema = meta.get("schema_version")
    if not isinstance(schema, int) or isinstance(schema, bool) or schema < 1:
        msg = f"{p / META_FILE} has schema_version={schema!r}; expected a positive integer. The checkpoint is damaged."
        raise CheckpointError(msg)
    if schema > CHECKPOINT_SCHEMA_VERSION:
        msg = (
            f"Checkpoint {p} uses schema version {schema} (written by msfm {meta.get('msfm_version', '?')}), "
            f"but this msfm {__version__} reads schema versions up to {CHECKPOINT_SCHEMA_VERSION}. "
            "Upgrade msfm: `pip install -U msfm`."
        )
        raise CheckpointError(msg)


def load_checkpoint(
    path: PathLike,
    *,
    family: str | None = None,
    map_location: str | torch.device = "cpu",
    weights: bool = True,
) -> LoadedCheckpoint:
    """Load and validate an msfm checkpoint directory.

    Args:
        path: The checkpoint directory.
        family: Expected family; a checkpoint of another family raises.
        map_location: Device to load the tensors onto.
        weights: Read the tensors into ``state_dict``. False reads only the JSON files and the weights' header
            (``tensors``), so a loader can check the config and the tensors' shapes and dtypes before anything
            big is allocated.

    Returns:
        The loaded checkpoint.

    Raises:
        CheckpointError: If the directory is missing, a file is given instead of a directory, required files are
            missing, the schema is newer than this msfm, the family does not match, or the files are damaged.
    """
    p = Path(path)
    _check_layout(p, family)
    meta = _read_json(p / META_FILE)
    _check_schema(meta, p)
    config_doc = _read_json(p / CONFIG_FILE)
    ckpt_family = config_doc.get("family")
    if not isinstance(ckpt_family, str) or not isinstance(config_doc.get("config"), dict):
        msg = f"{p / CONFIG_FILE} must hold {{'family': str, 'config': {{...}}}}; got keys {sorted(config_doc)}."
        raise CheckpointError(msg)
    if meta.get("family") not in (None, ckpt_family):
        msg = (
            f"Checkpoint {p} is inconsistent: config.json says family {ckpt_family!r}, meta.json says "
            f"{meta.get('family')!r}. Re-export it."
        )
        raise CheckpointError(msg)
    if family is not None and ckpt_family != family:
        msg = (
            f"Checkpoint {p} is a {ckpt_family!r} checkpoint, but a {family!r} checkpoint was requested. "
            f"Use msfm.{ckpt_family} to load it, or pass a {family} checkpoint."
        )
        raise CheckpointError(msg)

    gene_panel = _read_gene_panel(p, meta)
    header = read_safetensors_header(p / WEIGHTS_FILE)
    state_dict: dict[str, torch.Tensor] = {}
    if weights:
        device = str(map_location) if isinstance(map_location, torch.device) else map_location
        state_dict = read_safetensors_tensors(p / WEIGHTS_FILE, device=device)
    logger.debug("loaded %s checkpoint %s (%d tensors)", ckpt_family, p, len(header))
    return LoadedCheckpoint(
        family=ckpt_family,
        config=config_doc["config"],
        state_dict=state_dict,
        meta=meta,
        gene_panel=gene_panel,
        path=p,
        tensors=header,
    )


def _read_gene_panel(p: Path, meta: dict[str, Any]) -> list[str] | None:
    panel_meta = meta.get("gene_panel")
    genes_path = p / GENES_FILE
    if not panel_meta:
        return None
    if not genes_path.is_file():
        msg = f"Checkpoint {p} declares a gene panel in meta.json but {GENES_FILE} is missing. Re-export it."
        raise CheckpointError(msg)
    symbols = [line for line in genes_path.read_text(encoding="utf-8").splitlines() if line]
    expected = panel_meta.get("sha256") if isinstance(panel_meta, dict) else None
    if expected is not None and gene_panel_sha256(symbols) != expected:
        msg = (
            f"{genes_path} does not match the panel hash in meta.json ({len(symbols)} symbols read, "
            f"{panel_meta.get('size')} expected). The file was edited or damaged; restore it or re-export."
        )
        raise CheckpointError(msg)
    return symbols
