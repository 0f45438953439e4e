"""A Markdown report turned into one self-contained HTML file: figures inlined, no network, opens offline.

The demo writes ``report.md`` with PNG figures beside it; :func:`write_html_report` renders the same text to
``report.html`` with every local image embedded as a ``data:`` URI, so the single file can be mailed, attached to a
ticket or opened from a laptop without the figure folders. Links to other local files (CSV tables, run folders)
stay relative: they work when the HTML sits beside the outputs and are harmless elsewhere.
"""

from __future__ import annotations

import base64
import html
import os
import re
from pathlib import Path

from msfm.errors import MsfmInputError

__all__ = ["markdown_to_html", "write_html_report"]

_MIME = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".svg": "image/svg+xml",
    ".gif": "image/gif",
}
_IMG = re.compile(r'<img\b([^>]*?)\bsrc="([^"]+)"([^>]*)>')

# Plain, printable styling; system fonts only (nothing fetched).
_CSS = """
body { font: 15px/1.55 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: #1d1d1f;
       max-width: 60rem; margin: 2rem auto; padding: 0 1.2rem; }
h1 { font-size: 1.7rem; border-bottom: 2px solid #ddd; padding-bottom: .3rem; }
h2 { font-size: 1.35rem; margin-top: 2.4rem; border-bottom: 1px solid #e5e5e5; padding-bottom: .2rem; }
h3 { font-size: 1.1rem; margin-top: 1.6rem; }
table { border-collapse: collapse; margin: .8rem 0 1.1rem; font-size: .9rem; }
th, td { border: 1px solid #d0d7de; padding: .3rem .6rem; text-align: left; vertical-align: top; }
th { background: #f3f5f7; }
tr:nth-child(even) td { background: #fafbfc; }
img { max-width: 100%; height: auto; display: block; margin: .6rem 0 1.2rem; border: 1px solid #eee; }
code { background: #f3f5f7; padding: .05rem .3rem; border-radius: 3px; font-size: .88em; }
pre code { display: block; padding: .6rem; overflow-x: auto; }
blockquote { margin: .8rem 0; padding: .2rem 1rem; border-left: 4px solid #9db7d5; background: #f6f9fc; }
.missing { color: #a33; font-style: italic; }
"""


def _inline_images(body: str, base_dir: Path) -> str:
    def replace(m: re.Match[str]) -> str:
        before, src, after = m.group(1), html.unescape(m.group(2)), m.group(3)
        if re.match(r"^[a-z][a-z0-9+.-]*:", src, flags=re.IGNORECASE):
            # data: URIs stay; remote images would need the network, so they are dropped with a note.
            if src.lower().startswith("data:"):
                return m.group(0)
            return f'<span class="missing">[remote image left out: {html.escape(src)}]</span>'
        path = (base_dir / src).resolve()
        mime = _MIME.get(path.suffix.lower())
        if mime is None or not path.is_file():
            return f'<span class="missing">[figure not found: {html.escape(src)}]</span>'
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'<img{before}src="data:{mime};base64,{data}"{after}>'

    return _IMG.sub(replace, body)


def markdown_to_html(text: str, *, base_dir: str | os.PathLike[str], title: str = "Report") -> str:
    """Render Markdown (with tables) to a complete HTML page, images under ``base_dir`` inlined.

    Args:
        text: The Markdown source.
        base_dir: Folder that relative image paths are resolved against (the Markdown file's folder).
        title: The page title.

    Returns:
        The HTML document as a string.
    """
    import markdown

    body = markdown.markdown(text, extensions=["tables", "fenced_code", "sane_lists"], output_format="html")
    body = _inline_images(body, Path(base_dir))
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def write_html_report(
    markdown_path: str | os.PathLike[str],
    html_path: str | os.PathLike[str] | None = None,
    *,
    title: str | None = None,
) -> Path:
    """Write the self-contained HTML twin of a Markdown report (atomically) and return its path.

    Args:
        markdown_path: The ``.md`` file; relative figure paths are resolved from its folder.
        html_path: Where to write (default: the same name with ``.html``).
        title: Page title (default: the first ``# `` heading, else the file name).
    """
    from msfm.runtime.atomic import atomic_write_text

    src = Path(markdown_path)
    if not src.is_file():
        msg = f"Markdown report {src} does not exist; pass the path of a .md file."
        raise MsfmInputError(msg)
    text = src.read_text(encoding="utf-8")
    if title is None:
        heading = re.search(r"^# (.+)$", text, flags=re.MULTILINE)
        title = heading.group(1).strip() if heading else src.stem
    target = Path(html_path) if html_path is not None else src.with_suffix(".html")
    atomic_write_text(target, markdown_to_html(text, base_dir=src.parent, title=title))
    return target
