"""Names of the demo's training folders."""

from __future__ import annotations

from pathlib import Path


def run_dir(parent: Path, name: str, *, quick: bool, seed: int) -> Path:
    """The training folder of one demo run: ``name`` for the default demo, ``name-quick-seed3`` otherwise.

    Training resumes from a run folder and refuses settings that differ from the saved ones, so every combination
    of demo settings gets its own folder: re-running the same demo finishes at once, another seed or ``--quick``
    trains afresh beside it.
    """
    if not quick and seed == 0:
        return parent / name
    return parent / f"{name}-{'quick' if quick else 'full'}-seed{seed}"
