"""Performer: linear attention with positive orthogonal random features (FAVOR+, softmax kernel).

Paper: Choromanski et al., "Rethinking Attention with Performers", ICLR 2021. The layer layout and the
feature map follow the Performer used as the scFoundation decoder (biomap-research/scFoundation,
``model/pretrainmodels/performer.py``, commit d09626a, itself derived from lucidrains/performer-pytorch),
re-implemented here with only what scFoundation needs: the non-causal softmax kernel.

Differences from upstream, on purpose:

* The random projection is a buffer that changes **only** through an explicit
  :meth:`FastAttention.redraw_projection_matrix` call. Upstream redraws it every 1000 forward calls in
  training mode, which silently changes a fine-tuned model.
* The key-side stabiliser (a max subtracted inside ``exp``) can be taken per batch element
  (``key_max="sample"``, default) instead of over the whole batch (``"global"``, upstream). Because of
  the ``+1e-4`` feature epsilon, the global max makes a cell's output depend slightly on the other cells
  of its batch; per sample, batched outputs equal one-cell-at-a-time outputs, which is what upstream
  computes at inference (batch size 1).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "FastAttention",
    "KeyMax",
    "Performer",
    "PerformerFeedForward",
    "PerformerLayer",
    "PerformerSelfAttention",
    "default_nb_features",
    "gaussian_orthogonal_random_matrix",
    "softmax_kernel_features",
]

KeyMax = Literal["sample", "global"]

# Added to every random feature so that denominators stay positive; part of the official feature map.
FEATURE_EPS = 1e-4


def default_nb_features(dim_head: int) -> int:
    """Number of random features upstream uses by default: ``int(dim_head * ln(dim_head))``.

    64 -> 266 (released scFoundation), 8 -> 16.
    """
    return int(dim_head * math.log(dim_head))


def gaussian_orthogonal_random_matrix(
    nb_rows: int,
    nb_cols: int,
    *,
    scaling: Literal[0, 1] = 0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Random projection whose rows are orthogonal within blocks of ``nb_cols`` rows.

    Each block is the Q factor of a square Gaussian matrix (orthonormal rows); the blocks are stacked
    and cut to ``nb_rows``. Rows are then rescaled so that their norms follow the norms of i.i.d.
    Gaussian vectors (chi distribution, ``scaling=0``), or are all ``sqrt(nb_cols)`` (``scaling=1``).

    Args:
        nb_rows: number of random features ``m``.
        nb_cols: feature dimension (the head dimension).
        scaling: 0 = chi-distributed row norms, 1 = constant row norm ``sqrt(nb_cols)``.
        generator: random generator (on ``device``) for reproducible draws.
        device: where to create the matrix (default: the current default device).
        dtype: floating dtype (default: the current default dtype).

    Returns:
        The projection matrix.

    Shape:
        - returns: ``[nb_rows, nb_cols]``
    """
    if scaling not in (0, 1):
        msg = f"scaling must be 0 (chi row norms) or 1 (constant row norms), got {scaling!r}."
        raise ValueError(msg)
    num_blocks = math.ceil(nb_rows / nb_cols)
    gaussian = torch.randn(num_blocks, nb_cols, nb_cols, generator=generator, device=device, dtype=dtype)
    q, _ = torch.linalg.qr(gaussian, mode="reduced")
    # Columns of Q are orthonormal; transpose so that rows are, then stack the blocks.
    blocks = q.transpose(-1, -2).reshape(num_blocks * nb_cols, nb_cols)[:nb_rows]
    if scaling == 0:
        norms = torch.randn(nb_rows, nb_cols, generator=generator, device=device, dtype=dtype).norm(dim=1)
    else:
        norms = torch.full((nb_rows,), math.sqrt(nb_cols), device=blocks.device, dtype=blocks.dtype)
    return norms.unsqueeze(1) * blocks


def softmax_kernel_features(
    x: Tensor,
    projection: Tensor,
    *,
    is_query: bool,
    key_max: KeyMax = "sample",
    eps: float = FEATURE_EPS,
) -> Tensor:
    """Positive random features whose dot products approximate ``exp(q . k / sqrt(d_head))``.

    With ``c = d_head ** -0.25``: ``phi(x) = m ** -0.5 * (exp(c x W^T - c^2 |x|^2 / 2 - max) + eps)``.
    The subtracted max only stabilises ``exp``; it cancels in the attention ratio except for the ``eps``
    term. Queries use their own row max; keys use the max over each sample (``"sample"``) or over the
    whole tensor (``"global"``, upstream).

    Args:
        x: queries or keys.
        projection: random projection ``W``.
        is_query: query (row max) or key (sample/global max) stabiliser.
        key_max: scope of the key max.
        eps: constant added to every feature.

    Returns:
        The features.

    Shape:
        - x: ``[b, h, n, d_head]``
        - projection: ``[m, d_head]``
        - returns: ``[b, h, n, m]``
    """
    scale = x.shape[-1] ** -0.25
    ratio = projection.shape[0] ** -0.5
    projected = (scale * x) @ projection.to(x.dtype).transpose(0, 1)
    half_sq_norm = (x * x).sum(dim=-1, keepdim=True) * (0.5 * scale * scale)
    if is_query:
        stabiliser = projected.amax(dim=-1, keepdim=True)
    elif key_max == "global":
        stabiliser = projected.amax()
    elif key_max == "sample":
        stabiliser = projected.amax(dim=(1, 2, 3), keepdim=True)
    else:
        msg = f"key_max must be 'sample' or 'global', got {key_max!r}."
        raise ValueError(msg)
    # The stabiliser only guards exp() against overflow; it cancels in the attention ratio up to the eps term,
    # so it carries no useful gradient. Detaching it saves the costly max backward in training.
    return ratio * (torch.exp(projected - half_sq_norm - stabiliser.detach()) + eps)


class FastAttention(nn.Module):
    """FAVOR+ non-causal attention for already split heads.

    Args:
        dim_head: head dimension.
        nb_features: number of random features ``m`` (default ``int(dim_head * ln(dim_head))``).
        key_max: scope of the key stabiliser, see :func:`softmax_kernel_features`.
        scaling: row-norm scheme of the projection, see :func:`gaussian_orthogonal_random_matrix`.
        generator: generator for the initial projection draw.
    """

    projection_matrix: Tensor

    def __init__(
        self,
        dim_head: int,
        nb_features: int | None = None,
        *,
        key_max: KeyMax = "sample",
        scaling: Literal[0, 1] = 0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if key_max not in ("sample", "global"):
            msg = f"key_max must be 'sample' or 'global', got {key_max!r}."
            raise ValueError(msg)
        self.dim_head = dim_head
        self.nb_features = default_nb_features(dim_head) if nb_features is None else nb_features
        self.key_max: KeyMax = key_max
        self.scaling: Literal[0, 1] = scaling
        # A persistent buffer: saved in the state dict, so inference is deterministic.
        self.register_buffer(
            "projection_matrix",
            gaussian_orthogonal_random_matrix(
                self.nb_features, dim_head, scaling=scaling, generator=generator
            ),
        )

    @torch.no_grad()
    def redraw_projection_matrix(self, generator: torch.Generator | None = None) -> None:
        """Draw a new random projection in place (the only way the projection ever changes).

        Args:
            generator: generator on the buffer's device, for a reproducible draw.
        """
        fresh = gaussian_orthogonal_random_matrix(
            self.nb_features,
            self.dim_head,
            scaling=self.scaling,
            generator=generator,
            device=self.projection_matrix.device,
            dtype=self.projection_matrix.dtype,
        )
        self.projection_matrix.copy_(fresh)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Linear attention ``out_i = phi(q_i) (sum_n phi(k_n) v_n^T) / (phi(q_i) . sum_n phi(k_n))``.

        Args:
            q: queries.
            k: keys.
            v: values.

        Returns:
            Attention output per head.

        Shape:
            - q: ``[b, h, n, d_head]``
            - k, v: ``[b, h, n_k, d_head]``
            - returns: ``[b, h, n, d_head]``
        """
        q_features = softmax_kernel_features(q, self.projection_matrix, is_query=True)
        k_features = softmax_kernel_features(k, self.projection_matrix, is_query=False, key_max=self.key_max)
        # Sum over keys first: cost O(n m d) instead of the O(n^2 d) of exact attention.
        context = k_features.transpose(-1, -2) @ v  # [b, h, m, d_head]
        normaliser = q_features @ k_features.sum(dim=-2).unsqueeze(-1)  # [b, h, n, 1]
        return (q_features @ context) / normaliser


class PerformerSelfAttention(nn.Module):
    """Multi-head FAVOR+ self-attention with biased q/k/v/out projections.

    Args:
        dim: model dimension ``d``.
        num_heads: heads ``h``.
        head_dim: dimension per head (``h * head_dim`` need not equal ``d``).
        nb_features: random features per head.
        key_max: scope of the key stabiliser.
        dropout: dropout after the output projection.
        generator: generator for the initial projection draw.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        head_dim: int,
        nb_features: int | None = None,
        key_max: KeyMax = "sample",
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        inner_dim = num_heads * head_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.to_q = nn.Linear(dim, inner_dim)
        self.to_k = nn.Linear(dim, inner_dim)
        self.to_v = nn.Linear(dim, inner_dim)
        self.to_out = nn.Linear(inner_dim, dim)
        self.fast_attention = FastAttention(head_dim, nb_features, key_max=key_max, generator=generator)
        self.dropout = nn.Dropout(dropout)

    def _split_heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        """Attend every position to every position.

        Args:
            x: input tokens.

        Returns:
            Attention output after ``to_out``.

        Shape:
            - x: ``[b, n, d]``
            - returns: ``[b, n, d]``
        """
        b, n, _ = x.shape
        q, k, v = (self._split_heads(proj(x)) for proj in (self.to_q, self.to_k, self.to_v))
        out = self.fast_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        return self.dropout(self.to_out(out))


class PerformerFeedForward(nn.Module):
    """``w2(GELU(w1(x)))`` with hidden size ``mlp_ratio * dim``.

    Args:
        dim: model dimension.
        mlp_ratio: hidden size multiplier.
        dropout: dropout after the activation.
    """

    def __init__(self, dim: int, *, mlp_ratio: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, dim * mlp_ratio)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.w2 = nn.Linear(dim * mlp_ratio, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the feed-forward block.

        Shape:
            - x: ``[b, n, d]``
            - returns: ``[b, n, d]``
        """
        return self.w2(self.dropout(self.act(self.w1(x))))


class PerformerLayer(nn.Module):
    """Pre-LN Performer block: ``x + attn(LN(x))`` then ``x + ffn(LN(x))``.

    Args:
        dim: model dimension.
        num_heads: attention heads.
        head_dim: dimension per head.
        nb_features: random features per head.
        mlp_ratio: FFN hidden size multiplier.
        dropout: dropout after attention and inside the FFN.
        key_max: scope of the key stabiliser.
        generator: generator for the initial projection draw.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        head_dim: int,
        nb_features: int | None = None,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        key_max: KeyMax = "sample",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = PerformerSelfAttention(
            dim,
            num_heads=num_heads,
            head_dim=head_dim,
            nb_features=nb_features,
            key_max=key_max,
            dropout=dropout,
            generator=generator,
        )
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = PerformerFeedForward(dim, mlp_ratio=mlp_ratio, dropout=dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block.

        Shape:
            - x: ``[b, n, d]``
            - returns: ``[b, n, d]``
        """
        x = x + self.attn(self.attn_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class Performer(nn.Module):
    """A stack of :class:`PerformerLayer` followed by a final LayerNorm (submodule ``norm``).

    The stack has no padding mask: like upstream it attends over every position it is given.

    Args:
        dim: model dimension.
        depth: number of layers.
        num_heads: attention heads per layer.
        head_dim: dimension per head.
        nb_features: random features per head (default ``int(head_dim * ln(head_dim))``).
        mlp_ratio: FFN hidden size multiplier.
        dropout: dropout after attention and inside the FFN.
        key_max: scope of the key stabiliser.
        generator: generator for the initial projection draws.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        *,
        num_heads: int,
        head_dim: int,
        nb_features: int | None = None,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        key_max: KeyMax = "sample",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            PerformerLayer(
                dim,
                num_heads=num_heads,
                head_dim=head_dim,
                nb_features=nb_features,
                mlp_ratio=mlp_ratio,
                dropout=dropout,
                key_max=key_max,
                generator=generator,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def redraw_projection_matrices(self, generator: torch.Generator | None = None) -> None:
        """Redraw the random projection of every layer (never done implicitly).

        Args:
            generator: generator on the buffers' device, for reproducible draws.
        """
        for module in self.modules():
            if isinstance(module, FastAttention):
                module.redraw_projection_matrix(generator)

    def forward(self, x: Tensor) -> Tensor:
        """Run all layers and the final norm.

        Shape:
            - x: ``[b, n, d]``
            - returns: ``[b, n, d]``
        """
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)
