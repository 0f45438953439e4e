"""Exception types shared by every family.

Every user-facing error says what was received, what was expected and how to fix it.
"""

from __future__ import annotations


class MsfmInputError(ValueError):
    """Bad user input: data, gene names, options or files that msfm cannot use as given."""


class CheckpointError(ValueError):
    """A checkpoint file or directory that is missing pieces, has the wrong schema or the wrong layout."""
