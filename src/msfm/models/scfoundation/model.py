"""scFoundation asymmetric encoder-decoder (``mae_autobin``), tensors in, tensors out.

Paper: Hao et al., "Large-scale foundation model on single-cell transcriptomics", Nature Methods 2024.
Upstream: biomap-research/scFoundation, ``model/pretrainmodels/mae_autobin.py`` (commit d09626a). This
is an independent re-implementation; :mod:`msfm.models.scfoundation.official` maps the official weights.

Data flow (``G`` genes, position ids ``G`` = T, ``G + 1`` = S, ``G + 2`` = padding):

1. Encoder tokens (non-zero genes in ascending id, then T, then S) are
   ``value_embedding(value) + gene_embedding(id)`` and run through a post-LN transformer encoder.
2. The decoder input is the value embedding of all ``G + 2`` positions; the encoder outputs replace the
   positions they came from; the gene embedding is added to every position; then ``decoder_embed``,
   the Performer (with its own final LayerNorm), ``decoder_norm`` and, for expression, ``head``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msfm.errors import MsfmInputError
from msfm.models.scfoundation.config import ScFoundationConfig
from msfm.nn.performer import Performer
from msfm.nn.transformer import TransformerEncoder
from msfm.nn.value_embedding import AutoDiscretizationEmbedding

__all__ = ["PoolMode", "ScFoundation", "ScFoundationOutput"]

PoolMode = Literal["all", "max"]


@dataclass(frozen=True)
class ScFoundationOutput:
    """Output of :meth:`ScFoundation.forward`.

    Attributes:
        expression: predicted expression for every position (genes, T, S), ``[b, G + 2]``; ``None`` when
            the batch has no ``full_values`` (encoder only).
        hidden: encoder output after its final LayerNorm, ``[b, n, d_enc]``; padded rows are meaningless.
    """

    expression: Tensor | None
    hidden: Tensor


class ScFoundation(nn.Module):
    """The scFoundation encoder-decoder.

    Args:
        config: network sizes and value-embedding settings.

    Example:
        >>> model = ScFoundation(ScFoundationConfig(encoder_dim=32, encoder_depth=1, encoder_num_heads=2,
        ...     encoder_head_dim=16, decoder_dim=16, decoder_depth=1, decoder_num_heads=2, decoder_head_dim=8))
        >>> hidden = model.encode(values, gene_ids, padding_mask)      # [b, n, 32]
        >>> cell = model.pool_cell_embedding(hidden, gene_ids, padding_mask)  # [b, 128]
    """

    def __init__(self, config: ScFoundationConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.value_embedding = AutoDiscretizationEmbedding(
            c.encoder_dim,
            num_bins=c.num_bins,
            alpha=c.bin_alpha,
            mask_value=c.mask_value,
            pad_value=c.pad_value,
        )
        # One row per gene, plus T, S and padding; the "position" of a token is its gene identity.
        self.gene_embedding = nn.Embedding(c.gene_vocab_size, c.encoder_dim)
        self.encoder = TransformerEncoder(
            c.encoder_dim,
            c.encoder_depth,
            c.encoder_num_heads,
            c.encoder_mlp_dim,
            c.encoder_dropout,
            activation="relu",
            norm_first=False,
        )
        self.decoder_embed = nn.Linear(c.encoder_dim, c.decoder_dim)
        self.decoder = Performer(
            c.decoder_dim,
            c.decoder_depth,
            num_heads=c.decoder_num_heads,
            head_dim=c.decoder_head_dim,
            nb_features=c.nb_features,
            mlp_ratio=c.decoder_mlp_ratio,
            dropout=c.decoder_dropout,
            key_max=c.decoder_key_max,
        )
        # Upstream applies a second LayerNorm after the Performer's own final norm.
        self.decoder_norm = nn.LayerNorm(c.decoder_dim)
        self.head = nn.Linear(c.decoder_dim, 1)

    # ------------------------------------------------------------------ encoder
    def encode(
        self,
        values: Tensor,
        gene_ids: Tensor,
        padding_mask: Tensor,
        *,
        value_mask: Tensor | None = None,
    ) -> Tensor:
        """Encode the expressed genes (plus T and S) of every cell.

        Args:
            values: token values (non-zero genes in ascending id, then T, then S; padding 0).
            gene_ids: position ids of the tokens; padding = ``config.pad_id``.
            padding_mask: True at padding.
            value_mask: True where a token is masked (uses the mask embedding). ``None``: tokens whose
                value equals ``config.mask_value`` (official sentinel rule).

        Returns:
            Encoder output after the final LayerNorm; rows at padding are meaningless.

        Raises:
            MsfmInputError: if the three inputs do not have one common ``[b, n]`` shape.

        Shape:
            - values, gene_ids, padding_mask, value_mask: ``[b, n]``
            - returns: ``[b, n, d_enc]``
        """
        _check_same_2d(values=values, gene_ids=gene_ids, padding_mask=padding_mask)
        tokens = self.value_embedding(values, mask=value_mask, pad=padding_mask)
        tokens = tokens + self.gene_embedding(gene_ids)
        return self.encoder(tokens, key_padding_mask=padding_mask)

    def encode_packed(self, values: Tensor, gene_ids: Tensor, seq_lens: list[int]) -> Tensor:
        """Encode cells packed end to end (no padding): same result as :meth:`encode` at real tokens.

        Every matmul runs once over all tokens of the batch and no compute goes to padding; attention
        runs per cell. The inference default on CPU.

        Args:
            values: token values of all cells, concatenated (each cell: genes, then T, then S).
            gene_ids: their position ids.
            seq_lens: number of tokens of each cell.

        Returns:
            Encoder output after the final LayerNorm.

        Shape:
            - values, gene_ids: ``[N]`` (``N = sum(seq_lens)``)
            - returns: ``[N, d_enc]``
        """
        no = torch.zeros_like(values, dtype=torch.bool)
        values = values.to(self.gene_embedding.weight.dtype)  # a model cast to bf16 takes bf16 values
        tokens = self.value_embedding(values, mask=no, pad=no) + self.gene_embedding(gene_ids)
        return self.encoder.forward_packed(tokens, seq_lens)

    # ------------------------------------------------------------------ decoder
    def decode(
        self,
        hidden: Tensor,
        gene_ids: Tensor,
        padding_mask: Tensor,
        full_values: Tensor,
        full_mask: Tensor | None = None,
        *,
        chunk_size: int | None = None,
    ) -> Tensor:
        """Context embeddings of every position (genes, T, S) from the encoder output.

        The Performer attends over all ``G + 2`` positions of a cell and needs no padding mask. With the
        default ``decoder_key_max="sample"`` a cell's output does not depend on the other cells of its
        batch, so ``chunk_size`` (decode ``chunk_size`` cells at a time to bound memory) changes nothing
        but peak memory.

        Args:
            hidden: encoder output (:meth:`encode`).
            gene_ids: position ids of the encoder tokens; padding is ignored.
            padding_mask: True at padded encoder tokens.
            full_values: input values of every position.
            full_mask: True at masked positions (mask embedding). ``None``: the official sentinel rule
                (values equal to ``mask_value`` / ``pad_value`` use the mask / padding embedding).
            chunk_size: if set, decode at most this many cells at once.

        Returns:
            Decoder output after ``decoder_norm`` (before ``head``).

        Raises:
            MsfmInputError: on inconsistent shapes or a non-positive ``chunk_size``.

        Shape:
            - hidden: ``[b, n, d_enc]``
            - gene_ids, padding_mask: ``[b, n]``
            - full_values, full_mask: ``[b, G + 2]``
            - returns: ``[b, G + 2, d_dec]``
        """
        self._check_decoder_inputs(hidden, gene_ids, padding_mask, full_values, full_mask)
        batch = hidden.shape[0]
        if chunk_size is None or batch <= chunk_size:
            return self._decode(hidden, gene_ids, padding_mask, full_values, full_mask)
        if chunk_size < 1:
            msg = f"chunk_size must be a positive number of cells, got {chunk_size}."
            raise MsfmInputError(msg)
        pieces = []
        for start in range(0, batch, chunk_size):
            part = slice(start, start + chunk_size)
            pieces.append(
                self._decode(
                    hidden[part],
                    gene_ids[part],
                    padding_mask[part],
                    full_values[part],
                    None if full_mask is None else full_mask[part],
                )
            )
        return torch.cat(pieces, dim=0)

    def _decode(
        self,
        hidden: Tensor,
        gene_ids: Tensor,
        padding_mask: Tensor,
        full_values: Tensor,
        full_mask: Tensor | None,
    ) -> Tensor:
        seq_len = self.config.seq_len
        # One spare column at index seq_len (== pad_id) receives the padded encoder rows, so the scatter
        # needs no boolean selection (no host sync) and padding never overwrites a real position.
        values = F.pad(full_values, (0, 1))
        if full_mask is None:
            mask = pad = None
        else:
            mask = F.pad(full_mask, (0, 1))
            # The decoder always sees complete cells, so on the explicit path nothing is padding.
            pad = torch.zeros_like(mask)
        tokens = self._embed_sparse_values(values, mask, pad)
        index = torch.where(padding_mask, seq_len, gene_ids)
        index = index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        # In place is safe for autograd: nothing saved for backward refers to this buffer.
        tokens.scatter_(1, index, hidden.to(tokens.dtype))
        # Every position gets its gene embedding, including the ones holding encoder outputs (upstream).
        tokens = tokens[:, :seq_len] + self.gene_embedding.weight[:seq_len]
        out = self.decoder(self.decoder_embed(tokens))
        return self.decoder_norm(out)

    def _embed_sparse_values(self, values: Tensor, mask: Tensor | None, pad: Tensor | None) -> Tensor:
        """Value embedding of every decoder position, computing the MLP only for non-zero values.

        Most decoder positions hold an expression of exactly 0 (about 90-98 % of genes in a cell), and the
        embedding of 0 is one fixed vector: it is computed once and broadcast, so the bin MLP runs over the
        non-zero values only. The result equals ``value_embedding(values, mask=mask, pad=pad)``.

        Shape:
            - values, mask, pad: ``[b, n]``
            - returns: ``[b, n, d_enc]``
        """
        emb = self.value_embedding
        b, n = values.shape
        flat = values.reshape(-1)
        nonzero = torch.nonzero(flat != 0).squeeze(-1)
        zero_row = emb(
            flat.new_zeros(1),
            mask=torch.zeros(1, dtype=torch.bool, device=flat.device),
            pad=torch.zeros(1, dtype=torch.bool, device=flat.device),
        )
        nz_values = flat[nonzero]
        explicit = mask is not None
        nz_rows = emb(
            nz_values,
            mask=torch.zeros_like(nz_values, dtype=torch.bool) if explicit else None,
            pad=torch.zeros_like(nz_values, dtype=torch.bool) if explicit else None,
        )
        tokens = zero_row.expand(b * n, -1).index_copy(0, nonzero, nz_rows.to(zero_row.dtype))
        tokens = tokens.view(b, n, -1)
        if explicit:
            tokens = torch.where(mask.unsqueeze(-1), emb.emb_mask.weight[0].to(tokens.dtype), tokens)
            tokens = torch.where(pad.unsqueeze(-1), emb.emb_pad.weight[0].to(tokens.dtype), tokens)
        return tokens

    def predict_expression(self, decoded: Tensor) -> Tensor:
        """Apply the linear expression head to decoder outputs.

        Shape:
            - decoded: ``[b, G + 2, d_dec]``
            - returns: ``[b, G + 2]``
        """
        return self.head(decoded).squeeze(-1)

    def forward(self, batch: dict[str, Tensor]) -> ScFoundationOutput:
        """Encoder, then (when ``full_values`` is in the batch) decoder and expression head.

        Args:
            batch: ``values``, ``gene_ids``, ``padding_mask`` and optionally ``full_values`` and
                ``full_mask`` (see ``docs/architecture.md``).

        Returns:
            The expression prediction (or ``None``) and the encoder output.

        Raises:
            MsfmInputError: if a required key is missing or shapes disagree.

        Shape:
            - values, gene_ids, padding_mask: ``[b, n]``
            - full_values, full_mask: ``[b, G + 2]``
            - returns: expression ``[b, G + 2]``, hidden ``[b, n, d_enc]``
        """
        missing = [key for key in ("values", "gene_ids", "padding_mask") if key not in batch]
        if missing:
            msg = (
                f"batch is missing {missing}; got keys {sorted(batch)}. Build batches with the "
                f"scFoundation tokenizer (msfm.tokenizers.gene_panel)."
            )
            raise MsfmInputError(msg)
        hidden = self.encode(batch["values"], batch["gene_ids"], batch["padding_mask"])
        expression = None
        if "full_values" in batch:
            decoded = self.decode(
                hidden,
                batch["gene_ids"],
                batch["padding_mask"],
                batch["full_values"],
                batch.get("full_mask"),
            )
            expression = self.predict_expression(decoded)
        return ScFoundationOutput(expression=expression, hidden=hidden)

    # ------------------------------------------------------------------ pooling
    def pool_cell_embedding(
        self,
        hidden: Tensor,
        gene_ids: Tensor,
        padding_mask: Tensor,
        mode: PoolMode = "all",
    ) -> Tensor:
        """Cell embedding from the encoder output, padding excluded.

        ``all`` = concat[S token, T token, max over gene tokens, mean over gene tokens] (the official order
        S, T, max, mean); ``max`` = max over every real token including T and S. T and S are found by
        their position id, not by their place in the sequence. A cell without gene tokens gets zeros for
        the max and mean parts.

        Args:
            hidden: encoder output.
            gene_ids: position ids of the tokens.
            padding_mask: True at padding.
            mode: ``"all"`` or ``"max"``.

        Returns:
            One embedding per cell.

        Raises:
            MsfmInputError: on an unknown mode, or (mode ``all``) a cell without a T or an S token.

        Shape:
            - hidden: ``[b, n, d_enc]``
            - gene_ids, padding_mask: ``[b, n]``
            - returns: ``[b, 4 * d_enc]`` (``all``) or ``[b, d_enc]`` (``max``)
        """
        if mode not in ("all", "max"):
            msg = f"mode must be 'all' or 'max', got {mode!r}."
            raise MsfmInputError(msg)
        real = ~padding_mask
        lowest = torch.finfo(hidden.dtype).min
        if mode == "max":
            pooled = hidden.masked_fill(padding_mask.unsqueeze(-1), lowest).amax(dim=1)
            return torch.where(real.any(dim=1, keepdim=True), pooled, 0.0)

        cfg = self.config
        is_gene = real & (gene_ids < cfg.num_genes)
        is_t = real & (gene_ids == cfg.t_id)
        is_s = real & (gene_ids == cfg.s_id)
        has_depth = is_t.any(dim=1) & is_s.any(dim=1)
        if not bool(has_depth.all()):
            bad = torch.nonzero(~has_depth).flatten().tolist()[:10]
            msg = (
                f"pool mode 'all' needs a T token (id {cfg.t_id}) and an S token (id {cfg.s_id}) in every "
                f"cell; cells {bad} lack one. Tokenize with depth tokens, or use mode='max'."
            )
            raise MsfmInputError(msg)
        s_token = _gather_first(hidden, is_s)
        t_token = _gather_first(hidden, is_t)
        gene_max = hidden.masked_fill(~is_gene.unsqueeze(-1), lowest).amax(dim=1)
        count = is_gene.sum(dim=1, keepdim=True)
        gene_max = torch.where(count > 0, gene_max, 0.0)
        # A masked matmul instead of masking a [b, n, d] copy.
        gene_mean = torch.einsum("bn,bnd->bd", is_gene.to(hidden.dtype), hidden) / count.clamp(min=1)
        return torch.cat([s_token, t_token, gene_max, gene_mean], dim=-1)

    # ------------------------------------------------------------------ checks
    def _check_decoder_inputs(
        self,
        hidden: Tensor,
        gene_ids: Tensor,
        padding_mask: Tensor,
        full_values: Tensor,
        full_mask: Tensor | None,
    ) -> None:
        _check_same_2d(gene_ids=gene_ids, padding_mask=padding_mask)
        b, n = gene_ids.shape
        if hidden.shape[:2] != (b, n):
            msg = f"hidden must be [b, n, d] = [{b}, {n}, d] like gene_ids, got {list(hidden.shape)}."
            raise MsfmInputError(msg)
        expected = (b, self.config.seq_len)
        if tuple(full_values.shape) != expected:
            msg = (
                f"full_values must be [b, G + 2] = {list(expected)} (every gene, then T and S), got "
                f"{list(full_values.shape)}."
            )
            raise MsfmInputError(msg)
        if full_mask is not None and tuple(full_mask.shape) != expected:
            msg = f"full_mask must be {list(expected)} like full_values, got {list(full_mask.shape)}."
            raise MsfmInputError(msg)


def _gather_first(hidden: Tensor, selector: Tensor) -> Tensor:
    """Row of ``hidden`` at the first True of ``selector`` in every cell.

    Shape:
        - hidden: ``[b, n, d]``
        - selector: ``[b, n]`` bool
        - returns: ``[b, d]``
    """
    index = selector.to(torch.uint8).argmax(dim=1)
    index = index.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
    return hidden.gather(1, index).squeeze(1)


def _check_same_2d(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 2 or any(shape != first for shape in shapes.values()):
        described = ", ".join(f"{name} {list(shape)}" for name, shape in shapes.items())
        msg = f"expected {', '.join(shapes)} to share one [b, n] shape, got {described}."
        raise MsfmInputError(msg)
