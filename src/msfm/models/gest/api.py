"""The public verbs of ``msfm.gest``, one import each (``msfm.gest.<verb>`` resolves them lazily).

* ``load``: a checkpoint made ready for inference, a ``Loaded`` (:mod:`~msfm.models.gest.checkpoint`);
* ``train``: meta-cell vocabulary + windows + decoder -> ``RUN/model`` (:mod:`~msfm.models.gest.pretrain`);
* ``generate``: expression at held-out or new positions, a new AnnData (:mod:`~msfm.models.gest.generation`);
* ``embed`` and ``cluster_niches``: niche embeddings ``obsm['X_gest']`` and their clusters ``obs['gest_niche']``
  (:mod:`~msfm.models.gest.niches`);
* ``perturb``: in-silico spatial perturbation, a ``GestPerturbation`` (:mod:`~msfm.models.gest.perturbation`);
* ``fit_classifier`` and ``predict``: a fine-tuned niche classifier and its labels ``obs['gest_<labels_key>']``
  (:mod:`~msfm.models.gest.classifier`);
* ``evaluate``: GeST against baselines on held-out cells, a ``GenerationEvaluation``
  (:mod:`~msfm.models.gest.evaluation`).
"""

from __future__ import annotations

from msfm.models.gest.checkpoint import load
from msfm.models.gest.classifier import fit_classifier, predict
from msfm.models.gest.evaluation import evaluate
from msfm.models.gest.generation import generate
from msfm.models.gest.niches import cluster_niches, embed
from msfm.models.gest.perturbation import perturb
from msfm.models.gest.pretrain import train

__all__ = [
    "cluster_niches",
    "embed",
    "evaluate",
    "fit_classifier",
    "generate",
    "load",
    "perturb",
    "predict",
    "train",
]
