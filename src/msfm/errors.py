"""Exception types shared by every family.

Every user-facing error says what was received, what was expected and how to fix it.
"""

from __future__ import annotations


class MsfmInputError(ValueError):
    """Bad user input: data, gene names, options or files that msfm cannot use as given."""


class CheckpointError(ValueError):
    """A checkpoint file or directory that is missing pieces, has the wrong schema or the wrong layout."""


class OutputError(MsfmInputError):
    """An output cannot be written: full disk, read-only folder, another process writing the same path.

    A subclass of :class:`MsfmInputError`, so the CLI reports it in one line with exit status 2. Whatever was on disk
    before the write is left as it was, and no temporary file remains.
    """


class ConfigChangedError(MsfmInputError):
    """A run folder is resumed with settings that differ from the ones it was started with."""
