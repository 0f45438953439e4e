"""scMulan training objective: multitask c-sentence examples, their targets and the released loss.

One training example is one c-sentence ``prompt + answer`` (see :class:`TrainExample`). Four tasks make
examples from a cell (:class:`TaskSampler`):

========================  ======================================================  ===========================
task                      prompt                                                  answer
========================  ======================================================  ===========================
``annotate``              ``[meta words]`` + genes + ``<PCT>``                    coarse, fine, ``<E>``
``organ_region``          ``[meta words]`` + genes + ``<SPToken3>``               organ, region, ``<E>``
``generate``              random non-empty subset of meta words + ``<SPToken1>``  genes, ``<E>``
``next_state`` (ours)     genes of cell A + ``<SPToken2>``                        genes of cell B, ``<E>``
========================  ======================================================  ===========================

The loss is the released ``Masked_BCE_logits_loss_ignore_prefix_pretrain`` (official ``model/model.py`` at
commit ``06b5c87``): ``V x BCEWithLogits`` of the entity logits against a ``[V]`` multi-label target at every
answer position, plus ``beta x MSE`` of the expression head against the levels of the target entries
(``beta = 200``). Which words form the target at a gene position is not in the released code; the default
(``targets="set"``) is our reading of it (dossier section 2.3): every gene of the answer not emitted yet.

Everything that builds examples is numpy; the targets are built with torch on the batch's device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from msfm.engine.objective import LossOutput
from msfm.errors import MsfmInputError
from msfm.tokenizers.cell_sentence import (
    ANNOTATE,
    GENERATE,
    NEXT_STATE,
    ORGAN_REGION,
    CellSentenceTokenizer,
    CellSentenceVocab,
    _is_missing,
)

__all__ = [
    "TASKS",
    "ScMulanLossConfig",
    "ScMulanTargets",
    "TaskSampler",
    "TrainExample",
    "build_targets",
    "collate_examples",
    "scmulan_loss",
]

#: Task name -> task token. ``next_state`` re-uses the reserved, unused ``<SPToken2>`` (our design).
TASKS: dict[str, str] = {
    "annotate": ANNOTATE,
    "organ_region": ORGAN_REGION,
    "generate": GENERATE,
    "next_state": NEXT_STATE,
}
#: Categories whose values are the answer of ``annotate`` (never put in its prompt).
CELL_TYPE_CATEGORIES = ("coarse_cell_type", "cell_type")
#: Categories whose values are the answer of ``organ_region`` (never put in its prompt).
ORGAN_CATEGORIES = ("organ", "region")


class ScMulanLossConfig(BaseModel):
    """Settings of :func:`scmulan_loss`.

    Attributes:
        expression_weight: weight of the expression MSE (the release's ``beta = 200``).
        targets: ``"set"``: at a position whose next word is a gene of the answer, the target is every gene of the
            answer not emitted yet (order-free, our reading of the release); ``"next"``: the one next word
            everywhere (plain next-token targets).
        reduction: how supervised positions are averaged. ``"position"``: every supervised position of the
            batch weighs the same (the release's pooled mean); a generation sentence then weighs ~20x an
            annotation sentence (dozens of answer words against three), and mixed-task training barely learns
            annotation. ``"sentence"``: each sentence's positions are averaged first, then the sentences, so every
            task draw weighs the same (msfm's default).
        entity_loss: ``"bce"``: the release's ``V x`` binary cross-entropy over the vocabulary (multi-label);
            ``"ce"``: softmax cross-entropy against the target set normalised to a distribution (with one-hot
            targets, plain next-word cross-entropy). Decoding is a softmax either way.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    expression_weight: float = Field(200.0, ge=0.0)
    targets: Literal["set", "next"] = "set"
    reduction: Literal["sentence", "position"] = "sentence"
    entity_loss: Literal["bce", "ce"] = "bce"


# ---------------------------------------------------------------------------------------------------------------
# Examples
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainExample:
    """One c-sentence: prompt followed by answer.

    Position ``t`` with ``prefix_len - 1 <= t < len - 1`` is trained to predict the word at ``t + 1``: the task
    token (the last prompt word) predicts the first answer word and the last answer word (``<E>``) is predicted
    by the word before it.

    Attributes:
        ids: token ids.
        levels: expression levels (0 for metadata, task and ``<E>`` words).
        prefix_len: number of prompt words (meta words, genes, task token).
        task: the task name (informative).

    Shape:
        ids, levels: ``[L]`` int64.
    """

    ids: np.ndarray
    levels: np.ndarray
    prefix_len: int
    task: str = ""

    def __post_init__(self) -> None:
        ids = np.asarray(self.ids, dtype=np.int64).ravel()
        levels = np.asarray(self.levels, dtype=np.int64).ravel()
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "levels", levels)
        if ids.shape != levels.shape:
            msg = f"TrainExample has {ids.size} ids but {levels.size} levels; they must pair up."
            raise MsfmInputError(msg)
        if not 1 <= int(self.prefix_len) < ids.size:
            msg = (
                f"TrainExample prefix_len={self.prefix_len} must lie in [1, {ids.size - 1}] for a sentence of "
                f"{ids.size} words (at least one prompt word and one answer word)."
            )
            raise MsfmInputError(msg)

    def __len__(self) -> int:
        return int(self.ids.size)


def collate_examples(examples: Sequence[TrainExample], vocab: CellSentenceVocab) -> dict[str, Tensor]:
    """Right-pad examples into a training batch.

    Args:
        examples: the sentences.
        vocab: the vocabulary (to tell gene answer words from the others).

    Returns:
        ``ids``, ``levels`` (padding: id 0, level 0), ``attention_mask`` (True = real word), ``prefix_len`` and
        ``gene_answer`` (True at answer words that are genes: the positions whose targets are sets).

    Shape:
        ids, levels, attention_mask, gene_answer: ``[b, n]``; prefix_len: ``[b]``.
    """
    if not examples:
        msg = "collate_examples() got no examples."
        raise MsfmInputError(msg)
    b = len(examples)
    n = max(len(e) for e in examples)
    ids = np.zeros((b, n), dtype=np.int64)
    levels = np.zeros((b, n), dtype=np.int64)
    mask = np.zeros((b, n), dtype=bool)
    gene_answer = np.zeros((b, n), dtype=bool)
    prefix = np.zeros(b, dtype=np.int64)
    for i, ex in enumerate(examples):
        k = len(ex)
        ids[i, :k] = ex.ids
        levels[i, :k] = ex.levels
        mask[i, :k] = True
        gene_answer[i, ex.prefix_len : k] = vocab.is_gene(ex.ids[ex.prefix_len :])
        prefix[i] = ex.prefix_len
    return {
        "ids": torch.from_numpy(ids),
        "levels": torch.from_numpy(levels),
        "attention_mask": torch.from_numpy(mask),
        "prefix_len": torch.from_numpy(prefix),
        "gene_answer": torch.from_numpy(gene_answer),
    }


class TaskSampler:
    """Make one training example of a task from a cell's expression row and metadata.

    Args:
        vocab: the vocabulary (its categories define which metadata words exist).
        tasks: task name -> weight (``annotate``, ``organ_region``, ``generate``, ``next_state``). A cell draws
            among the tasks it supports, with these weights renormalised.
        n_levels: expression levels.
        gene_order: order of gene words (``"random"``: a fresh permutation per example, the training
            augmentation; ``"reverse"``: the released inference order).
        max_genes: keep only the top ``max_genes`` expressed genes of a cell (None: all).
        meta_prompt_prob: probability that an ``annotate`` / ``organ_region`` prompt starts with a random
            non-empty subset of the cell's other metadata words.
        max_length: longest sentence; longer examples keep fewer (top-expressed) genes.

    Raises:
        MsfmInputError: unknown task names, negative weights or no positive weight.

    Example:
        >>> sampler = TaskSampler(vocab, tasks={"annotate": 1.0, "generate": 1.0})  # doctest: +SKIP
        >>> ex = sampler.example(row, {"cell_type": "T cell"}, np.random.default_rng(0))  # doctest: +SKIP
    """

    def __init__(
        self,
        vocab: CellSentenceVocab,
        *,
        tasks: Mapping[str, float],
        n_levels: int = 10,
        gene_order: Literal["random", "reverse", "forward"] = "random",
        max_genes: int | None = None,
        meta_prompt_prob: float = 0.5,
        max_length: int = 2048,
    ) -> None:
        unknown = sorted(set(tasks) - set(TASKS))
        if unknown:
            msg = f"Unknown task(s) {unknown}; expected names among {sorted(TASKS)}."
            raise MsfmInputError(msg)
        bad = {k: v for k, v in tasks.items() if not (float(v) >= 0.0)}
        if bad:
            msg = f"Task weights must be >= 0; got {bad}."
            raise MsfmInputError(msg)
        if not any(float(v) > 0 for v in tasks.values()):
            msg = f"No task has a positive weight ({dict(tasks)}); give at least one task a weight > 0."
            raise MsfmInputError(msg)
        if not 0.0 <= meta_prompt_prob <= 1.0:
            msg = f"meta_prompt_prob must lie in [0, 1]; got {meta_prompt_prob}."
            raise MsfmInputError(msg)
        self.vocab = vocab
        self.tasks = {k: float(v) for k, v in tasks.items() if float(v) > 0}
        self.task_names = list(self.tasks)
        self.weights = np.array([self.tasks[t] for t in self.task_names], dtype=np.float64)
        self.n_levels = int(n_levels)
        self.gene_order = gene_order
        self.max_genes = max_genes
        self.meta_prompt_prob = float(meta_prompt_prob)
        self.max_length = int(max_length)
        self._allowed = {k: frozenset(v) for k, v in vocab.categories.items()}
        self._tokenizers: dict[int | None, CellSentenceTokenizer] = {}

    def _tokenizer(self, cap: int | None) -> CellSentenceTokenizer:
        if cap not in self._tokenizers:
            self._tokenizers[cap] = CellSentenceTokenizer(
                self.vocab, n_levels=self.n_levels, gene_order=self.gene_order, max_genes=cap
            )
        return self._tokenizers[cap]

    def known_meta(self, meta: Mapping[str, Any]) -> dict[str, str]:
        """The usable metadata of a cell: missing values (None, NaN, ``Unclassified``) dropped, others checked.

        Raises:
            MsfmInputError: a category the vocabulary does not have, or a value that is not one of its tokens.
        """
        out: dict[str, str] = {}
        for cat, value in meta.items():
            if _is_missing(value) or value == CellSentenceVocab.UNCLASSIFIED:
                continue
            if cat not in self._allowed:
                msg = f"Metadata category {cat!r} is not in the vocabulary; it has {sorted(self._allowed)}."
                raise MsfmInputError(msg)
            value = str(value)
            if value not in self._allowed[cat]:
                msg = (
                    f"Metadata value {value!r} of category {cat!r} is not a token of the vocabulary; extend the "
                    "vocabulary with it (train() does this) or map it to an existing value."
                )
                raise MsfmInputError(msg)
            out[str(cat)] = value
        return out

    def supported_tasks(self, meta: Mapping[str, Any], *, n_genes: int, has_next: bool = False) -> list[str]:
        """Tasks (with positive weight) this cell can make an example of.

        Args:
            meta: the cell's metadata (category -> value).
            n_genes: number of expressed vocabulary genes of the cell.
            has_next: the cell has a next-state partner (with expressed genes).
        """
        known = self.known_meta(meta)
        if n_genes <= 0:
            return []
        ok = {
            "annotate": "cell_type" in known,
            "organ_region": any(c in known for c in ORGAN_CATEGORIES),
            "generate": bool(known),
            "next_state": has_next,
        }
        return [t for t in self.task_names if ok[t]]

    def example(
        self,
        row: Any,
        meta: Mapping[str, Any],
        rng: np.random.Generator,
        *,
        next_row: Any = None,
        task: str | None = None,
    ) -> TrainExample | None:
        """Build one example from a cell.

        Args:
            row: ``[1, len(vocab.genes)]`` log1p-normalised expression, columns in ``vocab.genes`` order.
            meta: the cell's metadata, category -> value token.
            rng: random generator (task draw, metadata subset and order, gene order).
            next_row: like ``row``, the next-state partner cell B (``next_state`` only).
            task: force a task instead of drawing one.

        Returns:
            The example, or None when the cell supports none of the tasks.

        Raises:
            MsfmInputError: a forced task the cell cannot support, bad metadata.
        """
        genes = self._genes(row, rng, self.max_genes)
        n_genes = len(genes[0])
        has_next = next_row is not None
        known = self.known_meta(meta)
        supported = self.supported_tasks(known, n_genes=n_genes, has_next=has_next)
        if task is None:
            if not supported:
                return None
            w = np.array([self.tasks[t] for t in supported], dtype=np.float64)
            task = supported[int(rng.choice(len(supported), p=w / w.sum()))]
        elif task not in supported:
            msg = (
                f"This cell cannot make a {task!r} example (supported: {supported}); it needs expressed genes and "
                f"{_NEEDS.get(task, 'a known task')}."
            )
            raise MsfmInputError(msg)
        if task == "next_state":
            return self._next_state(genes, next_row, rng)
        return self._from_meta(task, genes, known, rng)

    # -- pieces --------------------------------------------------------------------------------------------------

    def _genes(self, row: Any, rng: np.random.Generator, cap: int | None) -> tuple[np.ndarray, np.ndarray]:
        x = row if sp.issparse(row) else sp.csr_matrix(np.atleast_2d(np.asarray(row)))
        if x.shape[0] != 1:
            msg = f"TaskSampler expects one cell (a 1-row matrix); got {x.shape[0]} rows."
            raise MsfmInputError(msg)
        sent = self._tokenizer(cap).gene_sentences(x, rng=rng)
        ids, levels = sent.get(0)
        return ids.copy(), levels.copy()

    def _meta_subset(self, words: list[str], rng: np.random.Generator) -> list[str]:
        """A random non-empty subset of ``words`` in random order (size uniform in 1..len)."""
        k = int(rng.integers(1, len(words) + 1))
        pick = rng.permutation(len(words))[:k]
        return [words[i] for i in pick]

    def _from_meta(
        self, task: str, genes: tuple[np.ndarray, np.ndarray], known: dict[str, str], rng: np.random.Generator
    ) -> TrainExample:
        vocab = self.vocab
        if task == "generate":
            prompt_ids = [
                *vocab.ids(self._meta_subset(list(known.values()), rng)).tolist(),
                vocab.generate_id,
            ]
            genes = _top(genes, self.max_length - len(prompt_ids) - 1)
            ids = [*prompt_ids, *genes[0].tolist(), vocab.end_id]
            levels = [0] * len(prompt_ids) + genes[1].tolist() + [0]
            return TrainExample(np.asarray(ids), np.asarray(levels), len(prompt_ids), task)
        if task == "annotate":
            fine = known["cell_type"]
            # Two answer words always (the released format); without a coarse label the fine one is repeated,
            # as the release does for types that exist at both levels ("T cell, T cell").
            answer = [known.get("coarse_cell_type", fine), fine]
            excluded = CELL_TYPE_CATEGORIES
        else:  # organ_region
            answer = [known[c] for c in ORGAN_CATEGORIES if c in known]
            excluded = ORGAN_CATEGORIES
        others = [v for c, v in known.items() if c not in excluded]
        meta_ids: list[int] = []
        if others and self.meta_prompt_prob > 0 and rng.random() < self.meta_prompt_prob:
            meta_ids = vocab.ids(self._meta_subset(others, rng)).tolist()
        answer_ids = [*vocab.ids(answer).tolist(), vocab.end_id]
        genes = _top(genes, self.max_length - len(meta_ids) - 1 - len(answer_ids))
        ids = [*meta_ids, *genes[0].tolist(), vocab.id(TASKS[task]), *answer_ids]
        levels = [0] * len(meta_ids) + genes[1].tolist() + [0] * (1 + len(answer_ids))
        return TrainExample(np.asarray(ids), np.asarray(levels), len(meta_ids) + len(genes[0]) + 1, task)

    def _next_state(
        self, genes_a: tuple[np.ndarray, np.ndarray], next_row: Any, rng: np.random.Generator
    ) -> TrainExample:
        vocab = self.vocab
        genes_b = self._genes(next_row, rng, self.max_genes)
        if len(genes_b[0]) == 0:
            msg = "The next-state partner cell has no expressed vocabulary gene; pairs need expressed genes in both cells."
            raise MsfmInputError(msg)
        budget = self.max_length - 2
        if len(genes_a[0]) + len(genes_b[0]) > budget:
            # Both halves keep their highest-level genes; the levels stay those of the full cell.
            genes_a = _top(genes_a, budget // 2)
            genes_b = _top(genes_b, budget - len(genes_a[0]))
        ids = [*genes_a[0].tolist(), vocab.next_state_id, *genes_b[0].tolist(), vocab.end_id]
        levels = [*genes_a[1].tolist(), 0, *genes_b[1].tolist(), 0]
        return TrainExample(np.asarray(ids), np.asarray(levels), len(genes_a[0]) + 1, "next_state")


_NEEDS = {
    "annotate": "a known 'cell_type' value",
    "organ_region": "a known 'organ' or 'region' value",
    "generate": "at least one known metadata value",
    "next_state": "a next-state partner cell",
}


def _top(genes: tuple[np.ndarray, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``k`` words: those with the highest levels (earlier words win ties), in their current order.

    Only used when a sentence would exceed ``max_length``.
    """
    ids, levels = genes
    k = max(int(k), 1)
    if len(ids) <= k:
        return genes
    keep = np.sort(np.argsort(-levels, kind="stable")[:k])
    return ids[keep], levels[keep]


# ---------------------------------------------------------------------------------------------------------------
# Targets and loss
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ScMulanTargets:
    """Dense targets of a right-padded batch.

    Attributes:
        entity: multi-hot (``set`` positions) or one-hot entity targets.
        expression: level of every target entry (0 elsewhere).
        supervised: True at trained positions (``prefix_len - 1 <= t < len - 1``).

    Shape:
        entity, expression: ``[b, n, V]`` float32; supervised: ``[b, n]`` bool.
    """

    entity: Tensor
    expression: Tensor
    supervised: Tensor


def build_targets(
    ids: Tensor,
    levels: Tensor,
    attention_mask: Tensor,
    prefix_len: Tensor,
    gene_answer: Tensor,
    *,
    vocab_size: int,
    targets: Literal["set", "next"] = "set",
) -> ScMulanTargets:
    """Entity and expression targets of every position of a right-padded batch.

    Position ``t`` (supervised when ``prefix_len - 1 <= t < len - 1``) predicts the word at ``t + 1``:

    * ``targets="next"``, or the next word is not a gene of the answer (annotation and organ/region answers,
      ``<E>``): one-hot of the next word, expression target its level (0 for non-gene words);
    * ``targets="set"`` and the next word is a gene of the answer (generation, next state): multi-hot of every
      answer gene at positions ``>= t + 1`` (the genes not emitted yet), expression target each one's level. The
      position after the last gene targets ``<E>`` only.

    Built densely with a reverse cumulative sum along the sequence: memory ``O(b * n * V)``, the size of the
    logits themselves.

    Args:
        ids: token ids.
        levels: levels.
        attention_mask: True at real words (right padding).
        prefix_len: prompt length per sentence.
        gene_answer: True at answer words that are genes.
        vocab_size: ``V``.
        targets: ``"set"`` or ``"next"``.

    Returns:
        The targets and the supervised-position mask.

    Shape:
        ids, levels, attention_mask, gene_answer: ``[b, n]``; prefix_len: ``[b]``.
    """
    b, n = ids.shape
    device = ids.device
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1)
    pos = torch.arange(n, device=device)[None, :]
    supervised = (pos >= (prefix_len[:, None] - 1)) & (pos < (lengths[:, None] - 1)) & mask

    pad_false = torch.zeros(b, 1, dtype=torch.bool, device=device)
    next_ids = torch.cat([ids[:, 1:], torch.zeros(b, 1, dtype=ids.dtype, device=device)], dim=1)
    next_levels = torch.cat([levels[:, 1:], torch.zeros(b, 1, dtype=levels.dtype, device=device)], dim=1)
    genes = gene_answer.bool() & mask
    if targets == "set":
        next_is_gene = torch.cat([genes[:, 1:], pad_false], dim=1) & supervised
    elif targets == "next":
        next_is_gene = torch.zeros_like(supervised)
    else:
        msg = f"targets must be 'set' or 'next'; got {targets!r}."
        raise MsfmInputError(msg)

    entity = torch.zeros(b, n, vocab_size, dtype=torch.float32, device=device)
    expression = torch.zeros(b, n, vocab_size, dtype=torch.float32, device=device)
    one_hot = supervised & ~next_is_gene
    bi, ti = one_hot.nonzero(as_tuple=True)
    entity[bi, ti, next_ids[bi, ti]] = 1.0
    expression[bi, ti, next_ids[bi, ti]] = next_levels[bi, ti].float()

    if bool(next_is_gene.any()):
        # own[t] = the gene word at t; remaining[t] = sum over j >= t, so the target at t is remaining[t + 1].
        own = torch.zeros(b, n + 1, vocab_size, dtype=torch.float32, device=device)
        own_level = torch.zeros_like(own)
        gb, gt = genes.nonzero(as_tuple=True)
        own[gb, gt, ids[gb, gt]] = 1.0
        own_level[gb, gt, ids[gb, gt]] = levels[gb, gt].float()
        remaining = own.flip(1).cumsum(1).flip(1)[:, 1:]
        remaining_level = own_level.flip(1).cumsum(1).flip(1)[:, 1:]
        sel = next_is_gene[..., None]
        # Genes are unique within an answer, so the sums are exact 0/1 indicators and plain levels; clamp for safety.
        entity = torch.where(sel, remaining.clamp_max(1.0), entity)
        expression = torch.where(sel, remaining_level, expression)
    return ScMulanTargets(entity=entity, expression=expression, supervised=supervised)


def scmulan_loss(
    model: nn.Module, batch: Mapping[str, Tensor], config: ScMulanLossConfig | None = None
) -> LossOutput:
    """The released scMulan loss on a right-padded batch from :func:`collate_examples`.

    ``loss = V * mean_{positions, V} BCEWithLogits(logits, entity_target)
    + expression_weight * mean_{target entries} (expression - level)^2``, both over the supervised positions of
    the whole batch. Computed in float32 whatever the autocast precision.

    Args:
        model: an :class:`~msfm.models.scmulan.model.ScMulan`.
        batch: ``ids``, ``levels``, ``attention_mask``, ``prefix_len``, ``gene_answer``.
        config: loss settings (default :class:`ScMulanLossConfig`). Bind it with ``functools.partial`` to get
            the engine's ``objective(model, batch)`` form.

    Returns:
        The loss with components ``entity`` and ``expression``; ``n`` = number of sentences.
    """
    cfg = config or ScMulanLossConfig()
    ids, levels, mask = batch["ids"], batch["levels"], batch["attention_mask"]
    # Right padding under a causal mask: real words never see the padding after them, so no key-padding mask
    # is needed (outputs at padded positions are not supervised). Without one, attention runs on SDPA's fused
    # causal kernel. The heads run on the supervised positions only (annotation sentences supervise 3 of ~250).
    out = model(ids, levels, heads="none")
    vocab_size = model.config.vocab_size
    tg = build_targets(
        ids,
        levels,
        mask,
        batch["prefix_len"],
        batch["gene_answer"],
        vocab_size=vocab_size,
        targets=cfg.targets,
    )
    sup = tg.supervised
    hidden = out.hidden[sup]  # [P, d]
    logits = model.entity_head(hidden).float()  # [P, V]
    entity_target = tg.entity[sup]
    # V x mean BCE over the vocabulary = the BCE summed over the vocabulary, per supervised position.
    if cfg.entity_loss == "bce":
        entity_pos = F.binary_cross_entropy_with_logits(logits, entity_target, reduction="none").sum(
            -1
        )  # [P]
    else:
        dist = entity_target / entity_target.sum(-1, keepdim=True).clamp_min(1.0)
        entity_pos = -(torch.log_softmax(logits, dim=-1) * dist).sum(-1)  # [P]
    on = entity_target > 0
    diff = (model.expression_head(hidden).float() - tg.expression[sup]) ** 2
    sq_pos, on_pos = (diff * on).sum(-1), on.sum(-1).to(diff.dtype)  # [P]
    if cfg.reduction == "position":
        entity_loss = entity_pos.mean() if entity_pos.numel() else entity_pos.sum()
        expression_loss = sq_pos.sum() / on_pos.sum().clamp_min(1)
    else:
        row = sup.nonzero()[:, 0]  # sentence of each supervised position
        b = ids.shape[0]
        n_pos = torch.zeros(b, device=ids.device).index_add_(0, row, torch.ones_like(entity_pos))
        ent = torch.zeros(b, device=ids.device).index_add_(0, row, entity_pos)
        sq = torch.zeros(b, device=ids.device).index_add_(0, row, sq_pos)
        n_on = torch.zeros(b, device=ids.device).index_add_(0, row, on_pos)
        has = n_pos > 0
        entity_loss = (ent[has] / n_pos[has]).mean() if bool(has.any()) else ent.sum()
        has_on = n_on > 0
        expression_loss = (sq[has_on] / n_on[has_on]).mean() if bool(has_on.any()) else sq.sum()
    loss = entity_loss + cfg.expression_weight * expression_loss
    return LossOutput(
        loss=loss,
        components={"entity": entity_loss.detach(), "expression": expression_loss.detach()},
        n=int(ids.shape[0]),
    )
