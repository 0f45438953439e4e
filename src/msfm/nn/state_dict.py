"""State-dict helpers shared by every checkpoint converter: prefix stripping, renaming, layout checks.

They are pure functions on ``dict[str, Tensor]``; converters turn the reports into
``msfm.errors.CheckpointError`` messages.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["LayoutReport", "check_layout", "rename_keys", "strip_prefix"]


def strip_prefix(state_dict: Mapping[str, Tensor], prefixes: str | Iterable[str]) -> dict[str, Tensor]:
    """Remove a leading prefix (e.g. ``"model."``, ``"module."``, ``"_orig_mod."``) from every key.

    Prefixes are removed repeatedly in the given order, so ``module._orig_mod.x`` loses both. Keys
    without a prefix are kept as they are.

    Args:
        state_dict: the state dict.
        prefixes: one prefix or several.

    Returns:
        A new dict with the same tensors (not copied).
    """
    prefixes = (prefixes,) if isinstance(prefixes, str) else tuple(prefixes)
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in prefixes:
                if prefix and key.startswith(prefix):
                    key = key[len(prefix) :]
                    changed = True
        out[key] = value
    return out


def rename_keys(
    state_dict: Mapping[str, Tensor],
    table: Mapping[str, str],
    *,
    drop: Iterable[str] = (),
) -> tuple[dict[str, Tensor], list[str]]:
    """Rename keys through an explicit table.

    Args:
        state_dict: source state dict.
        table: source key -> target key.
        drop: source keys to discard silently (e.g. counters that have no counterpart).

    Returns:
        The renamed dict and the source keys that were neither in ``table`` nor in ``drop``
        (left out of the result).
    """
    dropped = set(drop)
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        if key in table:
            out[table[key]] = value
        elif key not in dropped:
            unknown.append(key)
    return out, unknown


@dataclass
class LayoutReport:
    """Differences between a state dict and the expected layout.

    Attributes:
        missing: expected keys that are absent.
        unexpected: keys that are not expected.
        shape_mismatches: ``(key, found shape, expected shape)`` for keys present in both.
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when keys and shapes match exactly."""
        return not (self.missing or self.unexpected or self.shape_mismatches)

    def describe(self, limit: int = 20) -> str:
        """Human-readable summary (at most ``limit`` items per list)."""
        parts = []
        if self.missing:
            parts.append(f"missing keys ({len(self.missing)}): {self.missing[:limit]}")
        if self.unexpected:
            parts.append(f"unexpected keys ({len(self.unexpected)}): {self.unexpected[:limit]}")
        if self.shape_mismatches:
            shown = [f"{k}: found {list(a)}, expected {list(b)}" for k, a, b in self.shape_mismatches[:limit]]
            parts.append(f"shape mismatches ({len(self.shape_mismatches)}): {shown}")
        return "; ".join(parts) if parts else "layout matches"


def check_layout(
    state_dict: Mapping[str, Tensor], expected: Mapping[str, torch.Size | tuple[int, ...]]
) -> LayoutReport:
    """Compare keys and shapes of ``state_dict`` with an expected ``key -> shape`` map.

    Args:
        state_dict: the state dict to check.
        expected: expected shape of every key.

    Returns:
        A report; ``report.ok`` is True when everything matches.
    """
    report = LayoutReport(
        missing=[key for key in expected if key not in state_dict],
        unexpected=[key for key in state_dict if key not in expected],
    )
    for key, shape in expected.items():
        if key in state_dict and tuple(state_dict[key].shape) != tuple(shape):
            report.shape_mismatches.append((key, tuple(state_dict[key].shape), tuple(shape)))
    return report
