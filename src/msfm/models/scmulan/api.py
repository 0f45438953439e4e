"""Deprecated: the old scMulan module API, kept for one release. Use ``import msfm`` and ``msfm.scmulan.<verb>``.

=====================================================  ==========================================================
old call                                               new call
=====================================================  ==========================================================
``api.annotate(adata, ckpt)``                          ``msfm.scmulan.predict(adata, ckpt)``
``api.predict_organ(adata, ckpt)``                     ``msfm.scmulan.predict(adata, ckpt, target="organ")``
``api.embed(adata, ckpt)``                             ``msfm.scmulan.embed(adata, ckpt)``
``api.generate(ckpt, prompts)``                        ``msfm.scmulan.generate(prompts, ckpt)``
``cells, scores = api.perturb(ckpt, prompt, genes)``   ``r = msfm.scmulan.perturb(prompt, ckpt, genes=genes)``;
                                                       ``r.cells``, ``r.scores``
``api.perturb_screen(ckpt, prompt, genes)``            ``msfm.scmulan.perturb_screen(prompt, ckpt, genes=genes)``
                                                       ``.scores``
``api.next_state(adata, ckpt)``                        ``msfm.scmulan.next_state(adata, ckpt)``
``api.convert`` / ``api.smooth_labels``                ``msfm.scmulan.convert`` / ``msfm.scmulan.smooth_labels``
=====================================================  ==========================================================

Every name warns (``DeprecationWarning``) and translates the old call: old argument order, ``None`` returned
without ``copy=True``, ``perturb``'s ``(cells, scores)`` tuple.
"""

from __future__ import annotations

from msfm.models.scmulan import _deprecated as _old
from msfm.models.scmulan.conversion import convert as _convert
from msfm.models.scmulan.smoothing import smooth_labels as _smooth_labels
from msfm.models.scmulan.transition import next_state as _next_state
from msfm.runtime.deprecation import deprecated

__all__ = [
    "annotate",
    "convert",
    "embed",
    "generate",
    "next_state",
    "perturb",
    "perturb_screen",
    "predict_organ",
    "smooth_labels",
]

_OLD = "msfm.models.scmulan.api."

annotate = deprecated(_OLD + "annotate", "msfm.scmulan.predict(data, checkpoint)")(_old.annotate_call)
predict_organ = deprecated(_OLD + "predict_organ", "msfm.scmulan.predict(data, checkpoint, target='organ')")(
    _old.predict_organ_call
)
embed = deprecated(_OLD + "embed", "msfm.scmulan.embed(data, checkpoint)")(_old.embed_call)
generate = deprecated(_OLD + "generate", "msfm.scmulan.generate(prompts, checkpoint)")(_old.generate_call)
perturb = deprecated(
    _OLD + "perturb", "msfm.scmulan.perturb(prompt, checkpoint, genes=...) (a result with .cells and .scores)"
)(_old.perturb_call)
perturb_screen = deprecated(
    _OLD + "perturb_screen", "msfm.scmulan.perturb_screen(prompt, checkpoint, genes=...).scores"
)(_old.perturb_screen_call)
next_state = deprecated(_OLD + "next_state", "msfm.scmulan.next_state(data, checkpoint)")(_next_state)
convert = deprecated(_OLD + "convert", "msfm.scmulan.convert(official, out)")(_convert)
smooth_labels = deprecated(_OLD + "smooth_labels", "msfm.scmulan.smooth_labels(data)")(_smooth_labels)
