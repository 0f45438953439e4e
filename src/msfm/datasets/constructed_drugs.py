"""CONSTRUCTED drug-response data for testing the drug tasks end to end (no real drug response is measured here).

No drug-response data set ships in any package msfm can reach, so this module builds one reproducibly:

* "cell lines": pseudo-bulk profiles made from REAL cells of :func:`msfm.datasets.pbmc68k` (raw counts of
  ``n_cells`` cells summed, the cells drawn from four lineages with random Dirichlet mixture weights);
* drugs: 19 well-known drugs with their SMILES (public facts, written down here from memory of PubChem's canonical
  SMILES; they all parse with RDKit, but check PubChem before relying on one);
* a PLANTED response rule: ``ln IC50[c, d] = base_d + sum_p w_dp * score_cp + noise``, where ``score_cp`` are
  z-scored marker-gene program scores of the cell line's expression (myeloid, T, B, NK) and ``base_d``,
  ``w_dp`` are fixed functions of the drug's Morgan fingerprint (random projections, seeded);
* single cells for the SCAD task: the real pbmc68k cells, labelled by the same rule (sensitive when
  ``sum_p w_dp * score_cp < 0``, scores z-scored within the single cells).

Everything carries ``uns["dataset"]["constructed"] = True``. Numbers measured on it say that the pipeline learns a
planted rule, nothing about real drugs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = [
    "DRUG_SMILES",
    "ConstructedDrugData",
    "constructed_drug_response",
    "constructed_info",
    "constructed_sensitivity",
]

#: Drug name -> SMILES (recalled from PubChem; constructed data only).
DRUG_SMILES: dict[str, str] = {
    "Sorafenib": "CNC(=O)c1cc(Oc2ccc(NC(=O)Nc3ccc(Cl)c(C(F)(F)F)c3)cc2)ccn1",
    "Erlotinib": "COCCOc1cc2ncnc(Nc3cccc(C#C)c3)c2cc1OCCOC",
    "Gefitinib": "COc1cc2ncnc(Nc3ccc(F)c(Cl)c3)c2cc1OCCCN1CCOCC1",
    "Imatinib": "Cc1ccc(NC(=O)c2ccc(CN3CCN(C)CC3)cc2)cc1Nc1nccc(-c2cccnc2)n1",
    "Lapatinib": "CS(=O)(=O)CCNCc1ccc(-c2ccc3ncnc(Nc4ccc(OCc5cccc(F)c5)c(Cl)c4)c3c2)o1",
    "Etoposide": "COc1cc(cc(OC)c1O)[C@H]1[C@@H]2[C@H](COC2=O)[C@H](O[C@@H]2O[C@@H]3CO[C@@H](C)O[C@H]3[C@H](O)[C@H]2O)c2cc3OCOc3cc12",
    "Cisplatin": "N.N.Cl[Pt]Cl",
    "Doxorubicin": "COc1cccc2C(=O)c3c(O)c4C[C@](O)(C[C@H](O[C@H]5C[C@H](N)[C@H](O)[C@H](C)O5)c4c(O)c3C(=O)c12)C(=O)CO",
    "Fluorouracil": "Fc1c[nH]c(=O)[nH]c1=O",
    "Methotrexate": "CN(Cc1cnc2nc(N)nc(N)c2n1)c1ccc(cc1)C(=O)N[C@@H](CCC(O)=O)C(O)=O",
    "Gemcitabine": "Nc1ccn([C@@H]2O[C@H](CO)[C@@H](O)C2(F)F)c(=O)n1",
    "Vorinostat": "ONC(=O)CCCCCCC(=O)Nc1ccccc1",
    "PLX4720": "CCCS(=O)(=O)Nc1ccc(F)c(C(=O)c2c[nH]c3ncc(Cl)cc23)c1F",
    "Dasatinib": "Cc1nc(Nc2ncc(C(=O)Nc3c(C)cccc3Cl)s2)cc(N2CCN(CCO)CC2)n1",
    "Nilotinib": "Cc1cn(-c2cc(NC(=O)c3ccc(C)c(Nc4nccc(-c5cccnc5)n4)c3)cc(C(F)(F)F)c2)cn1",
    "Bortezomib": "CC(C)C[C@H](NC(=O)[C@@H](Cc1ccccc1)NC(=O)c1cnccn1)B(O)O",
    "Olaparib": "O=C(c1cc(Cc2n[nH]c(=O)c3ccccc23)ccc1F)N1CCN(C(=O)C2CC2)CC1",
    "Tamoxifen": "CC/C(=C(\\c1ccccc1)c1ccc(OCCN(C)C)cc1)c1ccccc1",
    "NVP-TAE684": "COc1cc(N2CCC(N3CCN(C)CC3)CC2)ccc1Nc1ncc(Cl)c(Nc2ccccc2S(=O)(=O)C(C)C)n1",
}

#: Marker genes of the four expression programs of the planted rule.
PROGRAMS: dict[str, tuple[str, ...]] = {
    "myeloid": ("LYZ", "S100A8", "S100A9", "CST3", "FCN1", "FCER1G", "TYROBP"),
    "t_cell": ("CD3D", "CD3E", "IL7R", "CD2", "LTB", "IL32"),
    "b_cell": ("CD79A", "CD79B", "MS4A1", "CD74", "HLA-DRA"),
    "nk": ("NKG7", "GNLY", "GZMB", "PRF1", "CCL5"),
}
#: pbmc68k cell types of each lineage the pseudo-bulk mixtures draw from.
LINEAGES: dict[str, tuple[str, ...]] = {
    "myeloid": ("CD14+ Monocyte", "Dendritic", "CD34+"),
    "t_cell": (
        "CD4+/CD25 T Reg",
        "CD8+ Cytotoxic T",
        "CD8+/CD45RA+ Naive Cytotoxic",
        "CD4+/CD45RO+ Memory",
        "CD4+/CD45RA+/CD25- Naive T",
    ),
    "b_cell": ("CD19+ B",),
    "nk": ("CD56+ NK",),
}
_RULE_SEED = 20240611
_RULE = (
    "ln_ic50[c, d] = base_d + sum_p w_dp * score_cp + N(0, noise^2); score_cp = z-scored mean log1p-CP10k of the "
    "marker genes of program p (myeloid, t_cell, b_cell, nk) in cell line c; base_d = 2 + 1.5 tanh(fp_d . u / "
    "sqrt|fp_d|), w_dp = 1.5 tanh(fp_d . V_p / sqrt|fp_d|) with Morgan(r=2, 1024 bits) fingerprint fp_d and "
    f"Gaussian u, V (seed {_RULE_SEED}). Single cells: sensitive iff sum_p w_dp * score_cp < 0."
)


@dataclass(frozen=True)
class ConstructedDrugData:
    """Constructed drug-response data (see the module docstring).

    Attributes:
        expression: cell lines x genes, raw counts (``X`` and ``layers["counts"]``), ``obs`` program scores.
        drugs: ``drug_id, smiles``.
        responses: ``cell_line, drug_id, ln_ic50``.
        rule: ``base`` (per drug) and ``weights`` (drug x program) of the planted rule.
    """

    expression: ad.AnnData
    drugs: pd.DataFrame
    responses: pd.DataFrame
    rule: dict[str, pd.DataFrame | pd.Series]


def _scores(adata: ad.AnnData) -> np.ndarray:
    """``[n, 4]`` mean log1p-CP10k of each program's markers (not yet z-scored)."""
    from msfm.data.normalize import log1p_cp10k

    counts = adata.layers["counts"] if "counts" in adata.layers else adata.X
    norm = log1p_cp10k(counts)
    cols = []
    for genes in PROGRAMS.values():
        idx = [adata.var_names.get_loc(g) for g in genes]
        cols.append(np.asarray(norm[:, idx].mean(axis=1)).ravel())
    return np.stack(cols, axis=1)


def _z(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)


def _rule(drug_ids: list[str]) -> tuple[pd.Series, pd.DataFrame]:
    """``base_d`` and ``w_dp`` from the drugs' fingerprints."""
    from msfm.data.drugs import morgan_fingerprints, read_drugs

    fps = morgan_fingerprints(read_drugs({d: DRUG_SMILES[d] for d in drug_ids}), radius=2, n_bits=1024)
    rng = np.random.default_rng(_RULE_SEED)
    u = rng.normal(size=fps.shape[1])
    v = rng.normal(size=(fps.shape[1], len(PROGRAMS)))
    norm = np.sqrt(np.maximum(fps.sum(1, keepdims=True), 1.0))
    base = 2.0 + 1.5 * np.tanh((fps @ u)[:, None] / norm)[:, 0]
    w = 1.5 * np.tanh(fps @ v / norm)
    return pd.Series(base, index=drug_ids, name="base"), pd.DataFrame(
        w, index=drug_ids, columns=list(PROGRAMS)
    )


def _pseudo_bulk(n_cell_lines: int, n_cells: int, seed: int) -> ad.AnnData:
    from msfm.datasets.pbmc import pbmc68k

    cells = pbmc68k()
    counts = sp.csr_matrix(cells.layers["counts"])
    types = cells.obs["cell_type"].astype(str).to_numpy()
    pools = [np.flatnonzero(np.isin(types, t)) for t in LINEAGES.values()]
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(len(pools), 0.5), size=n_cell_lines)
    rows = []
    for w in weights:
        k = rng.multinomial(n_cells, w)
        picked = np.concatenate([rng.choice(p, size=n, replace=True) for p, n in zip(pools, k, strict=True)])
        rows.append(np.asarray(counts[picked].sum(axis=0)).ravel())
    x = sp.csr_matrix(np.stack(rows).astype(np.float32))
    names = [f"CL{i:03d}" for i in range(n_cell_lines)]
    obs = pd.DataFrame(weights, index=names, columns=[f"fraction_{p}" for p in LINEAGES])
    out = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=cells.var_names.copy()))
    out.layers["counts"] = x.copy()
    return out


def _dataset_record(**params: Any) -> dict[str, Any]:
    return {
        "name": "constructed_drug_response",
        "constructed": True,
        "note": "CONSTRUCTED: pseudo-bulk of real pbmc68k cells, real drug SMILES, PLANTED response rule",
        "rule": _RULE,
        "params": params,
    }


def constructed_drug_response(
    *,
    n_cell_lines: int = 80,
    n_cells: int = 150,
    drugs: list[str] | None = None,
    noise: float = 0.5,
    seed: int = 0,
) -> ConstructedDrugData:
    """CONSTRUCTED IC50 data: pseudo-bulk "cell lines" from real PBMCs, real SMILES, a planted rule.

    Args:
        n_cell_lines: number of pseudo-bulk cell lines.
        n_cells: real cells summed into each.
        drugs: drug names from :data:`DRUG_SMILES` (default: all 19).
        noise: standard deviation of the Gaussian noise on ln(IC50).
        seed: seed of the mixtures and the noise (the rule itself is fixed).
    """
    ids = list(DRUG_SMILES) if drugs is None else list(drugs)
    expression = _pseudo_bulk(n_cell_lines, n_cells, seed)
    scores = _z(_scores(expression))
    for j, p in enumerate(PROGRAMS):
        expression.obs[f"score_{p}"] = scores[:, j]
    base, w = _rule(ids)
    rng = np.random.default_rng(seed + 1)
    ic50 = (
        base.to_numpy()[None, :]
        + scores @ w.to_numpy().T
        + rng.normal(scale=noise, size=(n_cell_lines, len(ids)))
    )
    responses = pd.DataFrame(
        {
            "cell_line": np.repeat(expression.obs_names.to_numpy(), len(ids)),
            "drug_id": np.tile(ids, n_cell_lines),
            "ln_ic50": ic50.ravel(),
        }
    )
    expression.uns["dataset"] = _dataset_record(
        n_cell_lines=n_cell_lines, n_cells=n_cells, noise=noise, seed=seed
    )
    drug_table = pd.DataFrame({"drug_id": ids, "smiles": [DRUG_SMILES[d] for d in ids]})
    return ConstructedDrugData(expression, drug_table, responses, {"base": base, "weights": w})


def constructed_sensitivity(
    drug: str = "Sorafenib", *, n_cell_lines: int = 80, n_cells: int = 150, noise: float = 0.5, seed: int = 0
) -> tuple[ad.AnnData, ad.AnnData]:
    """CONSTRUCTED SCAD data for one drug: labelled pseudo-bulk cell lines and the real pbmc68k single cells.

    Returns:
        ``(bulk, single_cells)``, both with ``obs["sensitive"]`` ("sensitive"/"resistant") from the planted rule
        (bulk: ``ln IC50 < base_d``, with noise; single cells: the noiseless rule on their own z-scored programs).
    """
    from msfm.datasets.pbmc import pbmc68k

    data = constructed_drug_response(
        n_cell_lines=n_cell_lines, n_cells=n_cells, drugs=[drug], noise=noise, seed=seed
    )
    bulk = data.expression
    base = float(data.rule["base"][drug])
    ic50 = data.responses["ln_ic50"].to_numpy()
    bulk.obs["ln_ic50"] = ic50
    bulk.obs["sensitive"] = pd.Categorical(np.where(ic50 < base, "sensitive", "resistant"))
    cells = pbmc68k()
    effect = _z(_scores(cells)) @ data.rule["weights"].loc[drug].to_numpy()
    cells.obs["sensitive"] = pd.Categorical(np.where(effect < 0, "sensitive", "resistant"))
    record = _dataset_record(drug=drug, n_cell_lines=n_cell_lines, n_cells=n_cells, noise=noise, seed=seed)
    bulk.uns["dataset"] = record
    cells.uns["dataset"] = {**record, "name": "constructed_sensitivity_single_cells", "source": "pbmc68k"}
    return bulk, cells


def constructed_info() -> dict[str, dict[str, Any]]:
    """``list_datasets``-style entries of the constructed drug data."""
    from msfm.datasets import pbmc

    common = {
        "counts": "raw UMI counts summed over real pbmc68k cells",
        "source": "derived from pbmc68k + drug SMILES written in msfm.datasets.constructed_drugs.DRUG_SMILES",
        "licence": pbmc._LICENCE,
        "citation": pbmc._CITATION,
        "derived": True,
        "constructed": True,
    }
    return {
        "constructed_drug_response": {
            "function": "msfm.datasets.constructed_drugs.constructed_drug_response(n_cell_lines=80, seed=0)",
            "description": "CONSTRUCTED: pseudo-bulk 'cell lines' x 19 drugs with a planted ln(IC50) rule",
            "shape": ("n_cell_lines", 765),
            "labels": "responses table (cell_line, drug_id, ln_ic50); " + _RULE,
            **common,
        },
        "constructed_sensitivity": {
            "function": "msfm.datasets.constructed_drugs.constructed_sensitivity(drug='Sorafenib')",
            "description": "CONSTRUCTED: labelled pseudo-bulk cell lines + 700 real PBMCs labelled by the same rule",
            "shape": (("n_cell_lines", 765), (700, 765)),
            "labels": "obs['sensitive'] (sensitive/resistant), planted",
            **common,
        },
    }
