"""Open-ended decoding of many prompts: per-cell random streams, length resolution, and generated cells as AnnData.

Sampling is reproducible and independent of the batch size: every generated cell draws from its own random
stream, seeded by ``(seed, stream id)`` (:class:`PerCellSampler`). Generated cells live in the "binned" space of
the release: ``X`` = level / ``n_levels`` over the vocabulary's genes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from torch import Tensor, nn

from msfm.data.samplers import length_buckets
from msfm.errors import MsfmInputError
from msfm.models.scmulan.decoding import DecodeOptions, RepeatMask, generate_tokens, id_mask
from msfm.models.scmulan.model import ScMulan, ScMulanOutput
from msfm.runtime.loaded import Loaded
from msfm.runtime.progress import progress_bar
from msfm.tokenizers.cell_sentence import CellSentenceTokenizer, Sentences

__all__ = [
    "Generated",
    "PerCellSampler",
    "cells_anndata",
    "gene_end_mask",
    "generate_sentences",
    "resolve_length",
    "sampler_for",
]


def stream_seed(seed: int, stream: Sequence[int]) -> int:
    """The seed of one random stream: a hash of ``(seed, *stream)``."""
    return int(
        np.random.SeedSequence([int(seed), *(int(s) for s in stream)]).generate_state(1, dtype=np.uint64)[0]
    )


class PerCellSampler(nn.Module):
    """Wraps the model so that *greedy* decoding draws an exact sample per cell from its own random stream.

    Gumbel-max trick: with ``G ~ Gumbel(0, 1)`` i.i.d. per token, ``argmax(l / T + G)`` is a sample from
    ``softmax(l / T)``. ``generate_tokens`` with ``greedy=True`` multiplies the ``<E>`` probability by
    ``end_weight`` before its argmax, i.e. adds ``log(end_weight)`` to that logit, which is exactly the release's
    ``gamma`` re-weighting of the sampling distribution. The constraint, the repeat ban and top-k are applied
    here before the noise (as the release applies them before sampling), and each cell draws its noise from a
    generator seeded by ``(seed, stream id)``: a cell's sample does not depend on the batch it is decoded in.
    """

    def __init__(
        self,
        model: ScMulan,
        seeds: Sequence[int],
        *,
        temperature: float,
        top_k: int | None,
        allowed: Tensor | None,
        repeat_mask: RepeatMask,
    ) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.temperature = float(temperature)
        self.top_k = top_k
        self.allowed = allowed
        self.repeat_mask = repeat_mask
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self._seen: Tensor | None = None
        self._last: Tensor | None = None

    def new_cache(self) -> Any:
        return self.model.new_cache()

    def _track(self, ids: Tensor, attention_mask: Tensor | None, incremental: bool) -> None:
        """Repeat-ban bookkeeping, the same rule as ``generate_tokens``."""
        b, n = ids.shape
        if incremental and self._seen is not None:
            self._seen.scatter_add_(
                1, self._last[:, None], torch.ones(b, 1, dtype=torch.int32, device=ids.device)
            )
            self._last = ids[:, -1].clone()
            return
        mask = (
            torch.ones_like(ids, dtype=torch.bool)
            if attention_mask is None
            else attention_mask[:, -n:].bool()
        )
        seen = torch.zeros(b, self.config.vocab_size, dtype=torch.int32, device=ids.device)
        seen.scatter_add_(1, ids[:, :-1].masked_fill(~mask[:, :-1], 0), mask[:, :-1].to(torch.int32))
        self._seen, self._last = seen, ids[:, -1].clone()

    def forward(
        self,
        ids: Tensor,
        levels: Tensor,
        *,
        attention_mask: Tensor | None = None,
        cache: Any = None,
        heads: str = "last",
    ) -> ScMulanOutput:
        out = self.model(ids, levels, attention_mask=attention_mask, cache=cache, heads=heads)
        self._track(ids, attention_mask, incremental=cache is not None and self._seen is not None)
        logits = out.logits[:, -1].float()
        neg = float("-inf")
        if self.allowed is not None:
            logits = logits.masked_fill(~self.allowed.expand_as(logits), neg)
        if self.repeat_mask != "none":
            banned = self._seen > 0
            if self.repeat_mask == "all":
                banned = banned.clone()
                banned.scatter_(1, self._last[:, None], True)
            logits = logits.masked_fill(banned, neg)
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, neg)
        logits = logits / self.temperature
        u = torch.stack(
            [torch.rand(logits.shape[-1], generator=g, dtype=torch.float64) for g in self.generators]
        )
        gumbel = -torch.log(-torch.log(u.clamp(1e-300, 1.0 - 1e-16)))
        logits = logits + gumbel.to(device=logits.device, dtype=logits.dtype)
        return ScMulanOutput(logits[:, None], out.expression, out.hidden)


def sampler_for(
    model: ScMulan, options: DecodeOptions, allowed: Tensor | None, streams: Sequence[Sequence[int]]
) -> tuple[Any, DecodeOptions]:
    """The model and options ``generate_tokens`` runs with: the model itself for greedy decoding, else a
    :class:`PerCellSampler` (whose noisy logits already carry the temperature and top-k) decoded greedily."""
    if options.greedy:
        return model, options
    sampler = PerCellSampler(
        model,
        [stream_seed(options.seed, s) for s in streams],
        temperature=options.temperature,
        top_k=options.top_k,
        allowed=allowed,
        repeat_mask=options.repeat_mask,
    )
    return sampler, options.model_copy(update={"greedy": True, "temperature": 1.0, "top_k": None})


@dataclass
class Generated:
    """Generated words per sentence (``<E>`` included when the sentence stopped on it)."""

    ids: list[np.ndarray]
    levels: list[np.ndarray]
    stopped: np.ndarray


@torch.inference_mode()
def generate_sentences(
    loaded: Loaded,
    prompts: Sentences,
    streams: Sequence[Sequence[int]],
    *,
    options: DecodeOptions,
    allowed: Tensor | None,
    batch_size: int,
    max_tokens: int | None,
    progress: bool,
    desc: str,
) -> Generated:
    """Decode every prompt (left padded, bucketed by length); sampling uses one random stream per prompt."""
    tokenizer = CellSentenceTokenizer(loaded.vocab, n_levels=loaded.config.n_levels)
    n = len(prompts)
    out_ids: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * n
    out_levels: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * n
    stopped = np.zeros(n, dtype=bool)
    device = loaded.device
    lengths = prompts.lengths()
    with progress_bar(n, desc, enabled=progress) as bar:
        order = np.argsort(lengths, kind="stable")
        for group in length_buckets(order, lengths, batch_size=batch_size, max_tokens=max_tokens):
            ids, levels, mask = tokenizer.left_pad(prompts, group)
            model, run_options = sampler_for(loaded.model, options, allowed, [streams[int(i)] for i in group])
            res = generate_tokens(
                model, ids.to(device), levels.to(device), mask.to(device), run_options, allowed=allowed
            )
            gen_ids = res.ids.cpu().numpy()
            gen_levels = res.levels.cpu().numpy()
            n_new = res.n_new.cpu().numpy()
            for j, i in enumerate(group):
                k = int(n_new[j])
                out_ids[int(i)] = gen_ids[j, :k].copy()
                out_levels[int(i)] = gen_levels[j, :k].copy()
                stopped[int(i)] = k > 0 and gen_ids[j, k - 1] == options.end_id
            bar.update(len(group))
    return Generated(out_ids, out_levels, stopped)


def resolve_length(loaded: Loaded, options: DecodeOptions, *, prompt_len: int) -> DecodeOptions:
    """``options`` with ``max_new_tokens`` checked (default: every gene once plus ``<E>``, within max_length)
    and ``end_id`` set from the vocabulary."""
    limit = loaded.config.max_length - prompt_len
    max_new_tokens = options.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = min(len(loaded.vocab.genes) + 1, limit)
        if max_new_tokens < 1:
            msg = f"Prompts of {prompt_len} words leave no room to generate within max_length {loaded.config.max_length}."
            raise MsfmInputError(msg)
    elif max_new_tokens > limit:
        msg = (
            f"max_new_tokens={max_new_tokens!r} is not valid: expected 1..{limit} (the model's max_length "
            f"{loaded.config.max_length} minus the longest prompt, {prompt_len} words)."
        )
        raise MsfmInputError(msg)
    return options.model_copy(update={"max_new_tokens": int(max_new_tokens), "end_id": loaded.vocab.end_id})


def gene_end_mask(loaded: Loaded) -> Tensor:
    """``[V]`` mask of the genes and ``<E>``: what constrained generation may write."""
    vocab = loaded.vocab
    return id_mask(np.append(vocab.gene_ids, vocab.end_id), len(vocab), device=loaded.device)


def cells_anndata(
    loaded: Loaded,
    ids: Sequence[np.ndarray],
    levels: Sequence[np.ndarray],
    stopped: np.ndarray,
    obs: pd.DataFrame,
) -> AnnData:
    """Generated sentences -> AnnData: X = level / n_levels (csr), layers['levels'] integer levels."""
    tokenizer = CellSentenceTokenizer(loaded.vocab, n_levels=loaded.config.n_levels)
    x = tokenizer.sentences_to_matrix(list(ids), list(levels))
    lv = sp.csr_matrix(
        (np.rint(x.data * loaded.config.n_levels).astype(np.int16), x.indices.copy(), x.indptr.copy()),
        shape=x.shape,
    )
    obs = obs.copy()
    obs["n_genes"] = np.diff(x.indptr).astype(np.int64)
    obs["n_words"] = np.array([len(a) for a in ids], dtype=np.int64)
    obs["stopped_at_end"] = np.asarray(stopped, dtype=bool)
    adata = AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(loaded.vocab.genes, name="gene")))
    adata.layers["levels"] = lv
    return adata
