"""In-silico spatial perturbation (paper §5.4, Fig. 4): edit genes in a region, regenerate the cells around it.

1. **Control**: the region's cells are context as they are; the cells around it (by default a ring of
   ``ring_um``) are generated.
2. **Perturbed**: the region's expression is edited (``genes_up`` / ``genes_down`` set to a quantile, scaled, or
   shifted by a log fold change), then the same positions are generated again.
3. **Report**: per-gene change of the regenerated cells (perturbed - control in log1p space, paired Wilcoxon,
   BH FDR), how many region cells changed meta-cell token, optional agreement with reference DEGs.

Inputs are quantised to meta-cells, so an edit reaches the model only if it moves a region cell to another
meta-cell ("requantize", as in the paper): small edits can be silent no-ops, and ``n_region_tokens_changed`` says
so. ``perturb_mode="continuous"`` (**an msfm extension, not in the paper**) feeds the edited expression of the
region cells through the content projection directly, so every edit reaches the model; its control feeds the
unedited expression the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from msfm.data.spatial import read_positions
from msfm.errors import MsfmInputError
from msfm.eval.spatial import perturbation_report, perturbation_summary
from msfm.models.gest.checkpoint import CheckpointLike, generative_model, load, window_settings
from msfm.models.gest.data import cell_selection, spatial_cells
from msfm.models.gest.files import DataLike, read_data
from msfm.models.gest.generation import generate_arrays
from msfm.models.gest.options import GenerationOptions, split_options
from msfm.runtime.adata import store_uns
from msfm.runtime.atomic import atomic_dir, atomic_write_json, atomic_write_text, check_output_free
from msfm.runtime.h5ad import check_output
from msfm.runtime.jsonable import to_jsonable
from msfm.runtime.results import Result

logger = logging.getLogger(__name__)

__all__ = ["GestPerturbation", "edit_expression", "perturb", "region_mask"]

How = Literal["set_quantile", "scale", "add_log_fc"]
DEFAULT_AMOUNT = {"set_quantile": 0.95, "scale": 4.0, "add_log_fc": 1.0}


def region_mask(
    xy: np.ndarray,
    adata: AnnData,
    *,
    box: tuple[float, float, float, float] | None = None,
    polygon: np.ndarray | None = None,
    cells: Any = None,
    scale: float = 1.0,
) -> np.ndarray:
    """Cells of the perturbed region, from exactly one of a box, a polygon or a cell selection.

    Args:
        xy: cell positions in µm.
        adata: the data (for cell selections by name or column).
        box: ``(x0, y0, x1, y1)`` in the units of ``obsm['spatial']``.
        polygon: ``[k, 2]`` vertices (k >= 3) in the units of ``obsm['spatial']``, or a CSV/TSV file with ``x``
            and ``y`` columns.
        cells: mask, obs column, names or positions.
        scale: µm per coordinate unit.

    Returns:
        Boolean mask over the cells.

    Raises:
        MsfmInputError: none or several region specs, a malformed box/polygon, or a region with no cell.
    """
    given = [name for name, v in (("box", box), ("polygon", polygon), ("cells", cells)) if v is not None]
    if len(given) != 1:
        msg = (
            f"Give exactly one region: region_box=, region_polygon= or region_cells=; got {given or 'none'}."
        )
        raise MsfmInputError(msg)
    if box is not None:
        b = np.asarray(box, dtype=np.float64).ravel()
        if b.size != 4 or not (b[2] > b[0] and b[3] > b[1]):
            msg = f"region_box must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0; got {tuple(b.tolist())}."
            raise MsfmInputError(msg)
        b = b * scale
        mask = (xy[:, 0] >= b[0]) & (xy[:, 0] <= b[2]) & (xy[:, 1] >= b[1]) & (xy[:, 1] <= b[3])
        what = f"box {tuple(np.round(b, 1).tolist())} µm"
    elif polygon is not None:
        from matplotlib.path import Path as MplPath

        if isinstance(polygon, str | os.PathLike):
            polygon = read_positions(polygon, what="region_polygon")
        poly = np.asarray(polygon, dtype=np.float64)
        if poly.ndim != 2 or poly.shape[1] != 2 or poly.shape[0] < 3:
            msg = f"region_polygon must be [k, 2] vertices with k >= 3; got shape {poly.shape}."
            raise MsfmInputError(msg)
        mask = MplPath(poly * scale).contains_points(xy)
        what = f"polygon with {poly.shape[0]} vertices"
    else:
        mask = cell_selection(adata, cells, "region_cells")
        what = "the cell selection"
    if not mask.any():
        lo, hi = xy.min(axis=0), xy.max(axis=0)
        msg = (
            f"The region ({what}) contains no cell. The cells span x {lo[0]:.0f}..{hi[0]:.0f} and y "
            f"{lo[1]:.0f}..{hi[1]:.0f} µm; check the units of the region (those of obsm['spatial'])."
        )
        raise MsfmInputError(msg)
    return mask


def _gene_columns(genes: list[str], asked: list[str], what: str) -> np.ndarray:
    index = {g: i for i, g in enumerate(genes)}
    missing = [g for g in asked if g not in index]
    if missing:
        hints = {g: difflib.get_close_matches(g, genes, n=2) for g in missing[:5]}
        msg = (
            f"{what}: {len(missing)} genes are not among the model's {len(genes)} genes: {missing[:10]}. "
            f"Closest names: {hints}. Only genes of the model's panel can be edited."
        )
        raise MsfmInputError(msg)
    return np.asarray([index[g] for g in asked], dtype=np.int64)


def edit_expression(
    expr: np.ndarray,
    reference: np.ndarray,
    up: np.ndarray,
    down: np.ndarray,
    *,
    how: How,
    amount: float,
) -> np.ndarray:
    """Edit model-space (log1p) expression of some genes.

    * ``set_quantile``: up-genes are set to the ``amount`` quantile of the gene over ``reference`` (all cells),
      down-genes to the ``1 - amount`` quantile.
    * ``scale``: depth-normalised expression (linear space) is multiplied by ``amount`` (up) or divided by it
      (down): ``log1p(expm1(x) * amount)``.
    * ``add_log_fc``: ``amount`` is added to the log1p value (up) or subtracted, floored at 0 (down).

    Shape:
        - expr: ``[n, T]`` cells to edit; reference: ``[N, T]``
        - up, down: gene column indices
        - returns: ``[n, T]`` edited copy
    """
    out = np.array(expr, dtype=np.float32, copy=True)
    if how == "set_quantile":
        if not 0.0 < amount < 1.0:
            msg = f"how='set_quantile' needs 0 < amount < 1 (the quantile); got {amount}."
            raise MsfmInputError(msg)
        if up.size:
            out[:, up] = np.quantile(reference[:, up], amount, axis=0)
        if down.size:
            out[:, down] = np.quantile(reference[:, down], 1.0 - amount, axis=0)
    elif how == "scale":
        if amount <= 0:
            msg = f"how='scale' needs amount > 0 (a linear factor); got {amount}."
            raise MsfmInputError(msg)
        out[:, up] = np.log1p(np.expm1(out[:, up]) * amount)
        out[:, down] = np.log1p(np.expm1(out[:, down]) / amount)
    elif how == "add_log_fc":
        out[:, up] = out[:, up] + amount
        out[:, down] = np.maximum(out[:, down] - amount, 0.0)
    else:
        msg = f"how must be 'set_quantile', 'scale' or 'add_log_fc'; got {how!r}."
        raise MsfmInputError(msg)
    return out


def _edit_text(params: dict[str, Any]) -> str | None:
    """The edit in words for the figure title, e.g. "genes set up: A, B; down: C (0.95 quantile, requantize)"."""
    up, down = list(params.get("genes_up") or []), list(params.get("genes_down") or [])
    if not up and not down:
        return None

    def names(genes: list[str]) -> str:
        return ", ".join(genes[:4]) + (f" +{len(genes) - 4} more" if len(genes) > 4 else "")

    parts = [f"up: {names(up)}"] * bool(up) + [f"down: {names(down)}"] * bool(down)
    a = float(params.get("amount", 0.0))
    how = {
        "set_quantile": f"to the {a:g} / {1 - a:g} quantile",
        "scale": f"counts x{a:g} / divided by {a:g}",
        "add_log_fc": f"log1p +{a:g} / -{a:g}",
    }
    detail = how.get(str(params.get("how")), "")
    extra = ", ".join(x for x in (detail, str(params.get("perturb_mode") or "")) if x)
    return "genes set " + "; ".join(parts) + (f" ({extra})" if extra else "")


@dataclasses.dataclass(frozen=True)
class GestPerturbation(Result):
    """Control and perturbed generation around an edited region (what :func:`perturb` returns).

    Attributes:
        adata: the region and target cells x the model's genes. ``layers['control']`` and ``layers['perturbed']``
            (``X`` = perturbed); for region cells these are the original and the edited expression, for target
            cells the generated ones. ``obs['gest_role']`` (``region``/``target``), ``obs['gest_token_control']``,
            ``obs['gest_token_perturbed']``, ``obsm['spatial']`` (µm), ``uns['gest']['perturb']``.
        report: per-gene change over the target cells (see :func:`msfm.eval.spatial.perturbation_report`).
        summary: counts (region cells, tokens changed, targets), mean absolute change, reference agreement.
        params: the call's parameters.
    """

    adata: AnnData
    report: pd.DataFrame
    summary: dict[str, Any]
    params: dict[str, Any] = dataclasses.field(default_factory=dict)

    def figure(self, genes: list[str] | None = None, *, n_genes: int = 3, save: Any = None) -> Any:
        """Control | perturbed | difference maps of a few genes plus the top log fold changes."""
        from msfm.pl.spatial_figures import perturbation_figure

        a = self.adata
        role = a.obs["gest_role"].to_numpy()
        return perturbation_figure(
            a.obsm["spatial"],
            a.layers["control"],
            a.layers["perturbed"],
            genes,
            list(a.var_names),
            region_mask=role == "region",
            target_mask=role == "target",
            report=self.report,
            n_genes=n_genes,
            edit=_edit_text(self.params),
            save=save,
        )

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the folder ``path`` atomically.

        Files: ``perturbation.h5ad`` (:attr:`adata`), ``report.csv`` (per gene), ``summary.json`` (the summary
        with the parameters under ``params``) and ``perturbation.png`` (:meth:`figure`).

        Raises:
            MsfmInputError: ``path`` exists and ``overwrite`` is False.
        """
        from msfm.runtime.h5ad import write_h5ad_atomic

        target = check_output_free(path, overwrite=overwrite)
        with atomic_dir(target) as tmp:
            write_h5ad_atomic(self.adata, tmp / "perturbation.h5ad")
            atomic_write_text(tmp / "report.csv", self.report.to_csv(index_label="gene"))
            atomic_write_json(tmp / "summary.json", to_jsonable({**self.summary, "params": self.params}))
            fig = self.figure(save=tmp / "perturbation.png")
            import matplotlib.pyplot as plt  # msfm.pl already selected the headless backend

            plt.close(fig)
        return target


def perturb(
    data: DataLike,
    checkpoint: CheckpointLike,
    *,
    region_box: tuple[float, float, float, float] | None = None,
    region_polygon: Any = None,
    region_cells: Any = None,
    genes_up: list[str] | tuple[str, ...] = (),
    genes_down: list[str] | tuple[str, ...] = (),
    how: How = "set_quantile",
    amount: float | None = None,
    targets: Any = None,
    ring_um: float | None = None,
    context: Literal["region", "all"] = "region",
    perturb_mode: Literal["requantize", "continuous"] = "requantize",
    n_samples: int = 1,
    generation: GenerationOptions | None = None,
    seed: int = 0,
    reference_up: list[str] | None = None,
    reference_down: list[str] | None = None,
    reference_profile: np.ndarray | None = None,
    batch_size: int = 16,
    device: str = "auto",
    progress: bool = True,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    **options: Any,
) -> GestPerturbation:
    """Edit genes in a region and compare the regenerated surroundings with a control generation.

    Args:
        data: cells with coordinates and expression (AnnData, file or Visium folder); never modified.
        checkpoint: a GeST checkpoint (``RUN/model``, a ``TrainResult`` or a ``Loaded``).
        region_box, region_polygon, region_cells: the region (exactly one; coordinates in ``obsm`` units; the
            polygon as ``[k, 2]`` vertices or a CSV/TSV file with ``x``, ``y`` columns; the cells as a mask,
            boolean obs column, names or positions).
        genes_up, genes_down: genes pushed up / down in the region (model genes only).
        how: ``set_quantile`` (default amount 0.95), ``scale`` (linear factor, default 4) or ``add_log_fc``
            (added to log1p values, default 1.0).
        amount: the size of the edit (see ``how``).
        targets: cells to regenerate (default: cells outside the region within ``ring_um`` of it).
        ring_um: ring width (default: a quarter of the window side).
        context: ``region``: only region cells are known, as in the paper; ``all``: every non-target cell is known.
        perturb_mode: ``requantize`` (paper) or ``continuous`` (msfm extension, see the module docstring).
        n_samples: draws averaged with ``mode='sample'`` (same seeds for control and perturbed).
        generation: :class:`~msfm.models.gest.options.GenerationOptions`; here ``mode`` defaults to
            ``weighted`` (responds smoothly to changed probabilities; ``pick`` changes only when a chosen token
            changes; ``sample`` averages ``n_samples`` draws).
        seed: seed of serialisation and sampling.
        reference_up, reference_down, reference_profile: optional reference DEGs / profile to score the direction
            of change and the correlation of generated cells with a reference state.
        batch_size: windows per forward pass.
        device: ``auto``, ``cpu``, ``cuda``, ...
        progress: show progress bars.
        out: also save the result to this folder (:meth:`GestPerturbation.save`).
        overwrite: replace an existing ``out``.
        **options: generation options (``mode``, ``temperature``, ``side_um``, ...) and reading options
            (:class:`msfm.data.SpatialReadOptions`).

    Returns:
        A :class:`GestPerturbation`.

    Raises:
        MsfmInputError: bad region, no edit requested, unknown genes, no target cell, an unknown keyword.
    """
    gen, read = split_options(
        options,
        verb_parameters=("region_box", "region_polygon", "region_cells", "genes_up", "genes_down", "how",
                         "amount", "targets", "ring_um", "context", "perturb_mode", "n_samples", "seed"),
        generation=generation,
        default_mode="weighted",
    )  # fmt: skip
    if not genes_up and not genes_down:
        msg = "Nothing to perturb: give genes_up= and/or genes_down= (genes of the model's panel)."
        raise MsfmInputError(msg)
    if n_samples < 1:
        msg = f"n_samples must be >= 1; got {n_samples}."
        raise MsfmInputError(msg)
    if how not in DEFAULT_AMOUNT:
        msg = f"how must be one of {sorted(DEFAULT_AMOUNT)}; got {how!r}."
        raise MsfmInputError(msg)
    if context not in ("region", "all"):
        msg = f"context must be 'region' or 'all'; got {context!r}."
        raise MsfmInputError(msg)
    if perturb_mode not in ("requantize", "continuous"):
        msg = f"perturb_mode must be 'requantize' or 'continuous'; got {perturb_mode!r}."
        raise MsfmInputError(msg)
    amount = float(DEFAULT_AMOUNT[how] if amount is None else amount)
    target_dir = check_output(out, overwrite=overwrite, data=data)
    adata = read_data(data)
    loaded = load(checkpoint, device=device)
    generative_model(loaded, "perturb")
    genes = list(loaded.vocab.genes)
    up = _gene_columns(genes, list(genes_up), "genes_up")
    down = _gene_columns(genes, list(genes_down), "genes_down")
    both = sorted(set(genes_up) & set(genes_down))
    if both:
        msg = f"genes {both} are in both genes_up and genes_down."
        raise MsfmInputError(msg)
    cells = spatial_cells(adata, genes, read)
    xy, section = cells.xy, cells.section
    region = region_mask(
        xy, adata, box=region_box, polygon=region_polygon, cells=region_cells, scale=cells.coords.scale
    )
    side = float(gen.side_um or window_settings(loaded).side_um)
    ring = float(ring_um if ring_um is not None else side / 4.0)
    if targets is None:
        from scipy.spatial import cKDTree

        d, _ = cKDTree(xy[region]).query(xy, k=1)
        same = np.isin(section, np.unique(section[region]))
        target = (~region) & same & (d <= ring)
    else:
        target = cell_selection(adata, targets, "targets") & ~region
    if not target.any():
        msg = f"No target cell: no cell lies outside the region within ring_um={ring:.0f} µm of it; increase ring_um."
        raise MsfmInputError(msg)
    extent = np.ptp(xy[region | target], axis=0).max()
    if extent > side:
        logger.warning(
            "region plus targets span %.0f µm, more than the window side %.0f µm; windows are tiled and far targets "
            "see only part of the region.",
            extent,
            side,
        )
    expr = cells.dense()
    original = expr[region]
    edited = edit_expression(original, expr, up, down, how=how, amount=float(amount))
    tok_orig = loaded.vocab.assign(original)
    tok_edit = loaded.vocab.assign(edited)
    changed = tok_orig != tok_edit
    if perturb_mode == "requantize" and not changed.any():
        logger.warning(
            "The edit moved none of the %d region cells to another meta-cell: with perturb_mode='requantize' the "
            "model input is unchanged and the perturbation is a no-op. Use a stronger edit or "
            "perturb_mode='continuous'.",
            int(region.sum()),
        )
    known = region.copy() if context == "region" else ~target
    other = known & ~region
    k_idx = np.concatenate([np.flatnonzero(region), np.flatnonzero(other)])
    other_tokens = loaded.vocab.assign(expr[other]) if other.any() else np.zeros(0, dtype=np.int64)
    t_idx = np.flatnonzero(target)

    def run(region_tokens: np.ndarray, region_expr: np.ndarray, s: int) -> tuple[np.ndarray, np.ndarray]:
        known_expr = None
        if perturb_mode == "continuous":
            known_expr = np.concatenate([region_expr, loaded.vocab.centroids_expr[other_tokens]])
        res, _ = generate_arrays(
            loaded,
            xy[k_idx],
            np.concatenate([region_tokens, other_tokens]),
            xy[t_idx],
            known_section=section[k_idx],
            query_section=section[t_idx],
            known_expr=known_expr,
            generation=gen,
            seed=s,
            batch_size=batch_size,
            progress=progress,
        )
        return res["expr"], res["tokens"]

    draws = n_samples if gen.mode == "sample" else 1
    ctrl_runs = [run(tok_orig, original, seed + i) for i in range(draws)]
    pert_runs = [run(tok_edit, edited, seed + i) for i in range(draws)]
    control = np.mean([r[0] for r in ctrl_runs], axis=0)
    perturbed = np.mean([r[0] for r in pert_runs], axis=0)
    report = perturbation_report(
        control,
        perturbed,
        genes,
        reference_up=reference_up,
        reference_down=reference_down,
        reference_profile=reference_profile,
    )
    summary = perturbation_summary(
        report,
        reference_up=reference_up,
        reference_down=reference_down,
        control=control if reference_profile is not None else None,
        perturbed=perturbed if reference_profile is not None else None,
        reference_profile=reference_profile,
    )
    summary.update(
        {
            "n_region_cells": int(region.sum()),
            "n_region_tokens_changed": int(changed.sum()),
            "n_targets": int(t_idx.size),
            "n_target_tokens_changed": int((ctrl_runs[0][1] != pert_runs[0][1]).sum()),
            "mean_abs_change": float(np.abs(perturbed - control).mean()),
            "max_abs_log_fc": float(np.abs(report["log_fc"]).max()),
            "no_op": bool(perturb_mode == "requantize" and not changed.any()),
        }
    )
    params = {
        "genes_up": list(genes_up),
        "genes_down": list(genes_down),
        "how": how,
        "amount": float(amount),
        "ring_um": ring,
        "context": context,
        "perturb_mode": perturb_mode,
        "perturb_mode_note": "continuous is an msfm extension, not in the GeST paper"
        if perturb_mode == "continuous"
        else "",
        "mode": gen.mode,
        "temperature": gen.temperature,
        "n_samples": draws,
        "seed": seed,
        "side_um": side,
        "checkpoint": str(loaded.path) if loaded.path else None,
    }
    r_idx = np.flatnonzero(region)
    rows = np.concatenate([r_idx, t_idx])
    result_adata = AnnData(
        X=np.concatenate([edited, perturbed]).astype(np.float32),
        obs=pd.DataFrame(
            {
                "gest_role": pd.Categorical(["region"] * r_idx.size + ["target"] * t_idx.size),
                "gest_token_control": np.concatenate([tok_orig, ctrl_runs[0][1]]),
                "gest_token_perturbed": np.concatenate([tok_edit, pert_runs[0][1]]),
            },
            index=pd.Index(adata.obs_names[rows].astype(str)),
        ),
        var=pd.DataFrame(index=pd.Index(genes)),
    )
    result_adata.layers["control"] = np.concatenate([original, control]).astype(np.float32)
    result_adata.layers["perturbed"] = np.concatenate([edited, perturbed]).astype(np.float32)
    result_adata.obsm["spatial"] = xy[rows]
    result_adata.uns["msfm_spatial"] = {"unit": "um", "um_per_unit": 1.0}
    store_uns(
        result_adata, "gest", "perturb", {**params, **{k: v for k, v in summary.items() if np.ndim(v) == 0}}
    )
    result = GestPerturbation(adata=result_adata, report=report, summary=summary, params=params)
    if target_dir is not None:
        result.save(target_dir, overwrite=overwrite)
    return result
