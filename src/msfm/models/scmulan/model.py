"""scMulan: a GPT over cell sentences of (entity, expression level) words.

Every word is the sum of an entity embedding (gene, metadata value or task token) and an embedding of its
expression level (1..10 for genes, 0 otherwise). There is **no position embedding**: a cell is a set of
words read left to right under a causal mask. Two untied heads read the final hidden states: entity logits
over the vocabulary and one expression value per vocabulary entry.

Because nothing depends on absolute positions, a left-padded batch with a key-padding mask computes exactly
what each sentence computes alone; batched decoding with a KV cache relies on this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msfm.models.scmulan.config import ScMulanConfig
from msfm.nn.attention import KVCache, MultiheadSelfAttention

__all__ = ["ScMulan", "ScMulanOutput"]

Heads = Literal["all", "last", "none"]


@dataclass
class ScMulanOutput:
    """Outputs of one forward pass.

    Shape:
        - logits: ``[b, n_out, V]`` entity logits (``n_out`` = n, 1 or 0 depending on ``heads``)
        - expression: ``[b, n_out, V]`` expression value of every vocabulary entry
        - hidden: ``[b, n, d]`` final hidden states (after the last LayerNorm)
    """

    logits: Tensor | None
    expression: Tensor | None
    hidden: Tensor


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, hidden, bias=False)
        self.proj = nn.Linear(hidden, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class ScMulanBlock(nn.Module):
    """Pre-LN block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``; no biases anywhere."""

    def __init__(self, config: ScMulanConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim, eps=config.norm_eps, bias=False)
        self.attn = MultiheadSelfAttention(config.dim, config.num_heads, dropout=config.dropout, bias=False)
        self.norm2 = nn.LayerNorm(config.dim, eps=config.norm_eps, bias=False)
        self.mlp = _MLP(config.dim, config.mlp_ratio * config.dim, config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: Tensor, *, key_padding_mask: Tensor | None, cache: KVCache | None, layer_idx: int
    ) -> Tensor:
        """Shape: x ``[b, n, d]``; key_padding_mask ``[b, n_past + n]`` (True = padding)."""
        h = self.attn(
            self.norm1(x),
            key_padding_mask=key_padding_mask,
            is_causal=True,
            kv_cache=cache,
            layer_idx=layer_idx,
        )
        x = x + self.resid_dropout(h)
        return x + self.mlp(self.norm2(x))


class ScMulan(nn.Module):
    """The scMulan decoder-only transformer.

    Args:
        config: network sizes; defaults are the released 368.8M model.

    Example:
        >>> from msfm.models.scmulan import ScMulan, ScMulanConfig
        >>> model = ScMulan(ScMulanConfig(dim=32, depth=1, num_heads=2)).eval()
        >>> out = model(torch.tensor([[5, 9, 2206]]), torch.tensor([[3, 10, 0]]), heads="last")
        >>> out.logits.shape
        torch.Size([1, 1, 2222])
    """

    def __init__(self, config: ScMulanConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embed = nn.Embedding(config.vocab_size, config.dim)
        self.level_embed = nn.Embedding(config.num_level_embeddings, config.dim)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(ScMulanBlock(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim, eps=config.norm_eps, bias=False)
        self.entity_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.expression_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation (N(0, 0.02); residual projections scaled by ``1/sqrt(2 * depth)``)."""
        std = 0.02
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, MultiheadSelfAttention):
                nn.init.normal_(module.in_proj_weight, mean=0.0, std=std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
        residual_std = std / math.sqrt(2 * max(self.config.depth, 1))
        for block in self.blocks:
            nn.init.normal_(block.attn.out_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=residual_std)

    def num_parameters(self) -> int:
        """Number of parameters (368,800,320 for the released size)."""
        return sum(p.numel() for p in self.parameters())

    def new_cache(self) -> KVCache:
        """An empty KV cache for incremental decoding."""
        return KVCache(num_layers=max(len(self.blocks), 1))

    def forward(
        self,
        ids: Tensor,
        levels: Tensor,
        *,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
        heads: Heads = "all",
    ) -> ScMulanOutput:
        """Run the network over new words (after the cached ones, if a cache is given).

        Args:
            ids: entity token ids of the new words.
            levels: expression levels of the new words (0..n_levels).
            attention_mask: True at real words, False at padding, covering the cached words and the new ones.
                ``None`` = no padding. Left padding is the layout for decoding.
            cache: KV cache; the new keys/values are appended.
            heads: apply the entity/expression heads at every position, at the last one, or not at all.

        Returns:
            Logits, expression values and hidden states (see :class:`ScMulanOutput`).

        Shape:
            - ids, levels: ``[b, n]``
            - attention_mask: ``[b, n_past + n]``
        """
        if ids.shape != levels.shape:
            msg = (
                f"ids and levels must have the same shape, got {tuple(ids.shape)} and {tuple(levels.shape)}."
            )
            raise ValueError(msg)
        key_padding_mask = None if attention_mask is None else ~attention_mask.to(torch.bool)
        x = self.embed_dropout(self.token_embed(ids) + self.level_embed(levels))
        for i, block in enumerate(self.blocks):
            x = block(x, key_padding_mask=key_padding_mask, cache=cache, layer_idx=i)
        hidden = self.norm(x)
        if heads == "none":
            return ScMulanOutput(None, None, hidden)
        h = hidden[:, -1:] if heads == "last" else hidden
        return ScMulanOutput(self.entity_head(h), self.expression_head(h), hidden)
