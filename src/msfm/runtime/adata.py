"""How verbs name what they add to an AnnData: one prefix, ``key_added``, for every family.

``key_added="scmulan"`` gives ``obsm["X_scmulan"]``, ``obs["scmulan_<field>"]`` (labels, ``_confidence``, ...),
``layers["scmulan_<field>"]``, and ``uns["scmulan"][<verb>]`` (parameters, checkpoint provenance, the gene mapping).
Running two verbs under one key keeps both records in ``uns``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from msfm.errors import MsfmInputError
from msfm.runtime.jsonable import to_uns

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["check_key_added", "field_key", "obsm_key", "store_uns"]


def check_key_added(key: str) -> str:
    """The prefix, if it can name keys that an ``.h5ad`` file stores.

    Raises:
        MsfmInputError: not a non-empty string, contains ``/`` (h5ad groups), or is a full ``X_...`` obsm key.
    """
    if not isinstance(key, str) or not key.strip() or key != key.strip():
        msg = f"key_added must be a non-empty name without surrounding spaces; got {key!r}."
        raise MsfmInputError(msg)
    if "/" in key or "\x00" in key:
        msg = (
            f"key_added={key!r} contains '/' or NUL, which .h5ad files cannot store in a key. Use e.g. 'a_b'."
        )
        raise MsfmInputError(msg)
    if key.startswith("X_"):
        msg = (
            f"key_added={key!r} looks like a full obsm key. key_added is a prefix: it names obsm['X_<key>'], "
            f"obs['<key>_<field>'] and uns['<key>']. Pass key_added={key[2:]!r}."
        )
        raise MsfmInputError(msg)
    return key


def obsm_key(key: str) -> str:
    """``obsm`` key of the embedding written under ``key_added``: ``X_<key>``."""
    return f"X_{key}"


def field_key(key: str, field: str) -> str:
    """``obs``/``layers``/``var`` key of one field written under ``key_added``: ``<key>_<field>``."""
    return f"{key}_{field}"


def store_uns(adata: AnnData, key: str, verb: str, record: Mapping[str, Any]) -> None:
    """``uns[key][verb] = record`` (made storable in .h5ad), keeping the records of other verbs under ``key``."""
    current = adata.uns.get(key)
    merged = dict(current) if isinstance(current, Mapping) else {}
    merged[verb] = to_uns(dict(record))
    adata.uns[key] = merged
