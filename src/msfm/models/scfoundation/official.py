"""Load official scFoundation checkpoints (``models.ckpt``) into msfm names.

Upstream: biomap-research/scFoundation (commit d09626a), ``model/load.py`` and
``model/pretrainmodels/``. The official file is a ``torch.save`` of
``{"gene" | "cell" | "rde": {"config": CFG, "state_dict": {"model.<key>": tensor}}}``; hyper-parameters
sit in ``CFG["model_config"]["mae_autobin"]`` (data settings in ``CFG["dataset_config"]["rnaseq"]``,
unused here). Every official key is mapped by an explicit table, and the converted state dict is checked
key by key and shape by shape against our model before it is returned.

Variants: ``cell`` and ``rde`` are near-identical encoder checkpoints (cell embeddings / read-depth
enhancement); ``gene`` is the checkpoint with the lowest reconstruction error and the one the official
scripts use for gene embeddings and expression.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from pydantic import ValidationError
from torch import Tensor

from msfm.errors import CheckpointError, MsfmInputError
from msfm.models.scfoundation.config import ScFoundationConfig
from msfm.models.scfoundation.model import ScFoundation
from msfm.nn.state_dict import check_layout, rename_keys, strip_prefix
from msfm.runtime.safe_load import load_torch_file

__all__ = [
    "OFFICIAL_PREFIX",
    "Variant",
    "config_from_official",
    "convert_official_state_dict",
    "expected_state_dict_shapes",
    "load_official_checkpoint",
    "official_key_table",
]

Variant = Literal["cell", "rde", "gene"]
VARIANTS: tuple[str, ...] = get_args(Variant)

OFFICIAL_PREFIX = "model."
# Upstream's redraw counter; our projections never redraw implicitly, so it has no counterpart.
DROPPED_KEYS = ("decoder.performer.calls_since_last_redraw",)

_ENCODER_LAYER_KEYS = (
    "self_attn.in_proj_weight",
    "self_attn.in_proj_bias",
    "self_attn.out_proj.weight",
    "self_attn.out_proj.bias",
    "linear1.weight",
    "linear1.bias",
    "linear2.weight",
    "linear2.bias",
    "norm1.weight",
    "norm1.bias",
    "norm2.weight",
    "norm2.bias",
)


def official_key_table(encoder_depth: int, decoder_depth: int) -> dict[str, str]:
    """Official key (``model.`` prefix removed) -> msfm key, for every tensor but the redraw counter.

    Args:
        encoder_depth: number of encoder layers.
        decoder_depth: number of decoder layers.

    Returns:
        The renaming table.
    """
    table: dict[str, str] = {}
    for name in (
        "mlp.weight",
        "mlp.bias",
        "mlp2.weight",
        "mlp2.bias",
        "emb.weight",
        "emb_mask.weight",
        "emb_pad.weight",
    ):
        table[f"token_emb.{name}"] = f"value_embedding.{name}"
    table["pos_emb.weight"] = "gene_embedding.weight"
    for param in ("weight", "bias"):
        table[f"decoder_embed.{param}"] = f"decoder_embed.{param}"
        table[f"norm.{param}"] = f"decoder_norm.{param}"
        table[f"to_final.{param}"] = f"head.{param}"
        table[f"encoder.norm.{param}"] = f"encoder.norm.{param}"
        table[f"decoder.norm.{param}"] = f"decoder.norm.{param}"
    for i in range(encoder_depth):
        for name in _ENCODER_LAYER_KEYS:
            table[f"encoder.transformer_encoder.{i}.{name}"] = f"encoder.layers.{i}.{name}"
    for i in range(decoder_depth):
        src = f"decoder.performer.net.layers.{i}"
        dst = f"decoder.layers.{i}"
        table[f"{src}.0.fn.fast_attention.projection_matrix"] = f"{dst}.attn.fast_attention.projection_matrix"
        for param in ("weight", "bias"):
            table[f"{src}.0.norm.{param}"] = f"{dst}.attn_norm.{param}"
            for proj in ("to_q", "to_k", "to_v", "to_out"):
                table[f"{src}.0.fn.{proj}.{param}"] = f"{dst}.attn.{proj}.{param}"
            table[f"{src}.1.norm.{param}"] = f"{dst}.ffn_norm.{param}"
            table[f"{src}.1.fn.fn.w1.{param}"] = f"{dst}.ffn.w1.{param}"
            table[f"{src}.1.fn.fn.w2.{param}"] = f"{dst}.ffn.w2.{param}"
    return table


def _require(mapping: Mapping[str, Any], key: str, where: str) -> Any:
    if not isinstance(mapping, Mapping) or key not in mapping:
        found = sorted(mapping) if isinstance(mapping, Mapping) else type(mapping).__name__
        msg = f"official config has no {where}{key!r} (found {found}); is this an scFoundation 'mae_autobin' checkpoint?"
        raise CheckpointError(msg)
    return mapping[key]


def config_from_official(config: Mapping[str, Any], *, nb_features: int | None = None) -> ScFoundationConfig:
    """Build our config from an official checkpoint config.

    Accepts the nested official config (``{"model_config": {"mae_autobin": {...}}, ...}``) or the
    ``mae_autobin`` dict itself. Unused keys (data paths, masking probabilities, ...) of any type are
    ignored.

    Args:
        config: the official config.
        nb_features: FAVOR+ features per head, when known from the weights (the official config does not
            store it; default ``int(dim_head * ln(dim_head))``).

    Returns:
        The equivalent :class:`ScFoundationConfig`.

    Raises:
        CheckpointError: if a required key is missing or the architecture is not the supported one
            (transformer encoder, Performer decoder, post-LN).
    """
    if "model_config" in config:
        model_cfg = _require(_require(config, "model_config", ""), "mae_autobin", "model_config.")
    else:
        model_cfg = config
    enc = _require(model_cfg, "encoder", "mae_autobin.")
    dec = _require(model_cfg, "decoder", "mae_autobin.")
    expected_types = (("encoder", enc, "transformer"), ("decoder", dec, "performer"))
    for part, cfg, kind in expected_types:
        module_type = cfg.get("module_type", kind)
        if module_type != kind:
            msg = (
                f"official {part}.module_type is {module_type!r}; msfm supports only {kind!r} for the {part}."
            )
            raise CheckpointError(msg)
        if cfg.get("norm_first", False):
            msg = f"official {part}.norm_first is True; the released scFoundation (and msfm) use norm_first=False."
            raise CheckpointError(msg)
    seq_len = int(_require(model_cfg, "seq_len", "mae_autobin."))
    try:
        return ScFoundationConfig(
            num_genes=seq_len - 2,
            encoder_dim=int(_require(enc, "hidden_dim", "encoder.")),
            encoder_depth=int(_require(enc, "depth", "encoder.")),
            encoder_num_heads=int(_require(enc, "heads", "encoder.")),
            encoder_head_dim=int(enc.get("dim_head", int(enc["hidden_dim"]) // int(enc["heads"]))),
            decoder_dim=int(_require(dec, "hidden_dim", "decoder.")),
            decoder_depth=int(_require(dec, "depth", "decoder.")),
            decoder_num_heads=int(_require(dec, "heads", "decoder.")),
            decoder_head_dim=int(_require(dec, "dim_head", "decoder.")),
            decoder_nb_features=nb_features,
            num_bins=int(_require(model_cfg, "bin_num", "mae_autobin.")),
            bin_alpha=float(model_cfg.get("bin_alpha", 1.0)),
            mask_value=float(_require(model_cfg, "mask_token_id", "mae_autobin.")),
            pad_value=float(_require(model_cfg, "pad_token_id", "mae_autobin.")),
        )
    except ValidationError as err:
        msg = f"official config describes a model msfm cannot build:\n{err}"
        raise CheckpointError(msg) from err


def expected_state_dict_shapes(config: ScFoundationConfig) -> dict[str, torch.Size]:
    """Key -> shape of :class:`ScFoundation` for ``config``, built on the meta device (no memory).

    Args:
        config: model config.

    Returns:
        The expected layout.
    """
    with torch.device("meta"):
        model = ScFoundation(config)
    return {key: value.shape for key, value in model.state_dict().items()}


def _infer_nb_features(state_dict: Mapping[str, Tensor]) -> int | None:
    for key, value in state_dict.items():
        if key.endswith("fast_attention.projection_matrix"):
            return int(value.shape[0])
    return None


def convert_official_state_dict(
    state_dict: Mapping[str, Tensor], config: ScFoundationConfig
) -> dict[str, Tensor]:
    """Convert a bare official state dict (with or without the ``model.`` prefix) to msfm names.

    Tensors are cloned: in the official file the variants share storage, and in-place edits of one
    must not leak into another.

    Args:
        state_dict: official tensors.
        config: the model config the tensors must fit.

    Returns:
        A state dict for ``ScFoundation(config).load_state_dict(..., strict=True)``.

    Raises:
        CheckpointError: listing unknown, missing and wrongly shaped keys.
    """
    stripped = strip_prefix(state_dict, OFFICIAL_PREFIX)
    table = official_key_table(config.encoder_depth, config.decoder_depth)
    renamed, unknown = rename_keys(stripped, table, drop=DROPPED_KEYS)
    report = check_layout(renamed, expected_state_dict_shapes(config))
    if unknown or not report.ok:
        problems = [f"keys with no msfm counterpart ({len(unknown)}): {unknown[:20]}"] if unknown else []
        if not report.ok:
            problems.append(report.describe())
        msg = (
            f"the official state dict does not match an scFoundation model with encoder "
            f"{config.encoder_dim}x{config.encoder_depth} and decoder {config.decoder_dim}x{config.decoder_depth}: "
            f"{'; '.join(problems)}. Check that the checkpoint and its config belong together."
        )
        raise CheckpointError(msg)
    return {key: value.detach().clone() for key, value in renamed.items()}


def load_official_checkpoint(
    path: str | os.PathLike[str], variant: Variant | None = "cell"
) -> tuple[ScFoundationConfig, dict[str, Tensor]]:
    """Read an official ``models.ckpt`` and return our config and state dict for one variant.

    The file is read with ``torch.load(path, map_location="cpu", weights_only=True)``: no code from the
    file is executed.

    Args:
        path: the official checkpoint file.
        variant: ``"cell"`` (cell embeddings), ``"rde"`` (read-depth enhancement) or ``"gene"`` (gene
            embeddings and expression). ``None`` for a single-model file ``{"config", "state_dict"}``.

    Returns:
        ``(config, state_dict)`` with msfm key names, ready for ``ScFoundation(config)``.

    Raises:
        MsfmInputError: for a variant name that is not one of ``cell``, ``rde``, ``gene``.
        CheckpointError: if the file is missing, unreadable, lacks the variant, or has the wrong layout.

    Example:
        >>> config, state_dict = load_official_checkpoint("models.ckpt", "gene")
        >>> model = ScFoundation(config)
        >>> model.load_state_dict(state_dict)
    """
    if variant is not None and variant not in VARIANTS:
        msg = f"unknown scFoundation variant {variant!r}; expected one of {list(VARIANTS)} (or None for a single-model file)."
        raise MsfmInputError(msg)
    file = Path(path)
    content = load_torch_file(
        file, what="official scFoundation checkpoint", hint="Pass the path of the released models.ckpt."
    )
    if not isinstance(content, Mapping):
        msg = f"{str(file)!r} holds a {type(content).__name__}, expected a dict of variants {list(VARIANTS)}."
        raise CheckpointError(msg)

    if variant is None:
        entry = content
    else:
        if variant not in content:
            available = sorted(k for k, v in content.items() if isinstance(v, Mapping) and "state_dict" in v)
            msg = (
                f"{str(file)!r} has no variant {variant!r}; available variants: {available}. "
                f"Pass one of them as variant (or None if the file holds a single model)."
            )
            raise CheckpointError(msg)
        entry = content[variant]
    for key in ("config", "state_dict"):
        if not isinstance(entry, Mapping) or key not in entry:
            found = sorted(entry) if isinstance(entry, Mapping) else type(entry).__name__
            msg = f"variant {variant!r} of {str(file)!r} has no {key!r} (found {found}); expected {{'config', 'state_dict'}}."
            raise CheckpointError(msg)
    state_dict = entry["state_dict"]
    config = config_from_official(entry["config"], nb_features=_infer_nb_features(state_dict))
    return config, convert_official_state_dict(state_dict, config)
