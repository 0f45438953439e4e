"""ROAM: a multi-scale ROI pyramid transformer with class-specific gated-attention MIL over ROIs.

Jiang, Yin, Yang et al., *Nat Mach Intell* 6, 876-891 (2024). Re-implemented from the description of the
architecture (the official code is GPL-3.0; none of it is used here). Parameter names are our own;
:mod:`msfm.models.roam.official` maps the released key layout onto them.

Data flow for one slide with ``K`` ROIs, each ``84`` patch features (20x 8x8, 10x 4x4, 5x 2x2)::

    [K, 84, d_in] -> per-scale LayerNorm+Linear -> 20x intra (CLS, abs. pos., rel. bias)
                  -> 20x->10x inter (each 10x token with its 2x2 children) -> 10x intra -> 10x->5x inter
                  -> 5x intra -> ROI embedding = w5*cls5 + w10*cls10 + w20*cls20             [K, dim]
                  -> gated attention (one branch per class), softmax over ROIs               [C, K]
                  -> per-class pooled embedding [C, dim] -> per-class LayerNorm+Linear(dim, 1) -> logits [C]

Saving and loading: :mod:`msfm.models.roam.checkpoint` (``save_model``, ``read_model``) and ``msfm.roam.load``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msfm.models.roam.config import TOKENS_PER_ROI, RoamConfig

__all__ = [
    "DEFAULT_ROI_CHUNK",
    "GatedClassAttention",
    "PyramidEncoder",
    "RelPosAttention",
    "Roam",
    "RoamOutput",
    "ScaleTransformer",
    "children_index",
    "relative_position_index",
]

#: ROIs encoded per pass when no chunk is given (fastest measured at the released size; see ``Roam.encode_rois``).
DEFAULT_ROI_CHUNK = 64


def relative_position_index(w: int) -> Tensor:
    """Index into a ``(2w-1)^2`` bias table for every (query, key) pair of a row-major ``w x w`` grid.

    ``idx[i, j] = (row_i - row_j + w - 1) + (col_i - col_j + w - 1) * (2w - 1)`` (the released convention:
    the row offset is the fast axis).

    Shape:
        returns ``[w*w, w*w]`` int64.
    """
    rows = torch.arange(w).repeat_interleave(w)
    cols = torch.arange(w).repeat(w)
    d_row = rows[:, None] - rows[None, :] + w - 1
    d_col = cols[:, None] - cols[None, :] + w - 1
    return d_row + d_col * (2 * w - 1)


def children_index(w_parent: int) -> Tensor:
    """Row-major indices of the four children (2x2 block of the finer grid) of each parent token.

    Parent ``j = R*w + C`` owns the finer tokens ``(2R+a) * 2w + (2C+b)`` for ``(a, b)`` in
    ``(0,0), (0,1), (1,0), (1,1)``.

    Shape:
        returns ``[w_parent**2, 4]`` int64.
    """
    w_child = 2 * w_parent
    out = torch.empty(w_parent * w_parent, 4, dtype=torch.long)
    for r in range(w_parent):
        for c in range(w_parent):
            out[r * w_parent + c] = torch.tensor(
                [(2 * r + a) * w_child + (2 * c + b) for a in (0, 1) for b in (0, 1)]
            )
    return out


class RelPosAttention(nn.Module):
    """Multi-head self-attention with QK-LayerNorm and an optional relative-position bias on patch pairs.

    The bias (one table of ``(2w-1)^2`` entries, shared by all heads or one per head) is added to the logits of
    patch-patch pairs only; the first token (CLS) gets none. q and k pass through the same ``LayerNorm(dim_head)``
    before the scaled dot product.

    With ``record=True`` the layer runs an explicit softmax, keeps the attention weights in ``self.attn`` and,
    when gradients flow, their gradient with respect to the *pre-softmax* scores in ``self.score_grad`` (what
    the released gradient-weighted rollout multiplies with).

    Args:
        dim: Token width.
        heads: Number of heads.
        dim_head: Width of one head.
        dropout: Dropout on attention weights and on the output projection.
        window: Side ``w`` of the patch grid for the relative bias; None disables the bias (inter-scale blocks).
        shared_bias: One bias table for all heads.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        dropout: float = 0.0,
        *,
        window: int | None = None,
        shared_bias: bool = True,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.window = window
        self.attn_dropout = dropout
        self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.qk_norm = nn.LayerNorm(dim_head)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(dropout)
        if window is not None:
            self.rel_bias = nn.Embedding((2 * window - 1) ** 2, 1 if shared_bias else heads)
            nn.init.trunc_normal_(self.rel_bias.weight, std=0.02)
            # Not persistent: the released checkpoints hold parameters only and load strictly.
            self.register_buffer("rel_index", relative_position_index(window), persistent=False)
        else:
            self.rel_bias = None
        self.record = False
        self.attn: Tensor | None = None
        self.score_grad: Tensor | None = None

    def _bias(self, n_tokens: int, dtype: torch.dtype) -> Tensor | None:
        if self.rel_bias is None:
            return None
        n_patch = self.rel_index.shape[0]
        if n_tokens != n_patch + 1:
            msg = f"RelPosAttention with window {self.window} expects 1 + {n_patch} tokens; got {n_tokens}."
            raise ValueError(msg)
        table = self.rel_bias(self.rel_index)  # [P, P, h or 1]
        bias = table.new_zeros(table.shape[-1], n_tokens, n_tokens)
        bias[:, 1:, 1:] = table.permute(2, 0, 1)
        return bias.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        """Attend over the tokens of each sequence.

        Shape:
            x: ``[N, T, dim]`` -> ``[N, T, dim]``.
        """
        n, t, _ = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        q, k = self.qk_norm(q), self.qk_norm(k)
        bias = self._bias(t, q.dtype)
        p = self.attn_dropout if self.training else 0.0
        if self.record:
            scores = (q @ k.transpose(-1, -2)) * self.dim_head**-0.5
            if bias is not None:
                scores = scores + bias
            if scores.requires_grad:
                scores.register_hook(self._keep_grad)
            attn = scores.softmax(dim=-1)
            self.attn = attn.detach()
            out = F.dropout(attn, p, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
        out = out.transpose(1, 2).reshape(n, t, self.heads * self.dim_head)
        return self.proj_drop(self.proj(out))

    def _keep_grad(self, grad: Tensor) -> None:
        self.score_grad = grad.detach()


class FeedForward(nn.Module):
    """``Linear -> GELU -> Dropout -> Linear -> Dropout``."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Shape: ``[..., dim]`` -> ``[..., dim]``."""
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class ScaleBlock(nn.Module):
    """Pre-norm transformer layer: ``x + Attn(LN(x))`` then ``x + FF(LN(x))``."""

    def __init__(self, config: RoamConfig, window: int | None) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.dim)
        self.attn = RelPosAttention(
            config.dim,
            config.heads,
            config.dim_head,
            config.dropout,
            window=window,
            shared_bias=config.shared_rel_bias,
        )
        self.ff_norm = nn.LayerNorm(config.dim)
        self.ff = FeedForward(config.dim, config.mlp_dim, config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Shape: ``[N, T, dim]`` -> ``[N, T, dim]``."""
        x = x + self.attn(self.attn_norm(x))
        return x + self.ff(self.ff_norm(x))


class ScaleTransformer(nn.Module):
    """A stack of :class:`ScaleBlock` (no final norm, as released)."""

    def __init__(self, config: RoamConfig, depth: int, window: int | None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ScaleBlock(config, window) for _ in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        """Shape: ``[N, T, dim]`` -> ``[N, T, dim]``."""
        for layer in self.layers:
            x = layer(x)
        return x


class PatchEmbed(nn.Module):
    """``LayerNorm(d_in) -> Linear(d_in, dim)``, one per scale."""

    def __init__(self, d_in: int, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_in)
        self.proj = nn.Linear(d_in, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Shape: ``[N, T, d_in]`` -> ``[N, T, dim]``."""
        return self.proj(self.norm(x))


@dataclass
class PyramidOutput:
    """Intermediate results of :class:`PyramidEncoder` (all ``[N, ...]`` over ROIs)."""

    roi: Tensor  # [N, dim]
    cls20: Tensor
    cls10: Tensor
    cls5: Tensor
    tokens20: Tensor  # [N, 65, dim] output of the 20x intra-scale stack
    tokens10: Tensor  # [N, 17, dim]
    tokens5: Tensor  # [N, 5, dim]


class PyramidEncoder(nn.Module):
    """Embed ROIs of 84 patch features into one vector each (intra- and inter-scale attention).

    Args:
        config: Model configuration.
    """

    def __init__(self, config: RoamConfig) -> None:
        super().__init__()
        d20, d2010, d10, d105, d5 = config.depths
        dim = config.dim
        self.embed_20 = PatchEmbed(config.d_in, dim)
        self.embed_10 = PatchEmbed(config.d_in, dim)
        self.embed_5 = PatchEmbed(config.d_in, dim)
        self.cls_20 = nn.Parameter(torch.empty(1, 1, dim))
        self.cls_10 = nn.Parameter(torch.empty(1, 1, dim))
        self.cls_5 = nn.Parameter(torch.empty(1, 1, dim))
        self.pos_20 = nn.Parameter(torch.empty(1, 65, dim))
        self.pos_10 = nn.Parameter(torch.empty(1, 17, dim))
        self.pos_5 = nn.Parameter(torch.empty(1, 5, dim))
        for p in (self.cls_20, self.cls_10, self.cls_5, self.pos_20, self.pos_10, self.pos_5):
            nn.init.trunc_normal_(p, std=0.02)
        self.intra_20 = ScaleTransformer(config, d20, window=8)
        self.inter_20_10 = ScaleTransformer(config, d2010, window=None)
        self.intra_10 = ScaleTransformer(config, d10, window=4)
        self.inter_10_5 = ScaleTransformer(config, d105, window=None)
        self.intra_5 = ScaleTransformer(config, d5, window=2)
        self.emb_drop = nn.Dropout(config.emb_dropout)
        self.register_buffer("children_10", children_index(4), persistent=False)
        self.register_buffer("children_5", children_index(2), persistent=False)
        self.register_buffer(
            "scale_weights", torch.tensor(config.scale_weights, dtype=torch.float32), persistent=False
        )

    def _intra(self, stack: ScaleTransformer, cls: Tensor, pos: Tensor, tokens: Tensor) -> Tensor:
        x = torch.cat([cls.expand(tokens.shape[0], -1, -1), tokens], dim=1) + pos
        return stack(self.emb_drop(x))

    @staticmethod
    def _inter(stack: ScaleTransformer, parents: Tensor, fine: Tensor, children: Tensor) -> Tensor:
        # Each parent token attends with its own 2x2 block of finer tokens; only the parent's output is kept.
        n, n_par, dim = parents.shape
        kids = fine[:, children]  # [N, n_par, 4, dim]
        seq = torch.cat([parents.unsqueeze(2), kids], dim=2).reshape(n * n_par, 5, dim)
        return stack(seq)[:, 0].reshape(n, n_par, dim)

    def forward(self, x: Tensor) -> PyramidOutput:
        """Encode ROIs.

        Shape:
            x: ``[N, 84, d_in]`` (longer inputs, such as the 85-token files of the released extractor, are cut
            to 84) -> ``roi`` ``[N, dim]``.
        """
        if x.ndim != 3 or x.shape[1] < TOKENS_PER_ROI:
            msg = f"PyramidEncoder expects [N, 84, d_in] ROI features; got shape {tuple(x.shape)}."
            raise ValueError(msg)
        x = x[:, :TOKENS_PER_ROI]
        e20 = self.embed_20(x[:, :64])
        e10 = self.embed_10(x[:, 64:80])
        e5 = self.embed_5(x[:, 80:84])
        t20 = self._intra(self.intra_20, self.cls_20, self.pos_20, e20)
        up10 = self._inter(self.inter_20_10, e10, t20[:, 1:], self.children_10)
        t10 = self._intra(self.intra_10, self.cls_10, self.pos_10, up10)
        up5 = self._inter(self.inter_10_5, e5, t10[:, 1:], self.children_5)
        t5 = self._intra(self.intra_5, self.cls_5, self.pos_5, up5)
        c20, c10, c5 = t20[:, 0], t10[:, 0], t5[:, 0]
        w = self.scale_weights.to(c5.dtype)
        roi = torch.stack([w[0] * c5, w[1] * c10, w[2] * c20]).sum(0)
        return PyramidOutput(roi, c20, c10, c5, t20, t10, t5)

    def intra_attention_layers(self) -> dict[str, list[RelPosAttention]]:
        """The attention modules of the intra-scale stacks, by scale, in forward order."""
        return {
            "20x": [blk.attn for blk in self.intra_20.layers],
            "10x": [blk.attn for blk in self.intra_10.layers],
            "5x": [blk.attn for blk in self.intra_5.layers],
        }

    @contextmanager
    def record_attention(self) -> Iterator[dict[str, list[RelPosAttention]]]:
        """Within the block, intra-scale layers keep their attention (and its pre-softmax gradient)."""
        layers = self.intra_attention_layers()
        mods = [m for ms in layers.values() for m in ms]
        for m in mods:
            m.record, m.attn, m.score_grad = True, None, None
        try:
            yield layers
        finally:
            for m in mods:
                m.record = False


class GatedClassAttention(nn.Module):
    """Class-specific gated attention: ``c(tanh(a(LN x)) * sigmoid(b(LN x)))``, one score per class.

    Shape:
        ``[..., dim]`` -> ``[..., n_classes]`` (raw scores, before the softmax over ROIs).
    """

    def __init__(self, dim: int, n_classes: int, dropout: float) -> None:
        super().__init__()
        hidden = dim // 2
        self.norm_a = nn.LayerNorm(dim)
        self.proj_a = nn.Linear(dim, hidden)
        self.norm_b = nn.LayerNorm(dim)
        self.proj_b = nn.Linear(dim, hidden)
        self.drop = nn.Dropout(dropout)
        self.score = nn.Linear(hidden, n_classes)

    def forward(self, h: Tensor) -> Tensor:
        """Shape: ``[..., dim]`` -> ``[..., n_classes]``."""
        a = self.drop(torch.tanh(self.proj_a(self.norm_a(h))))
        b = self.drop(torch.sigmoid(self.proj_b(self.norm_b(h))))
        return self.score(a * b)


class NormLinear(nn.Module):
    """``LayerNorm(dim) -> Linear(dim, out)`` (the bag and instance classifiers)."""

    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, out)

    def forward(self, x: Tensor) -> Tensor:
        """Shape: ``[..., dim]`` -> ``[..., out]``."""
        return self.fc(self.norm(x))


@dataclass
class RoamOutput:
    """What :meth:`Roam.forward` returns (B slides, K ROI slots, C classes).

    Attributes:
        logits: ``[B, C]`` slide logits.
        attention: ``[B, K, C]`` raw gated-attention scores (padded slots hold ``-inf``).
        attention_weights: ``[B, C, K]`` softmax over each slide's real ROIs, per class (0 on padding).
        roi_embeddings: ``[B, K, dim]`` (0 on padding).
        pooled: ``[B, C, dim]`` attention-pooled slide embedding per class.
        instance_loss: Scalar top-k instance loss (mean over slides) when labels were given, else None.
        instance_logits: Per slide ``[k_b, C]`` logits of the top-k ROIs (with labels), else None.
        instance_index: Per slide ``[k_b]`` indices of those ROIs, by decreasing attention.
    """

    logits: Tensor
    attention: Tensor
    attention_weights: Tensor
    roi_embeddings: Tensor
    pooled: Tensor
    instance_loss: Tensor | None = None
    instance_logits: list[Tensor] | None = None
    instance_index: list[Tensor] | None = None


class Roam(nn.Module):
    """ROAM slide classifier over ROI patch features.

    Args:
        config: Model configuration.

    Example:
        >>> model = Roam(RoamConfig(d_in=16, dim=16, heads=2, dim_head=8, mlp_dim=32, depths=(1, 1, 1, 1, 1)))
        >>> out = model(torch.randn(2, 5, 84, 16), torch.ones(2, 5, dtype=torch.bool))
        >>> tuple(out.logits.shape)
        (2, 3)
    """

    def __init__(self, config: RoamConfig) -> None:
        super().__init__()
        self.config = config
        self.pyramid = PyramidEncoder(config)
        self.mil = GatedClassAttention(config.dim, config.n_classes, config.mil_dropout)
        self.roi_head = NormLinear(config.dim, config.n_classes)
        self.slide_heads = nn.ModuleList(NormLinear(config.dim, 1) for _ in range(config.n_classes))

    def encode_rois(self, x: Tensor, *, chunk: int | None = None) -> Tensor:
        """ROI embeddings, computed in chunks of ROIs (the result does not depend on the chunk size).

        Args:
            x: patch features of the ROIs.
            chunk: ROIs per pass through the encoder; None means :data:`DEFAULT_ROI_CHUNK` (64). Every ROI is
                encoded on its own, so any chunk gives the same embeddings; 64 is the fastest measured at the
                released size (K = 256 ROIs: 1.43 s vs 2.14 s all at once on a 2-core AVX2 CPU, 0.95 s vs
                1.38 s on a 2-core AMX CPU): smaller working sets stay in cache. Pass ``x.shape[0]`` to
                encode all at once.

        Shape:
            x: ``[N, 84, d_in]`` -> ``[N, dim]``.
        """
        chunk = DEFAULT_ROI_CHUNK if chunk is None else chunk
        if x.shape[0] <= chunk:
            return self.pyramid(x).roi
        return torch.cat([self.pyramid(part).roi for part in x.split(chunk)])

    def _check_input(self, features: Tensor, roi_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        if features.ndim == 3:
            features = features.unsqueeze(0)
        if features.ndim != 4 or features.shape[2] < TOKENS_PER_ROI or features.shape[3] != self.config.d_in:
            msg = (
                f"ROAM expects features [B, K, 84, d_in={self.config.d_in}] (or [K, 84, d_in] for one slide); "
                f"got shape {tuple(features.shape)}. Check that the feature files come from an encoder with "
                f"{self.config.d_in}-d output."
            )
            raise ValueError(msg)
        b, k = features.shape[:2]
        if roi_mask is None:
            roi_mask = torch.ones(b, k, dtype=torch.bool, device=features.device)
        roi_mask = roi_mask.to(device=features.device, dtype=torch.bool)
        if roi_mask.shape != (b, k):
            msg = f"roi_mask must have shape {(b, k)} (slides, ROI slots); got {tuple(roi_mask.shape)}."
            raise ValueError(msg)
        if not bool(roi_mask.any(dim=1).all()):
            msg = "Every slide needs at least one ROI (a row of roi_mask is all False)."
            raise ValueError(msg)
        return features, roi_mask

    def forward(
        self,
        features: Tensor,
        roi_mask: Tensor | None = None,
        *,
        labels: Tensor | None = None,
        roi_chunk: int | None = None,
    ) -> RoamOutput:
        """Classify slides.

        Only real ROIs go through the ROI encoder, so padding costs nothing and a batch gives the same outputs
        as its slides one by one.

        Args:
            features: ROI patch features.
            roi_mask: True for real ROIs; None means all are real.
            labels: Slide labels; when given, the top-k instance loss is computed.
            roi_chunk: Encode at most this many ROIs at once (None: :data:`DEFAULT_ROI_CHUNK`, the fastest;
                the outputs do not depend on it).

        Shape:
            features: ``[B, K, 84, d_in]`` or ``[K, 84, d_in]``; roi_mask: ``[B, K]``; labels: ``[B]``.
            See :class:`RoamOutput` for the outputs.
        """
        features, roi_mask = self._check_input(features, roi_mask)
        b, k = roi_mask.shape
        flat = self.encode_rois(features[roi_mask], chunk=roi_chunk)  # [N_real, dim]
        h = flat.new_zeros(b, k, flat.shape[-1])
        h[roi_mask] = flat
        scores = self.mil(h).masked_fill(~roi_mask.unsqueeze(-1), float("-inf"))  # [B, K, C]
        weights = scores.transpose(1, 2).softmax(dim=-1)  # [B, C, K]
        pooled = weights @ h  # [B, C, dim]
        logits = torch.cat([head(pooled[:, c]) for c, head in enumerate(self.slide_heads)], dim=-1)
        out = RoamOutput(logits, scores, weights, h, pooled)
        if labels is not None:
            self._instance_loss(out, roi_mask, labels.to(features.device).long())
        return out

    def _instance_loss(self, out: RoamOutput, roi_mask: Tensor, labels: Tensor) -> None:
        # Top-k ROIs by the attention of the true class, classified by the ROI head against the slide label.
        losses, logits_all, index_all = [], [], []
        n_real = roi_mask.sum(dim=1)
        for i in range(labels.shape[0]):
            k_i = min(self.config.topk, int(n_real[i]))
            idx = torch.topk(out.attention_weights[i, labels[i]], k_i).indices
            logits = self.roi_head(out.roi_embeddings[i, idx])
            losses.append(F.cross_entropy(logits, labels[i].expand(k_i)))
            logits_all.append(logits)
            index_all.append(idx)
        out.instance_loss = torch.stack(losses).mean()
        out.instance_logits = logits_all
        out.instance_index = index_all
