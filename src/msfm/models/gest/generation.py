"""Iterative generation of expression at query positions (paper §4.3), on tensors.

Known cells of a window form the context; each query cell is predicted from the context, the queries before it and
its own position, and its predicted meta-cell token is fed back as context for the next query (the paper does not
say which token is fed back; we feed the picked or sampled meta-cell, the training distribution).

Output modes:

* ``pick``: ``C_expr[argmax p]`` (the paper's "picking");
* ``weighted``: ``sum_c p(c) C_expr[c]`` (the paper's "GeST-W"); the fed-back token is still the argmax;
* ``sample``: a token drawn from ``softmax(logits / temperature)``, returned and fed back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from msfm.models.gest.model import Gest

__all__ = ["GenerationResult", "generate_cells"]

Mode = Literal["pick", "weighted", "sample"]


@dataclass
class GenerationResult:
    """What :func:`generate_cells` returns for ``q`` query cells per window.

    Shape:
        - tokens: ``[b, q]`` meta-cell token chosen for each query (fed back as context)
        - expr: ``[b, q, T]`` generated expression (model space) in the requested mode
        - prob: ``[b, q]`` probability of the chosen token
        - hidden: ``[b, q, d]`` hidden state that produced each prediction
    """

    tokens: Tensor
    expr: Tensor
    prob: Tensor
    hidden: Tensor


def _choose(logits: Tensor, mode: Mode, temperature: float, generator: torch.Generator | None) -> Tensor:
    if mode == "sample":
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return logits.argmax(dim=-1)


@torch.no_grad()
def generate_cells(
    model: Gest,
    context_pos: Tensor,
    context_tokens: Tensor,
    query_pos: Tensor,
    *,
    context_mask: Tensor | None = None,
    context_expr: Tensor | None = None,
    mode: Mode = "pick",
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> GenerationResult:
    """Generate the cells at ``query_pos`` one after another, each conditioned on all cells before it.

    Args:
        model: the GeST model (eval mode is the caller's choice).
        context_pos: positions of the known cells (window-normalised), in serialised order.
        context_tokens: their meta-cell tokens.
        query_pos: positions to generate, in generation order.
        context_mask: True at real context cells; padding must be on the left (None: all real).
        context_expr: expression fed for the context cells instead of their meta-cell profiles (the continuous
            perturbation mode).
        mode: ``pick``, ``weighted`` or ``sample``.
        temperature: softmax temperature for ``sample``.
        generator: random generator for ``sample``.
        use_cache: reuse keys/values of earlier cells (False recomputes the whole sequence every step; same result,
            used to test the cache and to measure its speed-up).

    Returns:
        The generated tokens, expression, token probabilities and hidden states.

    Raises:
        ValueError: without any context cell (the first query would have nothing to attend from) or with bad
            shapes.

    Shape:
        - context_pos: ``[b, m, 2]``; context_tokens, context_mask: ``[b, m]``; context_expr: ``[b, m, T]``
        - query_pos: ``[b, q, 2]``
    """
    b, m = context_tokens.shape
    q = query_pos.shape[1]
    if m < 1:
        msg = "generate_cells needs at least one known context cell per window; got m=0."
        raise ValueError(msg)
    if temperature <= 0:
        msg = f"temperature must be > 0; got {temperature}."
        raise ValueError(msg)
    if mode not in ("pick", "weighted", "sample"):
        msg = f"mode must be 'pick', 'weighted' or 'sample'; got {mode!r}."
        raise ValueError(msg)
    if context_mask is not None and bool((~context_mask[:, -1]).any()):
        msg = "context_mask must be left-padded: the last context cell of every window must be real."
        raise ValueError(msg)
    device = context_pos.device
    table = model.metacell_expr
    tokens_out = torch.empty(b, q, dtype=torch.long, device=device)
    prob_out = torch.empty(b, q, device=device)
    expr_out = torch.empty(b, q, table.shape[1], device=device)
    hidden_out = torch.empty(b, q, model.config.dim, device=device)
    if q == 0:
        return GenerationResult(tokens_out, expr_out, prob_out, hidden_out)

    def record(step: int, out_logits: Tensor, out_hidden: Tensor) -> Tensor:
        choice = _choose(out_logits, mode, temperature, generator)
        probs = torch.softmax(out_logits.float(), dim=-1)
        tokens_out[:, step] = choice
        prob_out[:, step] = probs.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
        expr_out[:, step] = probs @ table.float() if mode == "weighted" else table[choice].float()
        hidden_out[:, step] = out_hidden.float()
        return choice

    ones = torch.ones(b, 1, dtype=torch.bool, device=device)
    mask = context_mask if context_mask is not None else torch.ones(b, m, dtype=torch.bool, device=device)
    if use_cache:
        cache = model.new_cache()
        # Prefill: context row i is paired with the position of cell i + 1 (the next context cell, or query 0).
        pairs = torch.cat([context_pos[:, 1:], query_pos[:, :1]], dim=1)
        # Heads only on the rows that predict something new (the prefill's last row, each step's row).
        out = model(
            pairs, context_pos, context_tokens, content_expr=context_expr, mask=mask, cache=cache, heads=False
        )
        last = out.hidden[:, -1]
        choice = record(0, model.decode(last)[1], last)
        for step in range(1, q):
            mask = torch.cat([mask, ones], dim=1)
            out = model(
                query_pos[:, step : step + 1],
                query_pos[:, step - 1 : step],
                choice.unsqueeze(1),
                mask=mask,
                cache=cache,
            )
            choice = record(step, out.logits[:, -1], out.hidden[:, -1])
        return GenerationResult(tokens_out, expr_out, prob_out, hidden_out)

    all_pos, all_tokens = context_pos, context_tokens
    all_expr = context_expr
    for step in range(q):
        pairs = torch.cat([all_pos[:, 1:], query_pos[:, step : step + 1]], dim=1)
        out = model(pairs, all_pos, all_tokens, content_expr=all_expr, mask=mask, heads=False)
        last = out.hidden[:, -1]
        choice = record(step, model.decode(last)[1], last)
        all_pos = torch.cat([all_pos, query_pos[:, step : step + 1]], dim=1)
        all_tokens = torch.cat([all_tokens, choice.unsqueeze(1)], dim=1)
        if all_expr is not None:
            all_expr = torch.cat([all_expr, table[choice].unsqueeze(1).to(all_expr)], dim=1)
        mask = torch.cat([mask, ones], dim=1)
    return GenerationResult(tokens_out, expr_out, prob_out, hidden_out)
