"""``msfm weights``: where the official weights are published, and what a downloaded file is."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Official weights: where to get them (list) and what a downloaded file is (verify). See docs/weights.md.",
    no_args_is_help=True,
)

_NOT_PUBLISHED = "not published"


def _human_size(n_bytes: int) -> str:
    size = float(n_bytes)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"  # pragma: no cover


@app.command("list")
def weights_list() -> None:
    """Every official weight file msfm reads: where it is published, size, sha256, licence, command."""
    from msfm.runtime.official_weights import OFFICIAL_WEIGHTS

    for i, entry in enumerate(OFFICIAL_WEIGHTS):
        if i:
            typer.echo("")
        typer.echo(entry.family)
        rows = (
            ("file", entry.file),
            ("published", entry.published),
            ("size", entry.size or _NOT_PUBLISHED),
            ("sha256", entry.sha256 or _NOT_PUBLISHED),
            ("licence", entry.licence),
            ("command", entry.command),
        )
        for label, value in rows:
            typer.echo(f"  {label:<10} {value}")
    typer.echo("\nDetails and how to check a download: docs/weights.md; then run `msfm weights verify FILE`.")


@app.command("verify")
def weights_verify(
    file: Annotated[Path, typer.Argument(help="A downloaded weight file (read with weights_only=True).")],
) -> None:
    """Print a file's sha256 and size and say which official checkpoint it is (by checksum, else by layout)."""
    from msfm.errors import CheckpointError, MsfmInputError
    from msfm.runtime.official_weights import file_sha256, identify_content, match_checksum
    from msfm.runtime.safe_load import load_torch_file

    if not file.is_file():
        kind = "a folder" if file.exists() else "missing"
        msg = f"{str(file)!r} is {kind}; expected a downloaded weight file. `msfm weights list` names them."
        raise MsfmInputError(msg)
    digest = file_sha256(file)
    typer.echo(f"file     {file}")
    typer.echo(f"size     {file.stat().st_size} bytes ({_human_size(file.stat().st_size)})")
    typer.echo(f"sha256   {digest}")
    by_checksum = match_checksum(digest)
    if by_checksum is not None:
        typer.echo(f"checksum {by_checksum}")
    try:
        content = load_torch_file(file, what="weight file", mmap=True)
    except CheckpointError:
        # Not zip-format torch (mmap needs it), or not torch at all: retry plainly for a clear verdict.
        content = None
        try:
            content = load_torch_file(file, what="weight file")
        except CheckpointError:
            msg = (
                f"{str(file)!r} is not a known official checkpoint: torch.load(weights_only=True) cannot read it "
                "(not a torch file, damaged, or holding pickled objects, which msfm never unpickles). Compare it "
                "with `msfm weights list`."
            )
            raise CheckpointError(msg) from None
    found = identify_content(content, name=str(file))
    if found is None:
        msg = (
            f"{str(file)!r} is not a known official checkpoint: its layout matches none of scFoundation, scMulan, "
            "ROAM or the ResNet-50 patch encoder. `msfm weights list` names the official files."
        )
        raise CheckpointError(msg)
    typer.echo(f"is       {found.what} (recognised by its layout)")
    for command in found.commands:
        typer.echo(f"use      {command}")
