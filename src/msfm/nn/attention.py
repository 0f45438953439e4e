"""Multi-head self-attention on ``torch.nn.functional.scaled_dot_product_attention``.

The parameter layout (``in_proj_weight``, ``in_proj_bias``, ``out_proj``) is the one of
``torch.nn.MultiheadAttention``, so weights of torch encoder layers (and of the official scFoundation
encoder, which is built from them) load without renaming.

Mask convention used everywhere in ``msfm.nn``: a **boolean** mask marks what is *removed*
(``True`` = padding / not allowed), like ``key_padding_mask`` and boolean ``attn_mask`` in
``torch.nn.MultiheadAttention``. A floating-point ``attn_mask`` is added to the attention logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["KVCache", "MultiheadSelfAttention"]


class KVCache:
    """Keys and values of earlier decoding steps, one entry per layer.

    Used for incremental (GPT-style) decoding: each attention layer appends the keys and values of
    the new tokens and attends over everything stored so far.

    Args:
        num_layers: number of attention layers that share this cache.

    Example:
        >>> cache = KVCache(num_layers=2)
        >>> k, v = cache.update(0, torch.zeros(1, 4, 3, 8), torch.zeros(1, 4, 3, 8))
        >>> cache.length(0)
        3
    """

    def __init__(self, num_layers: int) -> None:
        if num_layers < 1:
            msg = f"KVCache needs num_layers >= 1, got {num_layers}."
            raise ValueError(msg)
        # Buffers grow geometrically and are written in place: appending one position per decoding step then
        # costs O(1) amortised copies instead of re-concatenating the whole history every step (O(n^2)).
        self._keys: list[Tensor | None] = [None] * num_layers
        self._values: list[Tensor | None] = [None] * num_layers
        self._lengths: list[int] = [0] * num_layers

    @property
    def num_layers(self) -> int:
        """Number of layers the cache holds entries for."""
        return len(self._keys)

    @property
    def keys(self) -> list[Tensor | None]:
        """Cached keys of every layer (``[b, h, n_cached, d_head]`` views), None before the first update."""
        return [None if k is None else k[..., :n, :] for k, n in zip(self._keys, self._lengths, strict=True)]

    @property
    def values(self) -> list[Tensor | None]:
        """Cached values of every layer, like :attr:`keys`."""
        return [
            None if v is None else v[..., :n, :] for v, n in zip(self._values, self._lengths, strict=True)
        ]

    def length(self, layer_idx: int) -> int:
        """Number of cached positions of one layer (0 before the first update)."""
        return self._lengths[layer_idx]

    def update(self, layer_idx: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Append new keys/values of one layer and return the full cached keys/values.

        Args:
            layer_idx: index of the attention layer.
            keys: keys of the new positions.
            values: values of the new positions.

        Returns:
            All keys and all values of this layer, old positions first (views into the cache buffers).

        Shape:
            - keys, values: ``[b, h, n_new, d_head]``
            - returns: two tensors ``[b, h, n_past + n_new, d_head]``
        """
        n_old = self._lengths[layer_idx]
        n_new = n_old + keys.shape[-2]
        buf_k, buf_v = self._keys[layer_idx], self._values[layer_idx]
        if buf_k is None or buf_v is None or buf_k.shape[-2] < n_new:
            capacity = max(n_new, 2 * (0 if buf_k is None else buf_k.shape[-2]), 16)
            shape = (*keys.shape[:-2], capacity, keys.shape[-1])
            new_k = keys.new_empty(shape)
            new_v = values.new_empty((*values.shape[:-2], capacity, values.shape[-1]))
            if buf_k is not None and buf_v is not None and n_old:
                new_k[..., :n_old, :] = buf_k[..., :n_old, :]
                new_v[..., :n_old, :] = buf_v[..., :n_old, :]
            self._keys[layer_idx], self._values[layer_idx] = new_k, new_v
            buf_k, buf_v = new_k, new_v
        buf_k[..., n_old:n_new, :] = keys
        buf_v[..., n_old:n_new, :] = values
        self._lengths[layer_idx] = n_new
        return buf_k[..., :n_new, :], buf_v[..., :n_new, :]

    def reset(self) -> None:
        """Drop every cached entry."""
        self._keys = [None] * self.num_layers
        self._values = [None] * self.num_layers
        self._lengths = [0] * self.num_layers


def _allowed_mask(
    *,
    batch: int,
    num_queries: int,
    num_keys: int,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    is_causal: bool,
    device: torch.device,
) -> Tensor | None:
    """Combine padding, boolean and causal masks into one boolean ``allowed`` mask (True = attend).

    Float ``attn_mask`` is handled by the caller. Returns ``None`` when nothing is masked, so that SDPA
    can use its unmasked fast kernels.

    Shape:
        - key_padding_mask: ``[b, n_k]``
        - attn_mask: ``[n_q, n_k]``, ``[b, n_q, n_k]`` or ``[b, h, n_q, n_k]`` (bool, True = removed)
        - returns: broadcastable to ``[b, h, n_q, n_k]``
    """
    allowed: Tensor | None = None
    if key_padding_mask is not None:
        allowed = ~key_padding_mask.view(batch, 1, 1, num_keys)
    if attn_mask is not None:
        extra = ~attn_mask
        if extra.dim() == 3:
            extra = extra.unsqueeze(1)
        allowed = extra if allowed is None else allowed & extra
    if is_causal:
        # Bottom-right aligned: with a KV cache the new queries sit at the end of the key sequence,
        # so query i may see keys up to (num_keys - num_queries + i).
        offset = num_keys - num_queries
        causal = torch.ones(num_queries, num_keys, dtype=torch.bool, device=device).tril(diagonal=offset)
        allowed = causal if allowed is None else allowed & causal
    return allowed


class MultiheadSelfAttention(nn.Module):
    """Multi-head self-attention with key padding, causal/explicit masks and an optional KV cache.

    State-dict compatible with ``torch.nn.MultiheadAttention(dim, num_heads, batch_first=True)``.

    A query row whose keys are all masked (an all-padding sequence, or left padding under a causal
    mask) has no defined softmax; such rows return exactly zero instead of NaN, independently of the
    SDPA backend.

    Args:
        dim: model dimension ``d``.
        num_heads: number of heads ``h``; must divide ``dim``.
        dropout: attention-probability dropout, active in training mode only.
        bias: whether the input and output projections have a bias.
    """

    def __init__(self, dim: int, num_heads: int, *, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            msg = f"dim ({dim}) must be divisible by num_heads ({num_heads})."
            raise ValueError(msg)
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim)) if bias else None
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise like ``torch.nn.MultiheadAttention`` (Xavier input projection, zero biases)."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)

    def forward_packed(self, x: Tensor, seq_lens: list[int]) -> Tensor:
        """Self-attention over several sequences packed end to end, without padding.

        The projections run once over all tokens (one large matmul, no compute spent on padding); only the
        attention itself runs per sequence. This is the fast path for variable-length inputs on CPU, where
        padded batches waste compute and masked attention falls back to slower kernels.

        Args:
            x: tokens of all sequences, concatenated.
            seq_lens: length of each sequence (sums to ``N``).

        Returns:
            Attention output after ``out_proj``.

        Shape:
            - x: ``[N, d]``
            - returns: ``[N, d]``
        """
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        # [1, h, N, dh]: SDPA gets 4-D inputs (a batch of one) on purpose. On CPU, 3-D inputs always take the
        # unfused math kernel; 4-D ones let torch pick its fused flash kernel (about 6x faster per cell in bf16
        # on AMX hardware, the same result up to rounding).
        q, k, v = qkv.view(1, -1, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        p = self.dropout if self.training else 0.0
        outs = []
        start = 0
        for n in seq_lens:
            sl = slice(start, start + n)
            outs.append(F.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], dropout_p=p))
            start += n
        out = torch.cat(outs, dim=2)[0].transpose(0, 1).reshape(x.shape[0], -1)
        return self.out_proj(out)

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
        """Attend every position of ``x`` to the (cached and new) positions.

        Args:
            x: input tokens.
            key_padding_mask: bool, True at padded keys. With a KV cache it covers all keys
                (cached + new).
            attn_mask: bool (True = not allowed) or float (added to the logits).
            is_causal: forbid attending to later positions (bottom-right aligned with a cache).
            kv_cache: if given, the new keys/values are appended to it and attention runs over all
                cached positions.
            layer_idx: which entry of ``kv_cache`` belongs to this layer.

        Returns:
            Attention output after ``out_proj``.

        Shape:
            - x: ``[b, n, d]``
            - key_padding_mask: ``[b, n_k]`` (``n_k = n`` without a cache)
            - attn_mask: ``[n, n_k]``, ``[b, n, n_k]`` or ``[b, h, n, n_k]``
            - returns: ``[b, n, d]``
        """
        b, n, _ = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        # [b, n, 3d] -> three [b, h, n, d_head] views without copying more than SDPA needs.
        q, k, v = qkv.view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k, v)
        num_keys = k.shape[-2]

        if is_causal and key_padding_mask is None and attn_mask is None and num_keys == n:
            # Plain causal self-attention: let SDPA build the mask itself, which selects its fused (flash)
            # kernels on CPU and GPU, several times faster than a materialised boolean mask in training.
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
            )
            return self.out_proj(out.transpose(1, 2).reshape(b, n, self.dim))

        float_mask = attn_mask if attn_mask is not None and attn_mask.is_floating_point() else None
        bool_mask = attn_mask if attn_mask is not None and float_mask is None else None
        allowed = _allowed_mask(
            batch=b,
            num_queries=n,
            num_keys=num_keys,
            key_padding_mask=key_padding_mask,
            attn_mask=bool_mask,
            is_causal=is_causal,
            device=x.device,
        )
        sdpa_mask: Tensor | None = None
        empty_rows: Tensor | None = None
        if allowed is not None:
            has_key = allowed.any(dim=-1, keepdim=True)
            # Rows with no allowed key would be NaN in some SDPA kernels: let them attend everywhere
            # (finite) and zero them afterwards.
            empty_rows = ~has_key
            allowed = allowed | empty_rows
            sdpa_mask = allowed
            if float_mask is not None:
                if float_mask.dim() == 3:
                    float_mask = float_mask.unsqueeze(1)
                sdpa_mask = torch.where(allowed, float_mask, float("-inf"))
        elif float_mask is not None:
            sdpa_mask = float_mask
        if sdpa_mask is not None and sdpa_mask.dim() == 3:
            sdpa_mask = sdpa_mask.unsqueeze(1)

        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=sdpa_mask, dropout_p=self.dropout if self.training else 0.0
        )
        if empty_rows is not None:
            out = out.masked_fill(empty_rows, 0.0)
        out = out.transpose(1, 2).reshape(b, n, self.dim)
        return self.out_proj(out)
