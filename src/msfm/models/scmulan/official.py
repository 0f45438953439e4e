"""Load official scMulan checkpoints (``ckpt_scMulan.pt``) into msfm names.

Upstream: SuperBianC/scMulan (commit d64da5e), ``scMulan/model/model.py``. The official file is a
``torch.save`` of ``{"model": state_dict, "model_args": {...}}`` with nanoGPT key names
(``transformer.wte``, ``transformer.h.{i}.attn.c_attn``, ``lm_head``, ``epx_head``, ...). Keys are mapped by
an explicit table and checked key by key and shape by shape before anything is returned; the file is read
with ``weights_only=True`` so no code in it can run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import Tensor

from msfm.errors import CheckpointError
from msfm.models.scmulan.config import ScMulanConfig
from msfm.models.scmulan.model import ScMulan
from msfm.nn.state_dict import check_layout, rename_keys, strip_prefix
from msfm.runtime.safe_load import load_torch_file

__all__ = [
    "config_from_official",
    "config_to_official",
    "convert_official_state_dict",
    "expected_state_dict_shapes",
    "load_official_checkpoint",
    "official_key_table",
    "to_official_state_dict",
]

# Official model_args fields that carry no shape or behaviour in our port. ``block_size`` is unused by the
# released forward (no position table), ``bias`` must be False, ``train_mode``/``ele``/``beta`` are training
# switches of upstream code.
_IGNORED_ARGS = ("block_size", "bias", "train_mode", "ele", "beta", "dropout")

_BLOCK_KEYS = {
    "ln_1.weight": "norm1.weight",
    "attn.c_attn.weight": "attn.in_proj_weight",
    "attn.c_proj.weight": "attn.out_proj.weight",
    "ln_2.weight": "norm2.weight",
    "mlp.c_fc.weight": "mlp.fc.weight",
    "mlp.c_proj.weight": "mlp.proj.weight",
}


def official_key_table(depth: int) -> dict[str, str]:
    """Official key -> msfm key for a model with ``depth`` blocks."""
    table = {
        "transformer.wte.weight": "token_embed.weight",
        "transformer.wee.weight": "level_embed.weight",
        "transformer.ln_f.weight": "norm.weight",
        "lm_head.weight": "entity_head.weight",
        "epx_head.weight": "expression_head.weight",
    }
    for i in range(depth):
        for src, dst in _BLOCK_KEYS.items():
            table[f"transformer.h.{i}.{src}"] = f"blocks.{i}.{dst}"
    return table


def config_from_official(model_args: Mapping[str, Any]) -> ScMulanConfig:
    """Translate official ``model_args`` into :class:`ScMulanConfig`.

    Raises:
        CheckpointError: when a required field is missing, ``bias`` is True, ``ele`` is not 1 (only the
            learned level embedding exists in the release), or the values are invalid.
    """
    required = ("vocab_size", "n_layer", "n_head", "n_embd")
    missing = [k for k in required if k not in model_args]
    if missing:
        msg = (
            f"official model_args lack {missing}; found keys {sorted(model_args)}. Expected the scMulan "
            f"MulanConfig fields (vocab_size, n_layer, n_head, n_embd, expression_level, ...)."
        )
        raise CheckpointError(msg)
    if model_args.get("bias", False):
        msg = "official model_args say bias=True; the released scMulan has no biases and msfm supports only that."
        raise CheckpointError(msg)
    if model_args.get("ele", 1) != 1:
        msg = (
            f"official model_args say ele={model_args['ele']}; only ele=1 (learned level embedding, the release) "
            f"is supported."
        )
        raise CheckpointError(msg)
    try:
        return ScMulanConfig(
            vocab_size=int(model_args["vocab_size"]),
            dim=int(model_args["n_embd"]),
            depth=int(model_args["n_layer"]),
            num_heads=int(model_args["n_head"]),
            n_levels=int(model_args.get("expression_level", 10)),
            max_length=max(int(model_args.get("block_size", 2048)), 2048),
        )
    except ValidationError as err:
        msg = f"official model_args {dict(model_args)} do not describe a valid scMulan model:\n{err}"
        raise CheckpointError(msg) from err


def config_to_official(config: ScMulanConfig) -> dict[str, Any]:
    """``model_args`` in the official format (for exporting back to the official layout)."""
    return {
        "block_size": config.max_length,
        "vocab_size": config.vocab_size,
        "n_layer": config.depth,
        "n_head": config.num_heads,
        "n_embd": config.dim,
        "dropout": 0.0,
        "bias": False,
        "train_mode": "pretrian",  # the official default string, typo included
        "expression_level": config.n_levels,
        "ele": 1,
    }


def expected_state_dict_shapes(config: ScMulanConfig) -> dict[str, torch.Size]:
    """msfm key -> shape for ``config`` (built on the meta device: no memory is allocated)."""
    with torch.device("meta"):
        model = ScMulan(config)
    return {k: v.shape for k, v in model.state_dict().items()}


def convert_official_state_dict(state_dict: Mapping[str, Tensor], config: ScMulanConfig) -> dict[str, Tensor]:
    """Rename an official state dict to msfm keys and check it against ``config`` strictly.

    Raises:
        CheckpointError: naming missing, unexpected and mis-shaped keys.
    """
    state = strip_prefix(state_dict, ("module.", "_orig_mod."))
    renamed, unknown = rename_keys(state, official_key_table(config.depth))
    report = check_layout(renamed, expected_state_dict_shapes(config))
    if unknown or not report.ok:
        parts = []
        if unknown:
            parts.append(f"keys not in the official layout ({len(unknown)}): {unknown[:20]}")
        if not report.ok:
            parts.append(report.describe())
        msg = (
            "the checkpoint does not match the official scMulan layout for "
            f"depth={config.depth}, dim={config.dim}, vocab={config.vocab_size}: " + "; ".join(parts)
        )
        raise CheckpointError(msg)
    return {k: v.float().contiguous() for k, v in renamed.items()}


def to_official_state_dict(state_dict: Mapping[str, Tensor], config: ScMulanConfig) -> dict[str, Tensor]:
    """msfm state dict -> official key names (inverse of :func:`convert_official_state_dict`)."""
    inverse = {v: k for k, v in official_key_table(config.depth).items()}
    out, unknown = rename_keys(state_dict, inverse)
    if unknown:
        msg = f"keys without an official counterpart: {unknown[:20]}"
        raise CheckpointError(msg)
    return out


def load_official_checkpoint(path: str | os.PathLike[str]) -> tuple[ScMulanConfig, dict[str, Tensor]]:
    """Read an official scMulan checkpoint safely and convert it.

    The file is read with ``torch.load(path, map_location="cpu", weights_only=True)``. Top-level keys other
    than ``model`` and ``model_args`` (e.g. optimizer state in training snapshots) are ignored.

    Returns:
        The config and the msfm state dict.

    Raises:
        MsfmInputError: if the file does not exist.
        CheckpointError: if it cannot be read safely or does not hold an scMulan model.
    """
    file = Path(path)
    content = load_torch_file(
        file, what="official scMulan checkpoint", hint="Pass the path of the released ckpt_scMulan.pt."
    )
    if not isinstance(content, Mapping) or "model" not in content or "model_args" not in content:
        found = sorted(content) if isinstance(content, Mapping) else type(content).__name__
        msg = (
            f"{str(file)!r} is not an official scMulan checkpoint: expected a dict with 'model' and "
            f"'model_args', found {found}."
        )
        raise CheckpointError(msg)
    config = config_from_official(content["model_args"])
    return config, convert_official_state_dict(content["model"], config)
