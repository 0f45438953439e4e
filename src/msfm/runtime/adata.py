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

__all__ = ["MAX_KEY_LENGTH", "check_key_added", "field_key", "obsm_key", "store_uns"]


#: Longest ``key_added``: the HDF5 and zarr names built from it (``X_<key>``, ``<key>_<field>``) stay short.
MAX_KEY_LENGTH = 200


def check_key_added(key: str) -> str:
    """The prefix, if it can name keys that an ``.h5ad`` (HDF5) or ``.zarr`` file stores and reads back.

    Every verb that takes ``key_added`` calls this first, before reading data or loading a model.

    Raises:
        MsfmInputError: not a non-empty string; surrounding spaces; ``/`` (HDF5 and zarr take it as a group
            separator: anndata writes such a file but cannot read it back); ``.`` or ``..`` (HDF5 path names: ``uns['.']``
            is the ``uns`` group itself and is lost); control characters such as NUL or a newline; longer than
            :data:`MAX_KEY_LENGTH`; or a full ``X_...`` obsm key.
    """
    fix = "Use letters, digits, '_', '-' or '.', e.g. key_added='a_b'."
    if not isinstance(key, str) or not key.strip() or key != key.strip():
        msg = f"key_added must be a non-empty name without surrounding spaces; got {key!r}. {fix}"
        raise MsfmInputError(msg)
    if "/" in key:
        msg = (
            f"key_added={key!r} contains '/', which .h5ad and .zarr files take as a group separator: anndata writes "
            f"the file, but cannot read it back. {fix}"
        )
        raise MsfmInputError(msg)
    control = sorted({c for c in key if ord(c) < 32 or ord(c) == 127})
    if control:
        msg = (
            f"key_added={key!r} contains the control character(s) {control}, which .h5ad files cannot store "
            f"reliably in a key. {fix}"
        )
        raise MsfmInputError(msg)
    if key in (".", ".."):
        msg = f"key_added={key!r} is an HDF5 path name (the current or parent group); uns[{key!r}] is lost. {fix}"
        raise MsfmInputError(msg)
    if len(key) > MAX_KEY_LENGTH:
        msg = f"key_added is {len(key)} characters long; use at most {MAX_KEY_LENGTH}. {fix}"
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
