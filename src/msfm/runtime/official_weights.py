"""Facts about the official weight files msfm converts, and recognition of a file by checksum or by layout.

One table (:data:`OFFICIAL_WEIGHTS`) says, for every released file msfm reads, where it is published, its name,
size and sha256 where a source states them (``None`` = not published), its licence and the ``msfm`` command that
converts or uses it. ``docs/weights.md`` is the long form; ``msfm weights list`` prints the table.

:func:`identify_content` recognises the key layout of each family's official format in content that was already
read safely (``msfm.runtime.safe_load.load_torch_file``, ``weights_only=True``); it only looks at key names and
nesting, so it imports no family code.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "OFFICIAL_WEIGHTS",
    "Identification",
    "OfficialWeights",
    "file_sha256",
    "identify_content",
    "match_checksum",
    "source_record",
]


@dataclass(frozen=True)
class OfficialWeights:
    """One official weight file (or a family of files with one name pattern)."""

    family: str
    file: str
    published: str
    size: str | None
    sha256: str | None
    licence: str
    command: str
    sha256_prefix: str | None = (
        None  # a checksum prefix the file name itself carries (torchvision's convention)
    )


OFFICIAL_WEIGHTS: tuple[OfficialWeights, ...] = (
    OfficialWeights(
        family="scfoundation",
        file="models.ckpt (one file holding the variants cell, rde and gene)",
        published=(
            "github.com/biomap-research/scFoundation: model/models/download.txt links a SharePoint folder "
            "(links have expired and been renewed several times, issues #20 #46 #58 #65 #76)"
        ),
        size=None,
        sha256=None,
        licence="non-commercial research only: 'The scFoundation License' (MODEL_LICENSE); the code is Apache-2.0",
        command="msfm scfoundation convert models.ckpt --variant cell|rde|gene -o sf_<variant>",
    ),
    OfficialWeights(
        family="scmulan",
        file="ckpt_scMulan.pt",
        published=(
            "github.com/SuperBianC/scMulan README: https://cloud.tsinghua.edu.cn/f/2250c5df51034b2e9a85/?dl=1"
        ),
        size=None,
        sha256=None,
        licence="repository licence MIT; no separate weights licence recorded (check the repository)",
        command="msfm scmulan convert ckpt_scMulan.pt -o mulan",
    ),
    OfficialWeights(
        family="roam",
        file="ROAM_split<k>.pth (k = 0..4, glioma subtyping folds)",
        published="github.com/whiteyunjie/ROAM README: Google Drive links",
        size="about 35.2 MB each (secondary registry, unverified)",
        sha256=None,
        licence="GPL-3.0 (code and weights)",
        command=(
            "msfm roam convert ROAM_split0.pth -o roam_fold0 "
            "--class-names astrocytoma,oligodendroglioma,ependymoma --fold 0"
        ),
    ),
    OfficialWeights(
        family="roam (patch encoder)",
        file="resnet50-19c8e357.pth (CLAM's) or resnet50-11ad3fa6.pth (torchvision ImageNet ResNet-50)",
        published="torchvision's ImageNet ResNet-50 weights, download.pytorch.org/models/ (recalled)",
        size=None,
        sha256=None,
        licence="torchvision BSD-3-Clause (recalled); ImageNet terms of use may apply",
        command="msfm roam preprocess SLIDES -o prep --encoder resnet50_trunc --weights resnet50-19c8e357.pth",
    ),
)

# torchvision names a weight file <arch>-<first 8 hex digits of its sha256>.pth (recalled convention).
_TORCHVISION_PREFIXES = {"19c8e357": "resnet50-19c8e357.pth", "11ad3fa6": "resnet50-11ad3fa6.pth"}


@dataclass(frozen=True)
class Identification:
    """What a file is: its family, the variants or details found, and the command that uses it."""

    family: str
    what: str
    commands: tuple[str, ...]


def file_sha256(path: str | Path, *, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def match_checksum(sha256: str) -> str | None:
    """A sentence naming the official file with this checksum (full, or the prefix in its name), else None."""
    for entry in OFFICIAL_WEIGHTS:
        if entry.sha256 is not None and entry.sha256 == sha256:
            return f"{entry.file} ({entry.family}), by its published sha256"
    name = _TORCHVISION_PREFIXES.get(sha256[:8])
    if name is not None:
        return f"{name}: its sha256 begins with the 8 digits in that file name (torchvision's convention)"
    return None


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def _tensor_keys(content: Any) -> list[str] | None:
    if not isinstance(content, Mapping) or not content:
        return None
    if not all(_is_tensor(v) for v in content.values()):
        return None
    return [str(k) for k in content]


def _scfoundation(content: Mapping[Any, Any], name: str) -> Identification | None:
    variants = [
        v
        for v in ("cell", "rde", "gene")
        if isinstance(content.get(v), Mapping) and {"config", "state_dict"} <= set(content[v])
    ]
    if not variants:
        return None
    keys = _tensor_keys(content[variants[0]]["state_dict"]) or []
    if not any(k.startswith("model.token_emb.") or k.startswith("token_emb.") for k in keys):
        return None
    commands = tuple(f"msfm scfoundation convert {name} --variant {v} -o sf_{v}" for v in variants)
    return Identification(
        "scfoundation", f"official scFoundation models.ckpt, variants {', '.join(variants)}", commands
    )


def _scmulan(content: Mapping[Any, Any], name: str) -> Identification | None:
    if not {"model", "model_args"} <= set(content):
        return None
    keys = _tensor_keys(content["model"]) or []
    if "transformer.wte.weight" not in keys or "epx_head.weight" not in keys:
        return None
    args = content["model_args"]
    size = ""
    if isinstance(args, Mapping):
        size = f", {args.get('n_layer', '?')} layers of width {args.get('n_embd', '?')}"
    return Identification(
        "scmulan",
        f"official scMulan checkpoint (ckpt_scMulan.pt layout{size})",
        (f"msfm scmulan convert {name} -o mulan",),
    )


def _roam(state: Mapping[str, Any], name: str) -> Identification | None:
    keys = list(state)
    if not any(k.startswith("vit.transformer_20.") for k in keys) or not any(
        k.startswith("att_net.") for k in keys
    ):
        return None
    head = state.get("att_net.attention_c.weight")
    n_classes = int(head.shape[0]) if _is_tensor(head) and len(head.shape) == 2 else None
    classes = f", {n_classes} classes" if n_classes else ""
    names = ",".join(f"CLASS{i + 1}" for i in range(n_classes or 2))
    return Identification(
        "roam",
        f"released ROAM fold checkpoint (ROAM_split<k>.pth layout{classes})",
        (f"msfm roam convert {name} -o roam_fold --class-names {names} --fold K",),
    )


def _resnet50(keys: list[str], name: str) -> Identification | None:
    needed = ("conv1.weight", "bn1.weight", "layer3.5.conv3.weight")
    if not all(k in keys for k in needed):
        return None
    return Identification(
        "roam (patch encoder)",
        "torchvision ResNet-50 state dict (ImageNet patch-encoder layout)",
        (f"msfm roam preprocess SLIDES -o prep --encoder resnet50_trunc --weights {name}",),
    )


def identify_content(content: Any, *, name: str = "FILE") -> Identification | None:
    """Recognise an official layout in safely loaded content; ``name`` is put into the commands. None if unknown."""
    if isinstance(content, Mapping):
        found = _scfoundation(content, name) or _scmulan(content, name)
        if found is not None:
            return found
        state = content
        for wrapper in ("state_dict", "model"):
            if isinstance(state.get(wrapper), Mapping):
                state = state[wrapper]
        if _tensor_keys(state) is not None:
            plain = {str(k).removeprefix("module."): v for k, v in state.items()}
            return _roam(plain, name) or _resnet50(list(plain), name)
    return None


def source_record(path: str | Path, *, what: str) -> dict[str, Any]:
    """Size, sha256 and how an official file was recognised, logged once and returned for the checkpoint's meta.

    Call it after the family's loader accepted the file (so its key layout is known to be official): a file whose
    sha256 is published is recognised by it; otherwise the record says it was recognised by its layout and keeps
    the sha256, so a later copy can be checked against this one.

    Args:
        path: The official file.
        what: What the loader recognised, e.g. ``official scFoundation models.ckpt, variant cell``.
    """
    p = Path(path)
    digest = file_sha256(p)
    size = p.stat().st_size
    by_checksum = match_checksum(digest)
    how = by_checksum if by_checksum is not None else "its key layout (no sha256 is published for this file)"
    logger.info("%s: %s (%.1f MB, sha256 %s), recognised by %s", p.name, what, size / 1e6, digest, how)
    return {"file": p.name, "size_bytes": size, "sha256": digest, "recognised_as": what, "recognised_by": how}
