"""Batched decoding for scMulan: left padding, KV cache, constrained and sampled generation.

A decoding step reads the entity logits and expression values at the last position, bans tokens (task
constraints and repeats), picks a token (greedy or sampled), gives it the level
``clamp(round(expression[token]), 0, n_levels)`` and feeds ``(token, level)`` back. This is the released
``generate_cellGenesis`` loop, with three changes that do not alter its results:

* many sentences decode together (left padded; exact because the model has no position embedding);
* the prompt is run once and later steps reuse cached keys and values (``use_cache=False`` recomputes
  everything, as the release does, for checks and benchmarks);
* ``max_new_tokens`` counts new tokens (the release's argument of that name caps the total length).

Repeat masks (the one behavioural difference between the two released model classes):

* ``"official"``: ban every id of the sentence except the one at the last position (``scMulanModel``); the
  token just emitted may repeat once, so annotation can answer ``T cell, T cell``;
* ``"all"``: ban every id seen, the last included (``scMulanModel_kv``);
* ``"generated"``: ban every id generated so far, but not the prompt's (next-state decoding: the next
  cell re-uses most genes of the prompt cell);
* ``"none"``: no repeat ban.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor

from msfm.errors import MsfmInputError
from msfm.models.scmulan.model import ScMulan

__all__ = ["USER_OPTIONS", "DecodeOptions", "GenerationResult", "generate_tokens", "id_mask"]

RepeatMask = Literal["official", "all", "generated", "none"]


#: The decoding options a user may set (``stop_at_end`` and ``end_id`` are set by the verbs).
USER_OPTIONS = (
    "max_new_tokens",
    "greedy",
    "temperature",
    "top_k",
    "end_weight",
    "repeat_mask",
    "constrained",
    "seed",
)


class DecodeOptions(BaseModel):
    """How scMulan picks words: the decoding options of every verb that decodes, declared (and documented) once.

    The verbs take them as keyword arguments (``msfm.scmulan.generate(prompts, ckpt, temperature=0.7,
    end_weight=0.1)``), or as one object (``decoding=DecodeOptions(...)``), and each verb accepts the ones that
    apply to it (annotation decodes greedily with fixed steps, so it only takes ``constrained`` and
    ``repeat_mask``); a misspelt name gets "did you mean".

    Attributes:
        max_new_tokens: most words to generate per sentence (an ``<E>`` ends a sentence earlier). ``None``: the
            verb's default (generation: every gene once plus ``<E>``, within the model's ``max_length``).
        greedy: take the most probable word (the release's ``top_k=1``); otherwise sample.
        temperature: divides the logits before top-k and softmax (sampling only; 1 = the release).
        top_k: sample among the ``k`` largest logits (``None`` = all).
        end_weight: multiply the probability of ``<E>`` by this before picking (the release's ``gamma``;
            0.1 in the paper's generation experiments, 1 = unchanged).
        repeat_mask: which words may not come again: ``"official"`` (the release's non-cached model class: every
            word but the last one), ``"all"`` (its KV-cache class: every word seen), ``"generated"`` (only
            generated words; next state) or ``"none"`` (see the module docstring).
        constrained: restrict each step to the words the task expects (annotation: cell types; organ: organs,
            then regions; generation: genes and ``<E>``); ``False`` decodes freely, as the release does.
        seed: seed of the sampling; each generated cell draws from its own stream, so outputs do not depend on
            the batch size.
        stop_at_end: a sentence stops at its first ``<E>`` (internal).
        end_id: id of ``<E>`` (internal; set from the vocabulary).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_new_tokens: int | None = Field(None, ge=1)
    greedy: bool = True
    temperature: float = Field(1.0, gt=0.0)
    top_k: int | None = Field(None, ge=1)
    end_weight: float = Field(1.0, ge=0.0)
    repeat_mask: RepeatMask = "all"
    constrained: bool = True
    seed: int = Field(0, ge=0)
    stop_at_end: bool = True
    end_id: int = Field(0, ge=0)

    @classmethod
    def parse(
        cls,
        options: Mapping[str, Any],
        *,
        verb: str,
        accepted: Iterable[str] = USER_OPTIONS,
        defaults: Mapping[str, Any] | None = None,
        base: DecodeOptions | None = None,
    ) -> DecodeOptions:
        """The options of one verb call: the verb's ``defaults``, then ``base`` (the fields set on it), then
        ``options`` (keyword arguments).

        Args:
            options: decoding keyword arguments of the call.
            verb: the verb's name, for messages.
            accepted: the options that apply to the verb.
            defaults: the verb's own defaults (e.g. ``greedy=False`` for generation).
            base: a ``DecodeOptions`` given as ``decoding=``.

        Raises:
            MsfmInputError: an option that does not apply to the verb, or an invalid value.
        """
        accepted = tuple(accepted)
        given = {**(base.model_dump(exclude_unset=True) if base is not None else {}), **options}
        foreign = [k for k in given if k not in accepted]
        if foreign:
            msg = (
                f"{verb} does not take the decoding option(s) {', '.join(map(repr, foreign))}; its decoding "
                f"options are {', '.join(accepted) or 'none'} (see msfm.scmulan.DecodeOptions)."
            )
            raise MsfmInputError(msg)
        try:
            return cls(**{**dict(defaults or {}), **given})
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            msg = f"Invalid decoding option {where}={first.get('input')!r} for {verb}: {first.get('msg')}."
            raise MsfmInputError(msg) from err


@dataclass
class GenerationResult:
    """Generated words of a batch.

    Attributes:
        ids: generated token ids, ``-1`` after a sentence stopped (its ``<E>`` is kept).
        levels: level given to each token (and fed back), ``-1`` after the stop.
        level_raw: expression value of the chosen token before rounding (NaN after the stop).
        prob: probability of the chosen token under the final (masked, ``end_weight``-scaled) distribution.
        n_new: number of generated tokens per sentence (including a final ``<E>``).
        hidden: final hidden state at each generated token once it was fed back (the integration embedding
            of annotation is ``hidden[:, 0]``); NaN where a token was not fed (the last step).
        prompt_last_hidden: hidden state at the last prompt word (the task token).
        prompt_mean_hidden: mean hidden state over the real prompt words.

    Shape:
        - ids, levels, level_raw, prob: ``[b, s]`` (``s`` = steps run)
        - n_new: ``[b]``
        - hidden: ``[b, s, d]``; prompt_*_hidden: ``[b, d]``
    """

    ids: Tensor
    levels: Tensor
    level_raw: Tensor
    prob: Tensor
    n_new: Tensor
    hidden: Tensor
    prompt_last_hidden: Tensor
    prompt_mean_hidden: Tensor


def id_mask(ids: Sequence[int] | Tensor, vocab_size: int, device: torch.device | str | None = None) -> Tensor:
    """Boolean ``[V]`` mask that is True at ``ids`` (an allowed set for constrained decoding)."""
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    mask[torch.as_tensor(ids, dtype=torch.long, device=device)] = True
    return mask


def _allowed_at(allowed: Sequence[Tensor | None] | Tensor | None, step: int) -> Tensor | None:
    """Allowed set of one step: a ``[V]``/``[b, V]`` mask, a per-step list (the last entry repeats), or None."""
    if allowed is None or isinstance(allowed, Tensor):
        return allowed
    if len(allowed) == 0:
        return None
    return allowed[min(step, len(allowed) - 1)]


def _pick(logits: Tensor, options: DecodeOptions, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Choose one token per row from masked logits; returns ``(token, probability)``.

    Shape: logits ``[b, V]`` (float32, -inf = banned) -> two ``[b]`` tensors.
    """
    if not options.greedy and options.temperature != 1.0:
        logits = logits / options.temperature
    if options.top_k is not None and options.top_k < logits.shape[-1]:
        kth = torch.topk(logits, options.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    dead = torch.isinf(logits).all(dim=-1)  # nothing left to choose: the sentence ends
    logits = logits.masked_fill(dead[:, None], 0.0)
    probs = torch.softmax(logits, dim=-1)
    if options.end_weight != 1.0:
        probs[:, options.end_id] *= options.end_weight
    total = probs.sum(dim=-1, keepdim=True)
    probs = probs / total.clamp_min(torch.finfo(probs.dtype).tiny)
    if options.greedy:
        token = probs.argmax(dim=-1)
    else:
        token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    prob = probs.gather(1, token[:, None]).squeeze(1)
    token = torch.where(dead, torch.full_like(token, options.end_id), token)
    prob = torch.where(dead, torch.zeros_like(prob), prob)
    return token, prob


@torch.no_grad()
def generate_tokens(
    model: ScMulan,
    ids: Tensor,
    levels: Tensor,
    attention_mask: Tensor | None,
    options: DecodeOptions,
    *,
    allowed: Sequence[Tensor | None] | Tensor | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> GenerationResult:
    """Continue a batch of left-padded prompts.

    Args:
        model: the network (in eval mode).
        ids: prompt token ids, left padded.
        levels: prompt levels, left padded.
        attention_mask: True at real words; ``None`` = no padding.
        options: decoding settings.
        allowed: tokens each step may produce: one ``[V]`` or ``[b, V]`` boolean mask for every step, or a
            list with one entry per step (``None`` = unconstrained; the last entry repeats).
        generator: random generator for sampling (seeded by the caller for reproducibility).
        use_cache: reuse keys/values (fast); ``False`` re-runs the whole sentence each step.

    Returns:
        The generated words, see :class:`GenerationResult`.

    Shape:
        - ids, levels, attention_mask: ``[b, n]``
    """
    if options.max_new_tokens is None:
        msg = "generate_tokens needs DecodeOptions.max_new_tokens (the verbs resolve it; set it when calling this)."
        raise ValueError(msg)
    b, n = ids.shape
    device = ids.device
    vocab = model.config.vocab_size
    n_levels = model.config.n_levels
    mask = (
        torch.ones(b, n, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
    )
    if not bool(mask[:, -1].all()):
        msg = "prompts must be left padded: the last position of every row must be a real word."
        raise ValueError(msg)
    if n + options.max_new_tokens > model.config.max_length:
        msg = (
            f"prompt length {n} + max_new_tokens {options.max_new_tokens} exceeds the model's max_length "
            f"{model.config.max_length}."
        )
        raise ValueError(msg)

    # Repeat bans: counts of each id among the words before the last one, plus the last id.
    # ("generated" starts empty: only generated ids are counted.)
    seen = torch.zeros(b, vocab, dtype=torch.int32, device=device)
    if options.repeat_mask != "generated":
        before_last = ids[:, :-1].masked_fill(~mask[:, :-1], 0)
        seen.scatter_add_(1, before_last, mask[:, :-1].to(torch.int32))
    last = ids[:, -1].clone()
    last_counts = options.repeat_mask != "generated"  # whether `last` belongs to the banned words

    cache = model.new_cache() if use_cache else None
    out = model(ids, levels, attention_mask=mask, cache=cache, heads="last")
    weights = mask.to(out.hidden.dtype)[..., None]
    prompt_last = out.hidden[:, -1].float()
    prompt_mean = ((out.hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)).float()

    steps = options.max_new_tokens
    out_ids = torch.full((b, steps), -1, dtype=torch.long, device=device)
    out_levels = torch.full((b, steps), -1, dtype=torch.long, device=device)
    out_raw = torch.full((b, steps), float("nan"), device=device)
    out_prob = torch.zeros(b, steps, device=device)
    hidden = torch.full((b, steps, model.config.dim), float("nan"), device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    seq_ids, seq_levels = ids, levels
    run = 0
    for step in range(steps):
        logits = out.logits[:, -1].float()
        expression = out.expression[:, -1].float()
        step_allowed = _allowed_at(allowed, step)
        if step_allowed is not None:
            logits = logits.masked_fill(~step_allowed.to(device).expand_as(logits), float("-inf"))
        if options.repeat_mask != "none":
            banned = seen > 0
            if options.repeat_mask in ("all", "generated") and last_counts:
                banned = banned.clone()
                banned.scatter_(1, last[:, None], True)
            logits = logits.masked_fill(banned, float("-inf"))
        token, prob = _pick(logits, options, generator)
        raw = expression.gather(1, token[:, None]).squeeze(1)
        level = torch.clamp(torch.round(raw), 0, n_levels).long()

        active = ~finished
        out_ids[:, step] = torch.where(active, token, out_ids[:, step])
        out_levels[:, step] = torch.where(active, level, out_levels[:, step])
        out_raw[:, step] = torch.where(active, raw, out_raw[:, step])
        out_prob[:, step] = torch.where(active, prob, out_prob[:, step])
        run = step + 1
        if options.stop_at_end:
            finished = finished | (active & (token == options.end_id))
        if bool(finished.all()) or step == steps - 1:
            break

        # Feed the new word back (finished rows feed a harmless <E>; their outputs are ignored).
        token = torch.where(active, token, torch.full_like(token, options.end_id))
        level = torch.where(active, level, torch.zeros_like(level))
        if last_counts:
            seen.scatter_add_(1, last[:, None], torch.ones(b, 1, dtype=torch.int32, device=device))
        last = token
        last_counts = True
        mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.bool, device=device)], dim=1)
        if use_cache:
            out = model(token[:, None], level[:, None], attention_mask=mask, cache=cache, heads="last")
        else:
            seq_ids = torch.cat([seq_ids, token[:, None]], dim=1)
            seq_levels = torch.cat([seq_levels, level[:, None]], dim=1)
            out = model(seq_ids, seq_levels, attention_mask=mask, heads="last")
        hidden[:, step] = torch.where(active[:, None], out.hidden[:, -1].float(), hidden[:, step])

    n_new = (out_ids[:, :run] >= 0).sum(dim=1)
    return GenerationResult(
        ids=out_ids[:, :run],
        levels=out_levels[:, :run],
        level_raw=out_raw[:, :run],
        prob=out_prob[:, :run],
        n_new=n_new,
        hidden=hidden[:, :run],
        prompt_last_hidden=prompt_last,
        prompt_mean_hidden=prompt_mean,
    )
