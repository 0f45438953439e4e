"""GeST: a decoder that predicts the meta-cell of a cell at a given position from the cells before it.

A serialised window ``x_1..x_N`` becomes two blocks of ``L = N - 1`` tokens (paper Eq. 5, Fig. 2a):

* the **position-query block** ``[s(x_2), ..., s(x_N)]``: the 2-D sin/cos encoding of where the next cell is;
* the **content block** ``[g(x_1)+s(x_1), ..., g(x_{N-1})+s(x_{N-1})]``: a cell's meta-cell expression profile,
  projected to ``d``, plus its position.

Position token ``i`` attends only to itself; content token ``i`` attends to position token ``i`` and to content
tokens ``1..i``. The output at content row ``i`` is decoded into the prediction of ``g(x_{i+1})``: every cell is
predicted from all earlier cells and its own position, and all ``L`` predictions train in parallel.

Two consequences shape this implementation:

* A position token that attends only to itself has attention weight 1 on its own value, so its attention output is
  ``W_o V_p``: the position stream needs no queries or attention matrix at all. Only its keys and values are read,
  by the paired content token. :func:`spatial_attention_mask` builds the full ``2L x 2L`` mask of the paper, and
  the tests prove that this two-stream computation equals masked attention over the concatenated sequence.
* Later content tokens never attend to earlier position tokens, so a KV cache needs the content keys/values only;
  a generation step feeds one (position, content) pair.

Nothing depends on the index of a token in the sequence (positions are coordinates), so a left-padded batch with
a key mask computes exactly what each window computes alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msfm.models.gest.config import GestConfig
from msfm.nn.attention import KVCache

__all__ = [
    "Gest",
    "GestBlock",
    "GestNicheClassifier",
    "GestOutput",
    "sincos_2d",
    "spatial_attention_mask",
]


def sincos_2d(xy: Tensor, dim: int, *, resolution: float = 100.0, temperature: float = 10000.0) -> Tensor:
    """Continuous 2-D sine/cosine position encoding (ViT style, not grid-binned).

    ``d/2`` channels encode x and ``d/2`` encode y, each as ``d/4`` sines and ``d/4`` cosines of
    ``resolution * u / temperature^(k / (d/4))``.

    Args:
        xy: window-normalised coordinates (a window spans [-0.5, 0.5]).
        dim: output width, a multiple of 4.
        resolution: scale applied to the coordinates before the sine/cosine.
        temperature: base of the frequency ladder.

    Returns:
        The encoding, in the dtype of ``xy`` (computed in float32).

    Shape:
        - xy: ``[..., 2]``
        - returns: ``[..., dim]``
    """
    if dim % 4 != 0:
        msg = f"sincos_2d needs dim divisible by 4; got {dim}."
        raise ValueError(msg)
    quarter = dim // 4
    omega = temperature ** (-torch.arange(quarter, device=xy.device, dtype=torch.float32) / quarter)
    u = xy.float() * resolution
    ax = u[..., 0:1] * omega
    ay = u[..., 1:2] * omega
    return torch.cat([ax.sin(), ax.cos(), ay.sin(), ay.cos()], dim=-1).to(xy.dtype)


def spatial_attention_mask(length: int, *, device: torch.device | None = None) -> Tensor:
    """The paper's Eq. 5 mask over ``[position block; content block]`` (True = may attend).

    Rows ``0..L-1`` (position tokens) see only themselves; row ``L+i`` (content token ``i``) sees column ``i``
    (its position query) and columns ``L..L+i`` (contents ``0..i``).

    Args:
        length: L, tokens per block.
        device: device of the mask.

    Returns:
        Boolean mask.

    Shape:
        - returns: ``[2L, 2L]``
    """
    eye = torch.eye(length, dtype=torch.bool, device=device)
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    top = torch.cat([eye, torch.zeros_like(eye)], dim=1)
    bottom = torch.cat([eye, causal], dim=1)
    return torch.cat([top, bottom], dim=0)


@dataclass
class GestOutput:
    """Outputs of one forward pass over ``n`` content rows.

    Shape:
        - hidden: ``[b, n, d]`` final hidden state of each content row (after the last RMSNorm); the last row of a
          niche sequence is the niche embedding
        - expr: ``[b, n, T]`` the head's gene-space output ``y_hat`` (None with ``heads=False``)
        - logits: ``[b, n, K]`` meta-cell logits ``y_hat @ C_expr^T`` (None with ``heads=False``)
    """

    hidden: Tensor
    expr: Tensor | None
    logits: Tensor | None


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, hidden)
        self.proj = nn.Linear(hidden, out)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class SpatialAttention(nn.Module):
    """Multi-head attention of the two GeST streams under the Eq. 5 mask.

    Shape:
        - pos, content: ``[b, n, d]`` (row ``i`` of ``pos`` is the query position paired with content ``i``)
        - key_mask: ``[b, n_past + n]`` bool, True at real content keys (None: all real)
        - returns: two ``[b, n, d]`` tensors (position stream, content stream)
    """

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        pos: Tensor,
        content: Tensor,
        *,
        key_mask: Tensor | None = None,
        cache: KVCache | None = None,
        layer_idx: int = 0,
    ) -> tuple[Tensor, Tensor]:
        b, n, d = content.shape
        _w_q, w_k, w_v = self.qkv.weight.split(d)
        _b_q, b_k, b_v = self.qkv.bias.split(d)
        # Position tokens attend only to themselves: their output is their own value (weight 1).
        k_p = self._heads(F.linear(pos, w_k, b_k))
        v_p_flat = F.linear(pos, w_v, b_v)
        v_p = self._heads(v_p_flat)
        q_c, k_c, v_c = (
            F.linear(content, self.qkv.weight, self.qkv.bias)
            .view(b, n, 3, self.num_heads, self.head_dim)
            .permute(2, 0, 3, 1, 4)
            .unbind(0)
        )
        if cache is not None:
            k_c, v_c = cache.update(layer_idx, k_c, v_c)
        n_keys = k_c.shape[-2]
        n_past = n_keys - n
        keys = torch.cat([k_p, k_c], dim=-2)
        values = torch.cat([v_p, v_c], dim=-2)
        # Row i: its own position key (column i) and contents up to n_past + i (bottom-right aligned causal).
        own = torch.eye(n, dtype=torch.bool, device=content.device)
        causal = torch.ones(n, n_keys, dtype=torch.bool, device=content.device).tril(diagonal=n_past)
        allowed = torch.cat([own, causal], dim=1).view(1, 1, n, n + n_keys)
        if key_mask is not None:
            if key_mask.shape != (b, n_keys):
                msg = f"key_mask must be [b, n_past + n] = [{b}, {n_keys}]; got {tuple(key_mask.shape)}."
                raise ValueError(msg)
            real = torch.cat([torch.ones(b, n, dtype=torch.bool, device=content.device), key_mask], dim=1)
            allowed = allowed & real.view(b, 1, 1, n + n_keys)
        out_c = F.scaled_dot_product_attention(
            q_c, keys, values, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0
        )
        out_c = self.out_proj(out_c.transpose(1, 2).reshape(b, n, d))
        out_p = self.out_proj(v_p_flat)
        return out_p, out_c


class GestBlock(nn.Module):
    """Pre-norm block applied to both streams: ``x + attn(rms(x))`` then ``x + mlp(rms(x))``."""

    def __init__(self, config: GestConfig) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.attn = SpatialAttention(config.dim, config.num_heads, config.dropout)
        self.norm2 = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.mlp = _MLP(config.dim, config.mlp_ratio * config.dim, config.dim, config.dropout)
        self.drop = nn.Dropout(config.dropout)

    def forward(
        self,
        pos: Tensor,
        content: Tensor,
        *,
        key_mask: Tensor | None = None,
        cache: KVCache | None = None,
        layer_idx: int = 0,
    ) -> tuple[Tensor, Tensor]:
        a_p, a_c = self.attn(
            self.norm1(pos), self.norm1(content), key_mask=key_mask, cache=cache, layer_idx=layer_idx
        )
        pos = pos + self.drop(a_p)
        content = content + self.drop(a_c)
        pos = pos + self.mlp(self.norm2(pos))
        content = content + self.mlp(self.norm2(content))
        return pos, content


class Gest(nn.Module):
    """The GeST decoder with its meta-cell table.

    Buffers ``metacell_expr`` (``C_expr``, ``[K, T]``) and ``hierarchy`` (``[n_levels, K]``) come from the
    :class:`msfm.tokenizers.spatial.MetaCellVocab` the model was trained with (:meth:`set_vocabulary`).

    Args:
        config: the network configuration.
    """

    def __init__(self, config: GestConfig) -> None:
        super().__init__()
        self.config = config
        k, t = config.n_metacells, config.n_genes
        self.register_buffer("metacell_expr", torch.zeros(k, t))
        hierarchy = torch.zeros(config.n_levels, k, dtype=torch.long)
        hierarchy[0] = torch.arange(k)
        self.register_buffer("hierarchy", hierarchy)
        self.content_in = nn.Linear(t, config.dim)
        self.blocks = nn.ModuleList(GestBlock(config) for _ in range(config.depth))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.head = _MLP(config.dim, config.head_hidden or config.dim, t, 0.0)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, 0.02) weights, zero biases, residual projections scaled by 1/sqrt(2 depth)."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02
                if name.endswith(("attn.out_proj.weight", "mlp.proj.weight")):
                    std = 0.02 / math.sqrt(2 * max(self.config.depth, 1))
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def set_vocabulary(self, metacell_expr: Tensor, hierarchy: Tensor) -> None:
        """Install the meta-cell expression table and hierarchy labels.

        Shape:
            - metacell_expr: ``[K, T]``
            - hierarchy: ``[n_levels, K]`` (row 0 is ``arange(K)``)
        """
        c = self.config
        if tuple(metacell_expr.shape) != (c.n_metacells, c.n_genes):
            msg = f"metacell_expr must be [K, T] = [{c.n_metacells}, {c.n_genes}]; got {tuple(metacell_expr.shape)}."
            raise ValueError(msg)
        if tuple(hierarchy.shape) != (c.n_levels, c.n_metacells):
            msg = f"hierarchy must be [n_levels, K] = [{c.n_levels}, {c.n_metacells}]; got {tuple(hierarchy.shape)}."
            raise ValueError(msg)
        for level, size in enumerate(c.level_sizes):
            row = hierarchy[level]
            if int(row.min()) < 0 or int(row.max()) >= size:
                msg = f"hierarchy level {level} labels must lie in [0, {size}); got {int(row.min())}..{int(row.max())}."
                raise ValueError(msg)
        self.metacell_expr.copy_(metacell_expr.to(self.metacell_expr))
        self.hierarchy.copy_(hierarchy.to(self.hierarchy))

    def new_cache(self) -> KVCache:
        """An empty KV cache for incremental generation (content keys/values only)."""
        return KVCache(max(self.config.depth, 1))

    def encode_positions(self, xy: Tensor) -> Tensor:
        """Position tokens ``s(x)`` of window-normalised coordinates.

        Shape:
            - xy: ``[..., 2]``
            - returns: ``[..., d]``
        """
        c = self.config
        if c.position_encoding == "constant":
            return xy.new_ones((*xy.shape[:-1], c.dim))
        return sincos_2d(xy, c.dim, resolution=c.pe_resolution, temperature=c.pe_temperature)

    def content_profiles(self, tokens: Tensor) -> Tensor:
        """Meta-cell expression profiles ``C_expr[token]`` (the model input of a quantised cell).

        Shape:
            - tokens: ``[...]`` long
            - returns: ``[..., T]``
        """
        return self.metacell_expr[tokens]

    def forward(
        self,
        query_pos: Tensor,
        content_pos: Tensor,
        tokens: Tensor | None,
        *,
        content_expr: Tensor | None = None,
        mask: Tensor | None = None,
        cache: KVCache | None = None,
        heads: bool = True,
    ) -> GestOutput:
        """Run the decoder over ``n`` new (query position, content) pairs.

        Args:
            query_pos: where the cell predicted by each row sits (window-normalised).
            content_pos: position of each content cell.
            tokens: meta-cell token of each content cell (ignored where ``content_expr`` is given).
            content_expr: expression profiles fed instead of ``C_expr[tokens]`` (the continuous perturbation
                mode; model space, ``[b, n, T]``).
            mask: True at real content cells, over cached and new rows. None: all real; right padding also needs
                none (a real row never sees a later row).
            cache: KV cache; new rows are appended and attend to everything cached.
            heads: compute ``expr`` and ``logits`` (False: hidden states only).

        Returns:
            :class:`GestOutput` for the new rows.

        Shape:
            - query_pos, content_pos: ``[b, n, 2]``
            - tokens: ``[b, n]`` long
            - content_expr: ``[b, n, T]``
            - mask: ``[b, n_past + n]`` bool
        """
        if content_expr is None:
            if tokens is None:
                msg = "Gest.forward needs tokens or content_expr."
                raise ValueError(msg)
            content_expr = self.content_profiles(tokens)
        if query_pos.shape != content_pos.shape or query_pos.shape[:2] != content_expr.shape[:2]:
            msg = (
                f"query_pos {tuple(query_pos.shape)}, content_pos {tuple(content_pos.shape)} and content "
                f"{tuple(content_expr.shape)} must agree on [b, n]."
            )
            raise ValueError(msg)
        dtype = self.content_in.weight.dtype
        pos = self.encode_positions(query_pos).to(dtype)
        content = self.content_in(content_expr.to(dtype)) + self.encode_positions(content_pos).to(dtype)
        for i, block in enumerate(self.blocks):
            pos, content = block(pos, content, key_mask=mask, cache=cache, layer_idx=i)
        hidden = self.norm(content)
        if not heads:
            return GestOutput(hidden=hidden, expr=None, logits=None)
        expr, logits = self.decode(hidden)
        return GestOutput(hidden=hidden, expr=expr, logits=logits)

    def decode(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """Gene-space output and meta-cell logits of final hidden states.

        Shape:
            - hidden: ``[..., d]``
            - returns: ``[..., T]`` and ``[..., K]``
        """
        expr = self.head(hidden)
        logits = expr @ self.metacell_expr.to(expr.dtype).T
        return expr, logits


class GestNicheClassifier(nn.Module):
    """Fine-tuned niche annotation: mean-pool the content rows of a niche sequence, then a linear layer.

    The whole backbone stays trainable (paper Fig. 2d).

    Args:
        backbone: a :class:`Gest` model.
        n_classes: number of niche labels.
        dropout: dropout before the linear layer.

    Shape:
        - inputs as :meth:`Gest.forward` (``[b, n, ...]``, ``mask`` ``[b, n]`` True = real)
        - returns: ``[b, n_classes]`` logits
    """

    def __init__(self, backbone: Gest, n_classes: int, *, dropout: float = 0.1) -> None:
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(backbone.config.dim, n_classes)

    def forward(
        self, query_pos: Tensor, content_pos: Tensor, tokens: Tensor, *, mask: Tensor | None = None
    ) -> Tensor:
        hidden = self.backbone(query_pos, content_pos, tokens, mask=mask, heads=False).hidden
        if mask is None:
            pooled = hidden.mean(dim=1)
        else:
            w = mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
        return self.classifier(self.dropout(pooled))
