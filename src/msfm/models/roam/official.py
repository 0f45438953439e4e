"""Read the released ROAM checkpoints (``ROAM_split{k}.pth``) and map their keys onto :class:`Roam`.

The release saves a raw ``state_dict`` (no wrapper, no ``module.`` prefix, CUDA tensors, parameters only). We
load it with ``torch.load(..., weights_only=True, map_location="cpu")`` and rename keys with the explicit table
below; the reverse map writes the released layout again.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from msfm.errors import CheckpointError
from msfm.models.roam.config import RoamConfig
from msfm.models.roam.model import Roam
from msfm.runtime.safe_load import load_torch_file

__all__ = [
    "config_from_official_state_dict",
    "convert_official_state_dict",
    "load_official_checkpoint",
    "to_official_state_dict",
]

_STACKS = {
    "transformer_20": "intra_20",
    "transformer_10": "intra_10",
    "transformer_5": "intra_5",
    "transformer_20_to_10": "inter_20_10",
    "transformer_10_to_5": "inter_10_5",
}
# Inside one transformer layer: (official suffix after "layers.{l}.", ours).
_LAYER_PARTS = (
    ("0.norm.", "attn_norm."),
    ("0.fn.to_qkv.", "attn.qkv."),
    ("0.fn.norm.", "attn.qk_norm."),
    ("0.fn.rel_pe.", "attn.rel_bias."),
    ("0.fn.to_out.0.", "attn.proj."),
    ("1.norm.", "ff_norm."),
    ("1.fn.net.0.", "ff.fc1."),
    ("1.fn.net.3.", "ff.fc2."),
)
# One table of (official, ours) key prefixes serves both directions. "{s}" is a scale (20, 10, 5), "{n}" a
# layer or class index; an entry without a trailing "." names a whole tensor.
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("vit.pos_emb_{s}", "pyramid.pos_{s}"),
    ("vit.cls_token_{s}", "pyramid.cls_{s}"),
    ("vit.to_patch_embedding_{s}.0.", "pyramid.embed_{s}.norm."),
    ("vit.to_patch_embedding_{s}.1.", "pyramid.embed_{s}.proj."),
    *(
        (f"vit.{stack}.layers.{{n}}.{off}", f"pyramid.{ours_stack}.layers.{{n}}.{ours}")
        for stack, ours_stack in _STACKS.items()
        for off, ours in _LAYER_PARTS
    ),
    ("att_net.attention_a.0.", "mil.norm_a."),
    ("att_net.attention_a.1.", "mil.proj_a."),
    ("att_net.attention_b.0.", "mil.norm_b."),
    ("att_net.attention_b.1.", "mil.proj_b."),
    ("att_net.attention_c.", "mil.score."),
    ("roi_clf.", "roi_head."),
    ("slide_clfs.{n}.", "slide_heads.{n}."),
)
_LAYER_RE = re.compile(r"^vit\.(transformer_(?:20_to_10|10_to_5|20|10|5))\.layers\.(\d+)\.(.+)$")


def _compile(prefix: str) -> re.Pattern[str]:
    pattern = re.escape(prefix).replace(r"\{s\}", "(?P<s>20|10|5)").replace(r"\{n\}", r"(?P<n>\d+)")
    # A whole-tensor name must match exactly; a module prefix is followed by the parameter name.
    return re.compile("^" + pattern + ("(?P<rest>.+)$" if prefix.endswith(".") else "(?P<rest>)$"))


_FORWARD = tuple((_compile(off), ours) for off, ours in _PREFIXES)
_BACKWARD = tuple((_compile(ours), off) for off, ours in _PREFIXES)


def _translate(key: str, rules: tuple[tuple[re.Pattern[str], str], ...]) -> str | None:
    for pattern, target in rules:
        m = pattern.match(key)
        if m:
            groups = m.groupdict()
            out = target.replace("{s}", groups.get("s") or "").replace("{n}", groups.get("n") or "")
            return out + groups["rest"]
    return None


def _official_to_ours(key: str) -> str | None:
    return _translate(key, _FORWARD)


def _ours_to_official(key: str) -> str | None:
    return _translate(key, _BACKWARD)


def convert_official_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a released ROAM state dict to msfm names.

    Raises:
        CheckpointError: If a key is not part of the released layout (e.g. a ``module.`` prefix from DDP, or a
            learned-scale-weight model, which msfm does not implement).
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        k = key[len("module.") :] if key.startswith("module.") else key
        ours = _official_to_ours(k)
        if ours is None:
            unknown.append(key)
            continue
        out[ours] = value
    if unknown:
        msg = (
            f"{len(unknown)} keys are not in the released ROAM layout, e.g. {unknown[:5]}. Expected keys such as "
            "'vit.transformer_20.layers.0.0.fn.to_qkv.weight' and 'att_net.attention_c.weight' (the multi-scale "
            "model with fixed scale weights)."
        )
        raise CheckpointError(msg)
    return out


def to_official_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an msfm ROAM state dict to the released key layout (the inverse of the conversion)."""
    out = {}
    for key, value in state.items():
        off = _ours_to_official(key)
        if off is None:
            msg = f"msfm ROAM key {key!r} has no counterpart in the released layout."
            raise CheckpointError(msg)
        out[off] = value
    return out


def config_from_official_state_dict(state: Mapping[str, torch.Tensor], **overrides: Any) -> RoamConfig:
    """Infer the model sizes from the tensor shapes of a released state dict.

    ``dim_head`` comes from the QK-LayerNorm, ``heads`` from the qkv width, depths from the layer indices,
    ``shared_rel_bias`` from the bias table width. Dropout rates are not stored; the released values are the
    defaults and can be overridden (they do not matter in eval mode).
    """
    try:
        proj = state["vit.to_patch_embedding_20.1.weight"]
        qk = state["vit.transformer_20.layers.0.0.fn.norm.weight"]
        qkv = state["vit.transformer_20.layers.0.0.fn.to_qkv.weight"]
        mlp = state["vit.transformer_20.layers.0.1.fn.net.0.weight"]
        att_c = state["att_net.attention_c.weight"]
        rel = state["vit.transformer_20.layers.0.0.fn.rel_pe.weight"]
    except KeyError as err:
        msg = (
            f"The state dict lacks {err}; it is not a released multi-scale ROAM checkpoint (keys start with "
            f"'vit.' and 'att_net.'). First keys: {list(state)[:5]}."
        )
        raise CheckpointError(msg) from err
    dim, d_in = proj.shape
    dim_head = qk.shape[0]
    depths = []
    for stack in _STACKS:
        layers = {int(m.group(2)) for k in state if (m := _LAYER_RE.match(k)) and m.group(1) == stack}
        depths.append(len(layers))
    order = [
        "transformer_20",
        "transformer_20_to_10",
        "transformer_10",
        "transformer_10_to_5",
        "transformer_5",
    ]
    depths = [depths[list(_STACKS).index(s)] for s in order]
    kwargs: dict[str, Any] = {
        "d_in": int(d_in),
        "dim": int(dim),
        "dim_head": int(dim_head),
        "heads": int(qkv.shape[0] // (3 * dim_head)),
        "mlp_dim": int(mlp.shape[0]),
        "depths": tuple(depths),
        "n_classes": int(att_c.shape[0]),
        "shared_rel_bias": int(rel.shape[1]) == 1,
    }
    kwargs.update(overrides)
    return RoamConfig(**kwargs)


def load_official_checkpoint(path: str | Path, **overrides: Any) -> Roam:
    """Load a released ``ROAM_split{k}.pth`` (strictly) into a :class:`Roam` on CPU, in eval mode.

    Args:
        path: The ``.pth`` file (a raw state dict; CUDA tensors are mapped to CPU).
        **overrides: Config fields the file cannot tell (``scale_weights``, ``class_names``, dropout rates).

    Raises:
        CheckpointError: If the file is missing, is not a plain tensor state dict (``weights_only`` refuses
            pickled objects) or does not match the released layout.
    """
    p = Path(path)
    state = load_torch_file(
        p, what="official ROAM checkpoint", hint="Pass the path of a ROAM_split<k>.pth file."
    )
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        msg = f"{p} holds a {type(state).__name__}, not a state dict."
        raise CheckpointError(msg)
    config = config_from_official_state_dict(state, **overrides)
    model = Roam(config)
    ours = convert_official_state_dict(state)
    missing, unexpected = model.load_state_dict(ours, strict=False)
    if missing or unexpected:
        msg = f"{p} does not match the ROAM layout: missing {missing[:5]}, unexpected {unexpected[:5]}."
        raise CheckpointError(msg)
    return model.eval()
