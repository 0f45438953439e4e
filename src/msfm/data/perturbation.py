"""Perturbation data: condition labels, their validation, train/test splits and control pools.

Two label conventions share one column (``obs[condition_key]``):

* GEARS: ``ctrl`` (the control), ``GENE+ctrl`` (one gene), ``GENE1+GENE2`` (a combination). The genes must be in
  the model's gene list (the backbone's panel and the data).
* Any other label (a drug, a cytokine, Kang's ``stim``): each non-control label is one perturbation token.

A label with ``+`` is read as GEARS, a label without it as a token. ``match_key`` (e.g. ``cell_type``) splits cells
into groups: control cells are paired with perturbed cells of their own group and everything is reported per
``(condition, group)``; without it every cell is in the one group ``"all"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd

from msfm.errors import MsfmInputError

__all__ = [
    "ALL_GROUP",
    "PerturbationDesign",
    "PerturbationSplit",
    "build_design",
    "control_pools",
    "make_split",
    "parse_condition",
]

#: The group of every cell when no ``match_key`` is given.
ALL_GROUP = "all"
_CTRL_WORD = "ctrl"


@dataclasses.dataclass(frozen=True)
class ParsedCondition:
    """One condition label, parsed.

    Attributes:
        label: the label as in the data.
        kind: ``control``, ``gene`` (GEARS genes) or ``label`` (one learned token).
        tokens: the perturbed genes (``gene``), the label itself (``label``) or nothing (``control``).
    """

    label: str
    kind: Literal["control", "gene", "label"]
    tokens: tuple[str, ...]


def parse_condition(label: str, control: str = "ctrl") -> ParsedCondition:
    """Parse one condition label (GEARS ``A+ctrl`` / ``A+B``, the control, or a free label).

    Raises:
        MsfmInputError: a malformed GEARS label (``A+B+C``, ``+ctrl``, ``ctrl+ctrl``, ``A+A``).
    """
    label = str(label)
    if label == control:
        return ParsedCondition(label, "control", ())
    if "+" not in label:
        return ParsedCondition(label, "label", (label,))
    parts = [p.strip() for p in label.split("+")]
    genes = tuple(p for p in parts if p != _CTRL_WORD)
    if len(parts) != 2 or any(not p for p in parts) or not genes or len(set(genes)) != len(genes):
        msg = (
            f"Condition {label!r} is not a valid GEARS label: expected 'GENE+ctrl' (one gene) or 'GENE1+GENE2' "
            f"(two different genes), and {control!r} for control cells. Fix the label in the condition column, "
            "or use labels without '+' for non-gene perturbations."
        )
        raise MsfmInputError(msg)
    return ParsedCondition(label, "gene", genes)


@dataclasses.dataclass(frozen=True, eq=False)
class PerturbationDesign:
    """Conditions, groups and cells of a perturbation data set.

    Attributes:
        conditions: the non-control conditions, sorted.
        parsed: each condition's parse (also the control's, under its label).
        cell_condition: ``[n_cells]`` each cell's condition label.
        cell_group: ``[n_cells]`` each cell's group (``"all"`` without ``match_key``).
        groups: the groups, sorted.
        control: the control label.
        counts: cells per ``(condition, group)`` (controls included).
    """

    conditions: tuple[str, ...]
    parsed: dict[str, ParsedCondition]
    cell_condition: np.ndarray
    cell_group: np.ndarray
    groups: tuple[str, ...]
    control: str
    counts: dict[tuple[str, str], int]

    @property
    def is_control(self) -> np.ndarray:
        """``[n_cells]`` True for control cells."""
        return self.cell_condition == self.control

    def pairs(self) -> list[tuple[str, str]]:
        """The ``(condition, group)`` pairs that have perturbed cells, sorted."""
        return sorted(k for k in self.counts if k[0] != self.control)

    def cells(self, condition: str, group: str) -> np.ndarray:
        """Row positions of the cells of ``(condition, group)``."""
        return np.flatnonzero((self.cell_condition == condition) & (self.cell_group == group))


def _column(obs: pd.DataFrame, key: str, what: str) -> np.ndarray:
    if key not in obs:
        msg = (
            f"{what}={key!r} is not an obs column; available: {list(obs.columns)[:20]}. Pass the column that "
            f"holds the {'condition labels' if what == 'condition_key' else 'groups'} ({what}=...)."
        )
        raise MsfmInputError(msg)
    col = obs[key]
    if col.isna().any():
        msg = f"obs[{key!r}] has {int(col.isna().sum())} missing values; drop or fill those cells first."
        raise MsfmInputError(msg)
    return col.astype(str).to_numpy()


def build_design(
    obs: pd.DataFrame,
    *,
    condition_key: str = "condition",
    control: str = "ctrl",
    match_key: str | None = None,
    genes: Sequence[str] | None = None,
    min_cells: int = 10,
) -> PerturbationDesign:
    """Read and validate the conditions of ``obs``.

    Args:
        obs: the cells' annotations.
        condition_key: column with the condition labels.
        control: the control label.
        match_key: column that groups cells (controls pair within a group), or None.
        genes: the model's genes (panel and data); GEARS labels may name only these. None skips the check.
        min_cells: fewest cells each perturbed ``(condition, group)`` must have.

    Raises:
        MsfmInputError: a missing column, no control cells, a malformed GEARS label, genes outside ``genes``, a
            ``(condition, group)`` with fewer than ``min_cells`` cells or without control cells in its group.
    """
    cond = _column(obs, condition_key, "condition_key")
    group = _column(obs, match_key, "match_key") if match_key is not None else np.full(len(obs), ALL_GROUP)
    labels = sorted(set(cond.tolist()))
    if control not in labels:
        msg = (
            f"The control label {control!r} does not occur in obs[{condition_key!r}] (labels: {labels[:10]}). "
            "Pass control=<the label of the unperturbed cells>."
        )
        raise MsfmInputError(msg)
    parsed = {lab: parse_condition(lab, control) for lab in labels}
    if genes is not None:
        known = set(genes)
        unknown = sorted({g for p in parsed.values() if p.kind == "gene" for g in p.tokens if g not in known})
        if unknown:
            msg = (
                f"{len(unknown)} perturbed gene(s) in obs[{condition_key!r}] are not among the model's genes: "
                f"{unknown[:10]}. A perturbed gene must be in the backbone's gene panel and in the data "
                "(var_names); fix the symbols or drop those conditions."
            )
            raise MsfmInputError(msg)
    counts = pd.Series(1, index=pd.MultiIndex.from_arrays([cond, group])).groupby(level=[0, 1]).sum()
    count_map = {(str(c), str(g)): int(n) for (c, g), n in counts.items()}
    few = sorted(f"{c} / {g}: {n}" for (c, g), n in count_map.items() if c != control and n < min_cells)
    if few:
        msg = (
            f"{len(few)} perturbation(s) have fewer than min_cells={min_cells} cells ((condition / group: "
            f"cells) {few[:8]}). Drop those cells, merge groups, or lower min_cells."
        )
        raise MsfmInputError(msg)
    ctrl_groups = {g for (c, g) in count_map if c == control}
    orphan = sorted(f"{c} / {g}" for (c, g) in count_map if c != control and g not in ctrl_groups)
    if orphan:
        where = f" in obs[{match_key!r}]" if match_key is not None else ""
        msg = (
            f"{len(orphan)} perturbation(s) have no control cells ({control!r}) in their group{where}: "
            f"{orphan[:8]}. Each group needs control cells to predict from; add them or drop those cells."
        )
        raise MsfmInputError(msg)
    conditions = tuple(lab for lab in labels if lab != control)
    if not conditions:
        msg = f"obs[{condition_key!r}] holds only the control label {control!r}; there is nothing to learn."
        raise MsfmInputError(msg)
    return PerturbationDesign(
        conditions=conditions,
        parsed=parsed,
        cell_condition=cond,
        cell_group=group.astype(str),
        groups=tuple(sorted(set(group.tolist()))),
        control=control,
        counts=count_map,
    )


@dataclasses.dataclass(frozen=True)
class PerturbationSplit:
    """Which ``(condition, group)`` pairs train and which are held out.

    Attributes:
        train: pairs to train on.
        test: held-out pairs.
        subgroup: each test pair's subgroup: ``combo_seen0/1/2`` (how many of the 2 genes were trained on as
            singles), ``unseen_single``, ``seen_single`` / ``seen_combo`` / ``seen_label`` (perturbation trained
            on in other groups), ``unseen_label``.
    """

    train: tuple[tuple[str, str], ...]
    test: tuple[tuple[str, str], ...]
    subgroup: dict[tuple[str, str], str]


def _subgroup(parsed: ParsedCondition, train_conditions: set[str], train_singles: set[str]) -> str:
    if parsed.kind == "label":
        return "seen_label" if parsed.label in train_conditions else "unseen_label"
    if len(parsed.tokens) == 1:
        return "seen_single" if parsed.label in train_conditions else "unseen_single"
    if parsed.label in train_conditions:
        return "seen_combo"
    return f"combo_seen{sum(g in train_singles for g in parsed.tokens)}"


def make_split(
    design: PerturbationDesign,
    *,
    split: Literal["condition", "group"] = "condition",
    test_fraction: float = 0.2,
    test_conditions: Sequence[str] | None = None,
    test_groups: Sequence[str] | None = None,
    seed: int = 0,
) -> PerturbationSplit:
    """Hold out whole conditions (``split="condition"``) or conditions within groups (``split="group"``).

    ``split="condition"``: ``test_conditions`` if given, else a seeded ``test_fraction`` of the conditions.
    ``split="group"``: every perturbed pair of the ``test_groups`` (only ``test_conditions`` among them if given),
    e.g. stimulated CD14 monocytes, predicted from their control cells.

    Raises:
        MsfmInputError: an unknown split, condition or group; ``split="group"`` without ``test_groups``; an empty
            train or test set; a held-out non-gene label that no training pair has (its token would be untrained).
    """
    pairs = design.pairs()
    if test_conditions is not None:
        missing = sorted(set(test_conditions) - set(design.conditions))
        if missing:
            msg = (
                f"test_conditions {missing} are not perturbed conditions of the data (conditions: "
                f"{list(design.conditions)[:10]}). Use labels from the condition column."
            )
            raise MsfmInputError(msg)
    if split == "condition":
        if test_conditions is None:
            if not 0 < test_fraction < 1:
                msg = f"test_fraction must lie in (0, 1); got {test_fraction}."
                raise MsfmInputError(msg)
            rng = np.random.default_rng(seed)
            n_test = max(1, round(test_fraction * len(design.conditions)))
            test_conditions = sorted(rng.choice(design.conditions, size=n_test, replace=False).tolist())
        held = set(test_conditions)
        test = [p for p in pairs if p[0] in held]
    elif split == "group":
        if not test_groups:
            msg = "split='group' needs test_groups=[...]: the groups whose perturbed cells are held out."
            raise MsfmInputError(msg)
        absent = sorted(set(test_groups) - set(design.groups))
        if absent:
            msg = (
                f"Held-out group(s) {absent} are not present in the data (groups: {list(design.groups)[:20]}). "
                "Pass test_groups from the match_key column."
            )
            raise MsfmInputError(msg)
        held_groups = set(test_groups)
        test = [
            p for p in pairs if p[1] in held_groups and (test_conditions is None or p[0] in test_conditions)
        ]
    else:
        msg = f"split={split!r} is not known; use 'condition' (hold out conditions) or 'group'."
        raise MsfmInputError(msg)
    test_set = set(test)
    train = [p for p in pairs if p not in test_set]
    if not test or not train:
        msg = (
            f"The split leaves {len(train)} training and {len(test)} held-out (condition, group) pairs; both "
            "must be non-empty. Choose other test_conditions / test_groups."
        )
        raise MsfmInputError(msg)
    train_conditions = {c for c, _ in train}
    unseen = sorted({c for c, _ in test if design.parsed[c].kind == "label" and c not in train_conditions})
    if unseen:
        msg = (
            f"Held-out label(s) {unseen} are non-gene perturbations that no training cell has, so the model "
            "could not learn them. Hold them out in some groups only (split='group'), or use GEARS gene labels."
        )
        raise MsfmInputError(msg)
    singles = {
        design.parsed[c].tokens[0]
        for c in train_conditions
        if design.parsed[c].kind == "gene" and len(design.parsed[c].tokens) == 1
    }
    subgroup = {p: _subgroup(design.parsed[p[0]], train_conditions, singles) for p in test}
    return PerturbationSplit(tuple(train), tuple(test), subgroup)


def control_pools(design: PerturbationDesign, *, max_cells: int, seed: int = 0) -> dict[str, np.ndarray]:
    """At most ``max_cells`` control cells per group (a seeded sample), as sorted row positions.

    Raises:
        MsfmInputError: ``max_cells`` below 1.
    """
    if max_cells < 1:
        msg = f"max_control_cells must be at least 1; got {max_cells}."
        raise MsfmInputError(msg)
    rng = np.random.default_rng(seed)
    pools: dict[str, np.ndarray] = {}
    for g in design.groups:
        rows = design.cells(design.control, g)
        if len(rows) > max_cells:
            rows = np.sort(rng.choice(rows, size=max_cells, replace=False))
        if len(rows):
            pools[g] = rows
    return pools
