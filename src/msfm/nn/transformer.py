"""Transformer encoder layers on :class:`msfm.nn.attention.MultiheadSelfAttention`.

Submodule names (``self_attn``, ``linear1``, ``linear2``, ``norm1``, ``norm2``) follow
``torch.nn.TransformerEncoderLayer``, so state dicts move between the two without renaming. Unlike the
torch layer there is no nested-tensor fast path: outputs at padded positions are computed like any
other position (finite, but meaningless) and must be ignored by the caller.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from msfm.nn.attention import KVCache, MultiheadSelfAttention

__all__ = ["TransformerEncoder", "TransformerEncoderLayer"]

Activation = Literal["relu", "gelu"]

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


class TransformerEncoderLayer(nn.Module):
    """Self-attention block plus feed-forward block, post-LN (default) or pre-LN.

    Args:
        dim: model dimension ``d``.
        num_heads: attention heads.
        mlp_dim: hidden size of the feed-forward block.
        dropout: dropout on attention probabilities, after attention, inside and after the FFN
            (the placement of ``torch.nn.TransformerEncoderLayer``).
        activation: FFN non-linearity.
        norm_first: pre-LN if True, post-LN (the original Transformer and scFoundation) if False.
        layer_norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        dropout: float = 0.1,
        *,
        activation: Activation = "relu",
        norm_first: bool = False,
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            msg = f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}."
            raise ValueError(msg)
        self.self_attn = MultiheadSelfAttention(dim, num_heads, dropout=dropout)
        self.linear1 = nn.Linear(dim, mlp_dim)
        self.linear2 = nn.Linear(mlp_dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = activation
        self.norm_first = norm_first

    def _attention(self, x: Tensor, **attn_kwargs: object) -> Tensor:
        return self.dropout1(self.self_attn(x, **attn_kwargs))  # type: ignore[arg-type]

    def _feed_forward(self, x: Tensor) -> Tensor:
        hidden = self.dropout(_ACTIVATIONS[self.activation](self.linear1(x)))
        return self.dropout2(self.linear2(hidden))

    def forward(
        self,
        x: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        kv_cache: KVCache | None = None,
        layer_idx: int = 0,
    ) -> Tensor:
        """Apply the layer.

        Args:
            x: input tokens.
            key_padding_mask: bool, True at padding.
            attn_mask: bool (True = not allowed) or additive float mask.
            is_causal: causal self-attention.
            kv_cache: optional cache for incremental decoding.
            layer_idx: this layer's entry in ``kv_cache``.

        Returns:
            Updated tokens.

        Shape:
            - x: ``[b, n, d]``
            - key_padding_mask: ``[b, n_k]``
            - returns: ``[b, n, d]``
        """
        attn_kwargs = {
            "key_padding_mask": key_padding_mask,
            "attn_mask": attn_mask,
            "is_causal": is_causal,
            "kv_cache": kv_cache,
            "layer_idx": layer_idx,
        }
        if self.norm_first:
            x = x + self._attention(self.norm1(x), **attn_kwargs)
            return x + self._feed_forward(self.norm2(x))
        x = self.norm1(x + self._attention(x, **attn_kwargs))
        return self.norm2(x + self._feed_forward(x))

    def forward_packed(self, x: Tensor, seq_lens: list[int]) -> Tensor:
        """Apply the layer to sequences packed end to end (see ``MultiheadSelfAttention.forward_packed``).

        Shape:
            - x: ``[N, d]`` (``N = sum(seq_lens)``)
            - returns: ``[N, d]``
        """
        if self.norm_first:
            x = x + self.dropout1(self.self_attn.forward_packed(self.norm1(x), seq_lens))
            return x + self._feed_forward(self.norm2(x))
        x = self.norm1(x + self.dropout1(self.self_attn.forward_packed(x, seq_lens)))
        return self.norm2(x + self._feed_forward(x))


class TransformerEncoder(nn.Module):
    """A stack of :class:`TransformerEncoderLayer` followed by an optional final LayerNorm.

    Args:
        dim: model dimension ``d``.
        depth: number of layers.
        num_heads: attention heads per layer.
        mlp_dim: feed-forward hidden size.
        dropout: dropout of every layer.
        activation: FFN non-linearity.
        norm_first: pre-LN layers if True.
        final_norm: add a LayerNorm after the last layer (submodule ``norm``).
        layer_norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        dropout: float = 0.1,
        *,
        activation: Activation = "relu",
        norm_first: bool = False,
        final_norm: bool = True,
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(
                dim,
                num_heads,
                mlp_dim,
                dropout,
                activation=activation,
                norm_first=norm_first,
                layer_norm_eps=layer_norm_eps,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=layer_norm_eps) if final_norm else None

    def forward(
        self,
        x: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        """Run every layer, then the final norm.

        Args:
            x: input tokens.
            key_padding_mask: bool, True at padding.
            attn_mask: bool (True = not allowed) or additive float mask.
            is_causal: causal self-attention.
            kv_cache: optional cache with one entry per layer.

        Returns:
            Encoded tokens.

        Shape:
            - x: ``[b, n, d]``
            - key_padding_mask: ``[b, n_k]``
            - returns: ``[b, n, d]``
        """
        for idx, layer in enumerate(self.layers):
            x = layer(
                x,
                key_padding_mask=key_padding_mask,
                attn_mask=attn_mask,
                is_causal=is_causal,
                kv_cache=kv_cache,
                layer_idx=idx,
            )
        return x if self.norm is None else self.norm(x)

    def forward_packed(self, x: Tensor, seq_lens: list[int]) -> Tensor:
        """Run every layer on packed sequences, then the final norm.

        Shape:
            - x: ``[N, d]`` (``N = sum(seq_lens)``)
            - returns: ``[N, d]``
        """
        for layer in self.layers:
            x = layer.forward_packed(x, seq_lens)
        return self.norm(x) if self.norm is not None else x
