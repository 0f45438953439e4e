"""scMulan vocabulary: the token table of cell sentences (genes, metadata values, task tokens).

Id 0 is ``<E>``, then the genes (one sorted block), then metadata values by category, then the task tokens
``<PCT>`` and ``<SPToken1..N>``. :meth:`CellSentenceVocab.official` is the released 2,222-token table with the
official ids; :meth:`CellSentenceVocab.build` makes a new one with the same layout. Sentences, binning and the
tokenizer live in :mod:`msfm.tokenizers.cell_sentence`.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import itertools
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msfm.errors import MsfmInputError

__all__ = [
    "ANNOTATE",
    "END",
    "GENERATE",
    "NEXT_STATE",
    "OFFICIAL_CATEGORY_KEYS",
    "ORGAN_REGION",
    "CellSentenceVocab",
]

END = "<E>"
ANNOTATE = "<PCT>"
GENERATE = "<SPToken1>"
ORGAN_REGION = "<SPToken3>"
#: Our design re-uses the reserved, unused ``<SPToken2>`` as the next-state (``<NS>``) task token.
NEXT_STATE = "<SPToken2>"

#: Our category names -> the key of the same set in the official ``meta_info`` file.
OFFICIAL_CATEGORY_KEYS: dict[str, str] = {
    "organ": "organ",
    "region": "region",
    "coarse_cell_type": "MCT",
    "cell_type": "cell_type",
    "age": "age_bin",
    "status": "sample_status",
    "technology": "seq_tech",
    "sex": "donor_gender",
}

_VOCAB_FORMAT = "msfm.cell_sentence_vocab"
_VOCAB_FORMAT_VERSION = 1
_SPECIAL_RE = re.compile(r"^<SPToken(\d+)>$")
_OFFICIAL_VOCAB_SIZE = 2222
_OFFICIAL_N_GENES = 2000


def _is_task_token(token: str) -> bool:
    return token == ANNOTATE or _SPECIAL_RE.match(token) is not None


def _suggest(word: str, candidates: Iterable[str], n: int = 3) -> str:
    """`` Did you mean 'x' or 'y'?`` or an empty string."""
    close = difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.6)
    if not close:
        # Case-only differences ("heart" vs "Heart") score below the cutoff for short words.
        lowered = {c.lower(): c for c in candidates}
        close = [lowered[word.lower()]] if word.lower() in lowered else []
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"


def _is_missing(value: Any) -> bool:
    """None, float NaN (numpy or Python) and pandas' NA: a metadata value that is simply absent."""
    if value is None:
        return True
    if isinstance(value, float | np.floating):
        return math.isnan(float(value))
    if isinstance(value, str):
        return False
    try:
        # pandas.NA (and similar) refuse to become a bool; treat them as missing without importing pandas.
        return bool(value != value)
    except TypeError:
        return True


# ---------------------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------------------


class CellSentenceVocab:
    """Token table: id 0 = ``<E>``, then genes (sorted), then metadata values, then task tokens.

    Task tokens are ``<PCT>`` followed by ``<SPToken1>`` .. ``<SPTokenN>``. The official scMulan vocabulary
    (:meth:`official`, 2222 tokens) keeps the exact official ids; :meth:`build` makes a new one for pretraining.

    Attributes:
        tokens: id -> token.
        genes: gene tokens in id order.
        categories: metadata category -> its values (tokens), in id order. Official names: ``organ``, ``region``,
            ``coarse_cell_type`` (official ``MCT``), ``cell_type`` (fine), ``age`` (``age_bin``), ``status``
            (``sample_status``), ``technology`` (``seq_tech``), ``sex`` (``donor_gender``).
    """

    UNCLASSIFIED = "Unclassified"

    def __init__(self, tokens: Sequence[str], genes: Sequence[str], categories: Mapping[str, Sequence[str]]):
        self.tokens: list[str] = [str(t) for t in tokens]
        self.genes: list[str] = [str(g) for g in genes]
        self._index: dict[str, int] = {t: i for i, t in enumerate(self.tokens)}
        self._validate_tokens()
        self.categories: dict[str, list[str]] = {}
        for name, values in categories.items():
            values = [str(v) for v in values]
            unknown = [v for v in values if v not in self._index]
            if unknown:
                msg = (
                    f"Vocabulary category {name!r} has values that are not tokens: {unknown[:5]}. Every metadata "
                    "value must be a token of the vocabulary; rebuild it with CellSentenceVocab.build()."
                )
                raise MsfmInputError(msg)
            # Id order, so that two vocabularies with the same tokens describe their categories identically.
            self.categories[str(name)] = sorted(set(values), key=self._index.__getitem__)
        gene_ids = np.array([self._index[g] for g in self.genes], dtype=np.int64)
        self._gene_ids = gene_ids
        self._gene_ids.setflags(write=False)
        self._is_gene_table = np.zeros(len(self.tokens), dtype=bool)
        self._is_gene_table[gene_ids] = True

    def _validate_tokens(self) -> None:
        if len(self._index) != len(self.tokens):
            dupes = sorted({t for t in self.tokens if self.tokens.count(t) > 1})[:5]
            msg = f"Vocabulary tokens must be unique; duplicated: {dupes}."
            raise MsfmInputError(msg)
        if not self.tokens or self.tokens[0] != END:
            msg = f"Vocabulary token 0 must be {END!r} (end of sentence); got {self.tokens[:1]}."
            raise MsfmInputError(msg)
        if not self.genes:
            msg = "Vocabulary has no genes; a c-sentence vocabulary needs at least one gene token."
            raise MsfmInputError(msg)
        missing_genes = [g for g in self.genes if g not in self._index]
        if missing_genes:
            msg = f"Vocabulary genes {missing_genes[:5]} are not tokens of the vocabulary."
            raise MsfmInputError(msg)
        ids = [self._index[g] for g in self.genes]
        if any(b <= a for a, b in itertools.pairwise(ids)):
            msg = "Vocabulary genes must be listed in ascending id order (genes are laid out as one sorted block)."
            raise MsfmInputError(msg)
        required = [END, ANNOTATE, GENERATE, NEXT_STATE, ORGAN_REGION]
        absent = [t for t in required if t not in self._index]
        if absent:
            msg = f"Vocabulary lacks the task tokens {absent}; vocabularies need <PCT> and <SPToken1..3> at least."
            raise MsfmInputError(msg)

    # -- lookup --------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: object) -> bool:
        return isinstance(token, str) and token in self._index

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CellSentenceVocab):
            return NotImplemented
        return (
            self.tokens == other.tokens and self.genes == other.genes and self.categories == other.categories
        )

    __hash__ = None  # type: ignore[assignment]  # mutable lists inside

    def __repr__(self) -> str:
        cats = ", ".join(f"{k}={len(v)}" for k, v in self.categories.items())
        return f"CellSentenceVocab({len(self)} tokens, {len(self.genes)} genes, {cats})"

    def id(self, token: str) -> int:
        """Id of ``token``.

        Raises:
            MsfmInputError: for an unknown token (with close matches when there are any).
        """
        if not isinstance(token, str):
            msg = f"Token {token!r} ({type(token).__name__}) is not a string; tokens are strings such as 'CD3E'."
            raise MsfmInputError(msg)
        try:
            return self._index[token]
        except KeyError:
            msg = f"Token {token!r} is not in the vocabulary ({len(self)} tokens).{_suggest(token, self.tokens)}"
            raise MsfmInputError(msg) from None

    def ids(self, tokens: Sequence[str]) -> np.ndarray:
        """Ids of ``tokens``.

        Shape:
            ``[len(tokens)]`` int64.
        """
        return np.array([self.id(t) for t in tokens], dtype=np.int64)

    def token(self, i: int) -> str:
        """Token of id ``i``."""
        i = int(i)
        if not 0 <= i < len(self.tokens):
            msg = f"Token id {i} is out of range; this vocabulary has ids 0..{len(self.tokens) - 1}."
            raise MsfmInputError(msg)
        return self.tokens[i]

    def decode(self, ids: Iterable[int] | np.ndarray | torch.Tensor) -> list[str]:
        """Tokens of ``ids`` (any 1-d integer sequence, array or tensor)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        return [self.token(i) for i in np.asarray(ids).ravel()]

    # -- id groups -----------------------------------------------------------------------------------------------

    @property
    def gene_ids(self) -> np.ndarray:
        """Ids of the genes, ascending (read-only).

        Shape:
            ``[len(genes)]`` int64.
        """
        return self._gene_ids

    @property
    def end_id(self) -> int:
        return self._index[END]

    @property
    def annotate_id(self) -> int:
        return self._index[ANNOTATE]

    @property
    def generate_id(self) -> int:
        return self._index[GENERATE]

    @property
    def organ_region_id(self) -> int:
        return self._index[ORGAN_REGION]

    @property
    def next_state_id(self) -> int:
        return self._index[NEXT_STATE]

    @property
    def task_ids(self) -> np.ndarray:
        """Ids of every task token (``<PCT>``, ``<SPToken*>``), ascending."""
        return np.array([i for i, t in enumerate(self.tokens) if _is_task_token(t)], dtype=np.int64)

    def category_ids(self, *names: str) -> np.ndarray:
        """Sorted unique ids of the union of the named categories.

        Shape:
            ``[k]`` int64.
        """
        out: set[int] = set()
        for name in names:
            out.update(self._index[v] for v in self._category(name))
        return np.array(sorted(out), dtype=np.int64)

    def _category(self, name: str) -> list[str]:
        if name not in self.categories:
            hint = ""
            ours = {v: k for k, v in OFFICIAL_CATEGORY_KEYS.items()}
            if name in ours and ours[name] in self.categories:
                hint = f" The official key {name!r} is called {ours[name]!r} here."
            else:
                hint = _suggest(name, self.categories)
            msg = f"Unknown metadata category {name!r}; this vocabulary has {sorted(self.categories)}.{hint}"
            raise MsfmInputError(msg)
        return self.categories[name]

    @property
    def cell_type_ids(self) -> np.ndarray:
        """Ids of all cell-type tokens: the union of ``coarse_cell_type`` and ``cell_type`` (those present)."""
        present = [c for c in ("coarse_cell_type", "cell_type") if c in self.categories]
        return self.category_ids(*present)

    def is_gene(self, ids: np.ndarray | torch.Tensor) -> np.ndarray:
        """Whether each id is a gene token (out-of-range ids, e.g. padding -1, are not).

        Shape:
            same as ``ids``, bool.
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        ids = np.asarray(ids, dtype=np.int64)
        inside = (ids >= 0) & (ids < len(self.tokens))
        out = np.zeros(ids.shape, dtype=bool)
        out[inside] = self._is_gene_table[ids[inside]]
        return out

    # -- construction --------------------------------------------------------------------------------------------

    @classmethod
    def official(cls) -> CellSentenceVocab:
        """The official scMulan vocabulary (2222 tokens) with the official ids, from the shipped ``meta_info.json``."""
        tokens, genes, categories = _official_tables()
        vocab = cls(tokens, genes, categories)
        # Checkpoint compatibility hinges on this: ids are the index in the official token_set, nothing else.
        assert vocab.tokens == list(tokens)
        return vocab

    @classmethod
    def build(
        cls,
        genes: Sequence[str],
        categories: Mapping[str, Iterable[str]],
        *,
        n_special: int = 15,
    ) -> CellSentenceVocab:
        """A new vocabulary for pretraining a model from scratch.

        Layout: ``<E>``; genes sorted alphabetically (deduplicated); each category's values in the order the
        categories are given, values sorted and deduplicated, a value that is already a metadata token being
        reused (as the official vocabulary reuses organ tokens for regions); ``Unclassified`` if not already
        present; ``<PCT>``, ``<SPToken1>`` .. ``<SPToken{n_special}>``.

        Args:
            genes: gene symbols.
            categories: category name -> its values, e.g. ``{"organ": [...], "cell_type": [...]}``.
            n_special: number of ``<SPToken*>`` tokens (>= 3: generation, next state and organ/region use 1..3).

        Raises:
            MsfmInputError: for no genes, non-string names or values, a value equal to a task token or to a gene
                symbol, or ``n_special < 3``.
        """
        if isinstance(n_special, bool) or not isinstance(n_special, int | np.integer) or n_special < 3:
            msg = (
                f"n_special={n_special!r} is not valid; expected an integer >= 3 (<SPToken1> generation, "
                "<SPToken2> next state and <SPToken3> organ/region are always needed)."
            )
            raise MsfmInputError(msg)
        if isinstance(genes, str):
            msg = f"genes must be a list of gene symbols, got the single string {genes!r}."
            raise MsfmInputError(msg)
        gene_list = list(genes)
        bad = [g for g in gene_list if not isinstance(g, str) or not g]
        if bad:
            msg = f"Gene symbols must be non-empty strings; got {bad[:5]!r}. Convert gene names with str() first."
            raise MsfmInputError(msg)
        if not gene_list:
            msg = "CellSentenceVocab.build() got no genes; a c-sentence vocabulary needs at least one gene."
            raise MsfmInputError(msg)
        special = [ANNOTATE, *(f"<SPToken{i}>" for i in range(1, int(n_special) + 1))]
        reserved = {END, *special}
        clash = sorted(set(gene_list) & reserved)
        if clash:
            msg = f"Gene symbols {clash} are reserved task tokens; rename those genes."
            raise MsfmInputError(msg)
        sorted_genes = sorted(set(gene_list))
        gene_set = set(sorted_genes)

        tokens = [END, *sorted_genes]
        present = set(tokens)
        cat_values: dict[str, list[str]] = {}
        for name, values in categories.items():
            if not isinstance(name, str) or not name:
                msg = f"Category names must be non-empty strings; got {name!r}."
                raise MsfmInputError(msg)
            if isinstance(values, str):
                msg = (
                    f"Category {name!r} must be a list of values, got the single string {values!r}; "
                    f"write {{{name!r}: [{values!r}]}}."
                )
                raise MsfmInputError(msg)
            vals = list(values)
            bad = [v for v in vals if not isinstance(v, str) or not v]
            if bad:
                msg = f"Values of category {name!r} must be non-empty strings; got {bad[:5]!r}."
                raise MsfmInputError(msg)
            if clash := sorted(set(vals) & reserved):
                msg = f"Category {name!r} has values {clash} that are reserved task tokens; rename them."
                raise MsfmInputError(msg)
            # A metadata value that is also a gene symbol would make a generated word ambiguous (gene or label?).
            if clash := sorted(set(vals) & gene_set):
                msg = (
                    f"Category {name!r} has values {clash[:5]} that are also gene symbols; a token cannot be both. "
                    "Rename those values (e.g. add a suffix)."
                )
                raise MsfmInputError(msg)
            uniq = sorted(set(vals))
            cat_values[name] = uniq
            for v in uniq:
                if v not in present:
                    tokens.append(v)
                    present.add(v)
        if cls.UNCLASSIFIED not in present:
            tokens.append(cls.UNCLASSIFIED)
        tokens.extend(special)
        return cls(tokens, sorted_genes, cat_values)

    # -- persistence ---------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description (round-trips through :meth:`from_dict`)."""
        return {
            "format": _VOCAB_FORMAT,
            "version": _VOCAB_FORMAT_VERSION,
            "tokens": list(self.tokens),
            "genes": list(self.genes),
            "categories": {k: list(v) for k, v in self.categories.items()},
            "sha256": self.sha256(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CellSentenceVocab:
        """Inverse of :meth:`to_dict`; checks the format tag and, when present, the hash."""
        if not isinstance(d, Mapping) or d.get("format") != _VOCAB_FORMAT:
            got = d.get("format") if isinstance(d, Mapping) else type(d).__name__
            msg = (
                f"Not a c-sentence vocabulary (format {got!r}, expected {_VOCAB_FORMAT!r}). Use a file written "
                "by CellSentenceVocab.save()."
            )
            raise MsfmInputError(msg)
        if int(d.get("version", 0)) > _VOCAB_FORMAT_VERSION:
            msg = (
                f"Vocabulary format version {d.get('version')} is newer than this msfm understands "
                f"({_VOCAB_FORMAT_VERSION}); upgrade msfm."
            )
            raise MsfmInputError(msg)
        try:
            vocab = cls(d["tokens"], d["genes"], d.get("categories", {}))
        except KeyError as err:
            msg = f"Vocabulary description lacks the key {err}; expected 'tokens', 'genes' and 'categories'."
            raise MsfmInputError(msg) from None
        expected = d.get("sha256")
        if expected is not None and expected != vocab.sha256():
            msg = (
                f"Vocabulary hash mismatch: stored {expected}, computed {vocab.sha256()}. The token list was edited "
                "or the file is corrupt."
            )
            raise MsfmInputError(msg)
        return vocab

    def save(self, path: str | Path) -> Path:
        """Write the vocabulary as JSON, atomically (no half-written file on a crash)."""
        from msfm.runtime.atomic import atomic_write_json

        return atomic_write_json(path, self.to_dict(), indent=1)

    @classmethod
    def load(cls, path: str | Path) -> CellSentenceVocab:
        """Read a vocabulary written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            msg = f"Vocabulary file {path} does not exist. Pass the JSON file written by CellSentenceVocab.save()."
            raise MsfmInputError(msg)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            msg = f"Vocabulary file {path} is not valid JSON ({err}). Re-create it with CellSentenceVocab.save()."
            raise MsfmInputError(msg) from None
        return cls.from_dict(d)

    def sha256(self) -> str:
        """Hash of the token list (id order), to check that a checkpoint and a vocabulary belong together."""
        payload = json.dumps(self.tokens, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=1)
def _official_tables() -> tuple[tuple[str, ...], tuple[str, ...], dict[str, tuple[str, ...]]]:
    from msfm.data.resources import resource_path

    meta = json.loads(resource_path("scmulan", "meta_info.json").read_text(encoding="utf-8"))
    tokens = tuple(meta["token_set"])
    genes = tuple(meta["gene_set"])
    if len(tokens) != _OFFICIAL_VOCAB_SIZE or tokens[1 : 1 + _OFFICIAL_N_GENES] != genes:
        msg = (
            "The shipped scMulan meta_info.json does not have the official layout (2222 tokens, genes at ids "
            "1..2000). The installation is damaged: reinstall msfm."
        )
        raise MsfmInputError(msg)
    cats = {ours: tuple(meta[theirs]) for ours, theirs in OFFICIAL_CATEGORY_KEYS.items()}
    return tokens, genes, cats
