"""The GeST meta-cell vocabulary: PCA + k-means quantisation of model-space expression, with a label hierarchy."""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from msfm.errors import CheckpointError, MsfmInputError
from msfm.tokenizers.spatial._inputs import _as_matrix, _check_model_space, _positive_int, _seed_int
from msfm.tokenizers.spatial.kmeans import (
    _fill_empty_labels,
    _group_means,
    _kmeans,
    _nearest,
    _relabel_by_first_appearance,
    _repair_empty_centres,
)
from msfm.tokenizers.spatial.pca import _project64, _randomized_pca

if TYPE_CHECKING:
    import torch

__all__ = ["MetaCellVocab"]

_VOCAB_FORMAT = "msfm.metacell_vocab"
_VOCAB_FORMAT_VERSION = 1
_SAFETENSORS_META_KEY = "msfm_metacell_vocab"
#: Above this many fit cells k-means switches from Lloyd (``KMeans``) to ``MiniBatchKMeans``.
_MINIBATCH_THRESHOLD = 20_000
_TENSOR_NAMES = ("pca_mean", "pca_components", "centroids_pca", "centroids_expr", "hierarchy", "cell_counts")


@dataclass(eq=False)
class MetaCellVocab:
    """The GeST meta-cell vocabulary: PCA + k-means quantisation of model-space expression, with a label hierarchy.

    Build one with :meth:`fit`; every array is validated on construction.

    Attributes:
        genes: The T genes, in the column order :meth:`project` and :meth:`assign` expect.
        pca_mean: Gene means of the fit cells. Shape: ``[T]`` float32.
        pca_components: PCA loadings (rows orthonormal). Shape: ``[p, T]`` float32.
        centroids_pca: Meta-cell centres in PCA space (the k-means centres on the fit cells). Shape: ``[K, p]``
            float32.
        centroids_expr: Mean model-space expression of the cells assigned to each meta-cell (all cells given to
            :meth:`fit`, assigned with :meth:`assign`). Shape: ``[K, T]`` float32.
        hierarchy: Row 0 is ``arange(K)``; row ``i`` is each meta-cell's label at level ``i``. Each level is a
            coarsening of the previous one (nested). Shape: ``[n_levels, K]`` int64.
        level_sizes: Number of labels per level, for example ``(2048, 15, 10, 5)``.
        cell_counts: Number of fit-input cells assigned to each meta-cell (all >= 1). Shape: ``[K]`` int64.
        meta: Fit parameters and statistics (JSON-serialisable).
    """

    genes: list[str]
    pca_mean: np.ndarray
    pca_components: np.ndarray
    centroids_pca: np.ndarray
    centroids_expr: np.ndarray
    hierarchy: np.ndarray
    level_sizes: tuple[int, ...]
    cell_counts: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.genes = [str(g) for g in self.genes]
        self.pca_mean = np.ascontiguousarray(self.pca_mean, dtype=np.float32)
        self.pca_components = np.ascontiguousarray(self.pca_components, dtype=np.float32)
        self.centroids_pca = np.ascontiguousarray(self.centroids_pca, dtype=np.float32)
        self.centroids_expr = np.ascontiguousarray(self.centroids_expr, dtype=np.float32)
        self.hierarchy = np.ascontiguousarray(self.hierarchy, dtype=np.int64)
        self.cell_counts = np.ascontiguousarray(self.cell_counts, dtype=np.int64)
        self.level_sizes = tuple(int(s) for s in self.level_sizes)
        self.meta = dict(self.meta)
        self._validate()

    def _validate(self) -> None:
        def bad(what: str) -> CheckpointError:
            return CheckpointError(
                f"Inconsistent meta-cell vocabulary: {what}. Rebuild it with MetaCellVocab.fit() or load a file "
                "written by MetaCellVocab.save()."
            )

        T = len(self.genes)
        if T == 0 or len(set(self.genes)) != T:
            raise bad(f"{T} genes, {T - len(set(self.genes))} duplicated (need >= 1 unique gene)")
        if self.pca_mean.shape != (T,):
            raise bad(f"pca_mean has shape {self.pca_mean.shape}, expected ({T},)")
        if (
            self.pca_components.ndim != 2
            or self.pca_components.shape[1] != T
            or self.pca_components.shape[0] < 1
        ):
            raise bad(f"pca_components has shape {self.pca_components.shape}, expected (p, {T})")
        p = self.pca_components.shape[0]
        if (
            self.centroids_pca.ndim != 2
            or self.centroids_pca.shape[1] != p
            or self.centroids_pca.shape[0] < 1
        ):
            raise bad(f"centroids_pca has shape {self.centroids_pca.shape}, expected (K, {p})")
        K = self.centroids_pca.shape[0]
        if self.centroids_expr.shape != (K, T):
            raise bad(f"centroids_expr has shape {self.centroids_expr.shape}, expected ({K}, {T})")
        if self.cell_counts.shape != (K,):
            raise bad(f"cell_counts has shape {self.cell_counts.shape}, expected ({K},)")
        L = len(self.level_sizes)
        if self.hierarchy.shape != (L, K):
            raise bad(f"hierarchy has shape {self.hierarchy.shape}, expected ({L}, {K}) from level_sizes")
        if L < 1 or self.level_sizes[0] != K:
            raise bad(f"level_sizes {self.level_sizes} must start with K={K}")
        if not np.array_equal(self.hierarchy[0], np.arange(K)):
            raise bad("hierarchy row 0 is not arange(K)")
        for i in range(1, L):
            row, size = self.hierarchy[i], self.level_sizes[i]
            if size >= self.level_sizes[i - 1] or size < 1:
                raise bad(f"level_sizes {self.level_sizes} are not strictly decreasing positive integers")
            if row.min() < 0 or row.max() >= size or np.unique(row).size != size:
                raise bad(f"hierarchy row {i} does not use exactly the labels 0..{size - 1}")
            # Nesting: every label of level i-1 maps to a single label of level i.
            prev = self.hierarchy[i - 1]
            parent = np.full(self.level_sizes[i - 1], -1, dtype=np.int64)
            parent[prev] = row
            if not np.array_equal(parent[prev], row):
                raise bad(f"hierarchy level {i} is not a coarsening of level {i - 1}")
        for name in ("pca_mean", "pca_components", "centroids_pca", "centroids_expr"):
            if not np.isfinite(getattr(self, name)).all():
                raise bad(f"{name} has NaN or infinite values")

    # -- sizes ---------------------------------------------------------------------------------------------------

    @property
    def n_metacells(self) -> int:
        """K, the number of meta-cells (cell tokens)."""
        return int(self.centroids_pca.shape[0])

    @property
    def n_genes(self) -> int:
        """T, the number of genes."""
        return len(self.genes)

    @property
    def n_pcs(self) -> int:
        """p, the number of principal components actually used."""
        return int(self.pca_components.shape[0])

    @property
    def n_levels(self) -> int:
        """Number of hierarchy levels, including level 0 (the meta-cells themselves)."""
        return len(self.level_sizes)

    def __repr__(self) -> str:
        return (
            f"MetaCellVocab(K={self.n_metacells}, genes={self.n_genes}, pcs={self.n_pcs}, "
            f"level_sizes={self.level_sizes})"
        )

    # -- fitting -------------------------------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        X: Any,
        genes: Sequence[str],
        *,
        n_metacells: int = 2048,
        n_pcs: int = 50,
        levels: Sequence[int] = (15, 10, 5),
        seed: int = 0,
        max_cells: int = 200_000,
    ) -> MetaCellVocab:
        """Build the vocabulary: PCA, k-means into ``n_metacells``, then nested k-means for the coarse levels.

        PCA is a randomized SVD with implicit centring (sparse input is never densified; dense input is upcast in
        row chunks). k-means runs on at most ``max_cells`` cells (a seeded subsample); it uses Lloyd's ``KMeans``
        (``n_init=3``) up to 20,000 fit cells and ``MiniBatchKMeans`` (one k-means++ start) above. Every input
        cell is then assigned to its nearest centre, which gives ``centroids_expr`` and ``cell_counts``. Level 1
        clusters the K centres (weighted by their cell counts) into ``levels[0]`` groups, level 2 clusters the
        level-1 group centres into ``levels[1]`` groups, and so on, so every level is a coarsening of the previous
        one. Memory stays near ``n x p`` float64 plus one chunk of ``X``; ``X`` itself is never copied densely.

        Args:
            X: Model-space expression ``log1p(normalize_total(counts, 1e4))``, dense or sparse, columns in
                ``genes`` order.
            genes: The T gene names (unique).
            n_metacells: K, the number of meta-cells. At most the number of (fit) cells.
            n_pcs: Requested PCA dimensions; clamped to ``min(n_pcs, n_fit_cells - 1, T)`` (stored in ``meta``).
            levels: Sizes of the coarse levels, strictly decreasing and below ``n_metacells``; ``()`` for none.
            seed: Seed of the subsample, the PCA range finder and k-means.
            max_cells: Most cells used for PCA and k-means.

        Returns:
            The fitted vocabulary.

        Raises:
            MsfmInputError: Shape/gene mismatch, negative or non-finite values, too many meta-cells for the
                number of cells (or of distinct expression profiles), bad ``levels``.

        Shape:
            X: ``[n, T]``.
        """
        X = _as_matrix(X)
        genes = [str(g) for g in genes]
        n, T = X.shape
        if len(genes) != T:
            msg = (
                f"X has {T} gene columns but {len(genes)} gene names were given; they must match one to one."
            )
            raise MsfmInputError(msg)
        if len(set(genes)) != T:
            dupes = sorted({g for g in genes if genes.count(g) > 1})[:5]
            msg = f"Gene names must be unique; duplicated: {dupes}. Make them unique (var_names_make_unique)."
            raise MsfmInputError(msg)
        K = _positive_int(n_metacells, "n_metacells")
        max_cells = _positive_int(max_cells, "max_cells")
        n_pcs = _positive_int(n_pcs, "n_pcs")
        seed = _seed_int(seed)
        levels = tuple(_positive_int(v, "levels entries") for v in levels)
        sizes = (K, *levels)
        if any(b >= a for a, b in itertools.pairwise(sizes)):
            msg = (
                f"levels={levels} with n_metacells={K}: level sizes must be strictly decreasing and each below the "
                f"previous one (got sizes {sizes}). For example levels=(15, 10, 5) with n_metacells >= 16."
            )
            raise MsfmInputError(msg)
        if n < 2:
            msg = f"X has {n} cells; fitting a meta-cell vocabulary needs at least 2 cells."
            raise MsfmInputError(msg)
        n_fit = min(n, max_cells)
        if K > n_fit:
            where = (
                f"{n} cells" if n_fit == n else f"{n_fit} fit cells (max_cells={max_cells}, {n} cells in X)"
            )
            msg = (
                f"n_metacells={K} but only {where}: every meta-cell needs at least one cell. Use fewer meta-cells, "
                f"for example n_metacells={max(1, n_fit // 4)} (about 4 cells per meta-cell), or give more cells."
            )
            raise MsfmInputError(msg)
        _check_model_space(X)

        rng = np.random.default_rng(seed)
        fit_idx = np.sort(rng.choice(n, size=n_fit, replace=False)) if n_fit < n else np.arange(n)
        X_fit = X[fit_idx] if n_fit < n else X
        p = min(n_pcs, n_fit - 1, T)
        mean, comps, explained, total_var = _randomized_pca(X_fit, p, rng)

        # The vocabulary's own float32 parameters define the PCA space, so fit-time and later assignments agree.
        pca_mean = mean.astype(np.float32)
        pca_components = comps.astype(np.float32)
        P_fit = _project64(X_fit, pca_mean, pca_components)
        minibatch = n_fit > _MINIBATCH_THRESHOLD
        centres, _ = _kmeans(P_fit, K, seed, minibatch=minibatch)
        centroids_pca = _repair_empty_centres(P_fit, centres.astype(np.float32))

        labels = (
            _nearest(P_fit, centroids_pca)
            if n_fit == n
            else _nearest(_project64(X, pca_mean, pca_components), centroids_pca)
        )
        cell_counts = np.bincount(labels, minlength=K).astype(np.int64)
        centroids_expr = _group_means(X, labels, K, cell_counts)

        hierarchy = [np.arange(K, dtype=np.int64)]
        points = centroids_pca.astype(np.float64)
        weights = cell_counts.astype(np.float64)
        for i, k in enumerate(levels, start=1):
            # Weighted k-means on the previous level's group centres (weights = cells per group).
            _, lab = _kmeans(points, k, seed + i, weights=weights)
            lab = _fill_empty_labels(points, lab, k)
            row = lab[hierarchy[-1]]
            remap = _relabel_by_first_appearance(row, k)
            lab, row = remap[lab], remap[row]
            hierarchy.append(row)
            group_w = np.bincount(lab, weights=weights, minlength=k)
            group_pts = np.zeros((k, points.shape[1]))
            np.add.at(group_pts, lab, points * weights[:, None])
            points, weights = group_pts / group_w[:, None], group_w

        meta = {
            "n_cells": int(n),
            "n_fit_cells": int(n_fit),
            "n_metacells": int(K),
            "n_pcs_requested": int(n_pcs),
            "n_pcs": int(p),
            "levels": [int(v) for v in levels],
            "seed": int(seed),
            "max_cells": int(max_cells),
            "kmeans": "MiniBatchKMeans" if minibatch else "KMeans",
            "pca": "randomized_svd_implicit_centring",
            "explained_variance_ratio": [float(v / total_var) if total_var > 0 else 0.0 for v in explained],
            "input": "model space: log1p(normalize_total(counts, 1e4))",
        }
        return cls(
            genes=genes,
            pca_mean=pca_mean,
            pca_components=pca_components,
            centroids_pca=centroids_pca,
            centroids_expr=centroids_expr,
            hierarchy=np.stack(hierarchy),
            level_sizes=sizes,
            cell_counts=cell_counts,
            meta=meta,
        )

    # -- use -----------------------------------------------------------------------------------------------------

    def _checked(self, X: Any) -> np.ndarray | sp.csr_matrix:
        X = _as_matrix(X)
        if X.shape[1] != self.n_genes:
            msg = (
                f"X has {X.shape[1]} gene columns; this vocabulary expects {self.n_genes} genes in vocab.genes "
                "order. Subset and reorder the columns to vocab.genes first (missing genes as zeros)."
            )
            raise MsfmInputError(msg)
        _check_model_space(X)
        return X

    def project(self, X: Any) -> np.ndarray:
        """PCA coordinates of cells.

        Args:
            X: Model-space expression, dense or sparse, columns in :attr:`genes` order.

        Returns:
            ``(X - pca_mean) @ pca_components.T`` computed in float64, returned as float32.

        Raises:
            MsfmInputError: Wrong number of genes, negative or non-finite values.

        Shape:
            X ``[n, T]`` -> ``[n, p]``.
        """
        return _project64(self._checked(X), self.pca_mean, self.pca_components).astype(np.float32)

    def assign(self, X: Any, *, batch_size: int | None = None) -> np.ndarray:
        """Meta-cell token of every cell: the nearest centre in PCA space (ties -> lowest index).

        Args:
            X: Model-space expression, dense or sparse, columns in :attr:`genes` order.
            batch_size: Cells per distance block; default keeps the ``[batch, K]`` block near 128 MB.

        Returns:
            Token ids in ``0..K-1``.

        Raises:
            MsfmInputError: Wrong number of genes, negative or non-finite values.

        Shape:
            X ``[n, T]`` -> ``[n]`` int64.
        """
        P = _project64(self._checked(X), self.pca_mean, self.pca_components)
        return _nearest(P, self.centroids_pca, batch_size)

    def level_of(self, tokens: Any, level: int) -> Any:
        """Labels of meta-cell tokens at a hierarchy level.

        Negative entries (padding / ``ignore_index`` such as -100) pass through unchanged, so padded target
        tensors can be mapped directly.

        Args:
            tokens: Meta-cell ids, a numpy array (or sequence) or a torch tensor.
            level: ``0`` (the tokens themselves) to ``n_levels - 1``.

        Returns:
            Labels in ``0..level_sizes[level]-1``, same type (and device) and shape as ``tokens``.

        Raises:
            MsfmInputError: ``level`` or a token id out of range.
        """
        if not isinstance(level, int | np.integer) or not 0 <= int(level) < self.n_levels:
            msg = f"level={level!r}; expected an integer in 0..{self.n_levels - 1} (level_sizes {self.level_sizes})."
            raise MsfmInputError(msg)
        table = self.hierarchy[int(level)]
        is_torch = hasattr(tokens, "detach") and hasattr(tokens, "device")
        arr = tokens.detach().cpu().numpy() if is_torch else np.asarray(tokens)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            msg = f"tokens have dtype {arr.dtype}; expected integer meta-cell ids."
            raise MsfmInputError(msg)
        if arr.size and int(arr.max()) >= self.n_metacells:
            msg = f"token id {int(arr.max())} is out of range; this vocabulary has {self.n_metacells} meta-cells."
            raise MsfmInputError(msg)
        out = np.where(arr >= 0, table[np.clip(arr, 0, None)], arr).astype(np.int64)
        if is_torch:
            import torch

            return torch.from_numpy(out).to(tokens.device)
        return out

    # -- persistence ---------------------------------------------------------------------------------------------

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The arrays as CPU tensors (float32 / int64), named like the attributes."""
        import torch

        return {name: torch.from_numpy(np.array(getattr(self, name))) for name in _TENSOR_NAMES}

    def meta_dict(self) -> dict[str, Any]:
        """JSON-serialisable description (format, genes, level sizes, fit metadata) to go with :meth:`to_tensors`."""
        return {
            "format": _VOCAB_FORMAT,
            "format_version": _VOCAB_FORMAT_VERSION,
            "genes": list(self.genes),
            "level_sizes": list(self.level_sizes),
            "meta": json.loads(json.dumps(self.meta)),
        }

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Any], meta: Mapping[str, Any]) -> MetaCellVocab:
        """Rebuild a vocabulary from :meth:`to_tensors` and :meth:`meta_dict` output.

        Raises:
            CheckpointError: Missing arrays, unknown format or inconsistent shapes.
        """
        if meta.get("format") != _VOCAB_FORMAT:
            msg = f"Metadata format is {meta.get('format')!r}; expected {_VOCAB_FORMAT!r} (MetaCellVocab.meta_dict())."
            raise CheckpointError(msg)
        if int(meta.get("format_version", 0)) > _VOCAB_FORMAT_VERSION:
            msg = (
                f"Meta-cell vocabulary format version {meta.get('format_version')} is newer than this msfm supports "
                f"({_VOCAB_FORMAT_VERSION}); upgrade msfm."
            )
            raise CheckpointError(msg)
        missing = [name for name in _TENSOR_NAMES if name not in tensors]
        if missing or "genes" not in meta or "level_sizes" not in meta:
            msg = f"Meta-cell vocabulary lacks {missing or ['genes/level_sizes metadata']}; expected {_TENSOR_NAMES}."
            raise CheckpointError(msg)

        def arr(v: Any) -> np.ndarray:
            return v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)

        return cls(
            genes=list(meta["genes"]),
            level_sizes=tuple(meta["level_sizes"]),
            meta=dict(meta.get("meta", {})),
            **{name: arr(tensors[name]) for name in _TENSOR_NAMES},
        )

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (``.safetensors``: arrays + JSON metadata in the header) and a readable ``.json`` sidecar.

        Both writes are atomic. The safetensors file is self-contained (:meth:`load` reads its header); the sidecar
        (same name, ``.json`` suffix) is a human-readable copy of :meth:`meta_dict`, written first.

        Returns:
            The ``.safetensors`` path.

        Raises:
            MsfmInputError: ``path`` does not end in ``.safetensors`` or its folder does not exist.
        """
        from msfm.runtime.atomic import atomic_write_json
        from msfm.runtime.safetensors import write_safetensors_atomic

        path = Path(path)
        if path.suffix != ".safetensors":
            msg = f"Meta-cell vocabulary path {path} must end in '.safetensors' (a JSON sidecar is written next to it)."
            raise MsfmInputError(msg)
        meta = self.meta_dict()
        atomic_write_json(path.with_suffix(".json"), meta)
        write_safetensors_atomic(self.to_tensors(), path, metadata={_SAFETENSORS_META_KEY: json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> MetaCellVocab:
        """Read a vocabulary written by :meth:`save` (metadata from the header, else from the sidecar).

        Raises:
            MsfmInputError: The file does not exist.
            CheckpointError: The file is not a meta-cell vocabulary or is inconsistent.
        """
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            msg = f"Meta-cell vocabulary {path} does not exist. Pass the .safetensors file written by save()."
            raise MsfmInputError(msg)
        try:
            with safe_open(str(path), framework="numpy") as fh:
                header = fh.metadata() or {}
                tensors = {name: fh.get_tensor(name) for name in fh.keys()}
        except (SafetensorError, OSError) as err:
            msg = (
                f"{path} is not a readable safetensors file ({err}). Re-create it with MetaCellVocab.save()."
            )
            raise CheckpointError(msg) from None
        if _SAFETENSORS_META_KEY in header:
            meta = json.loads(header[_SAFETENSORS_META_KEY])
        elif path.with_suffix(".json").is_file():
            meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        else:
            msg = f"{path} has no meta-cell vocabulary metadata and no .json sidecar; it was not written by save()."
            raise CheckpointError(msg)
        return cls.from_tensors(tensors, meta)
