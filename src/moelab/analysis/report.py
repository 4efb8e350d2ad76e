"""Self-contained HTML reports: tables, plain-language verdicts and PNG plots embedded as data URIs,
so one file can be mailed, archived or opened from a CI artifact without its directory."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px; color: #1d2330; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #dde; }
.meta { color: #667; font-size: 0.9em; }
.verdict { font-size: 1.1em; padding: 0.8em 1em; border-radius: 6px; margin: 1em 0; }
.good { background: #e7f6ec; border-left: 5px solid #2e9e5b; }
.bad { background: #fdecea; border-left: 5px solid #d93025; }
.warn { background: #fff6e0; border-left: 5px solid #e8a100; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { padding: 0.35em 0.7em; border-bottom: 1px solid #e3e6ee; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f4f6fa; }
img { max-width: 100%; border: 1px solid #e3e6ee; margin: 0.5em 0; }
.figs { display: flex; flex-wrap: wrap; gap: 1em; } .figs figure { margin: 0; flex: 1 1 480px; }
figcaption { font-size: 0.85em; color: #556; }
"""


def png_data_uri(path: str | Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def verdict(text: str, kind: str) -> str:
    """kind: good | bad | warn."""
    return f'<div class="verdict {kind}">{html.escape(text)}</div>'


def figures(items: Sequence[tuple[str | Path, str]]) -> str:
    figs = "".join(
        f'<figure><img src="{png_data_uri(p)}" alt="{html.escape(c)}"><figcaption>{html.escape(c)}</figcaption></figure>'
        for p, c in items
        if Path(p).is_file()
    )
    return f'<div class="figs">{figs}</div>'


def page(title: str, meta: str, sections: Sequence[tuple[str, str]]) -> str:
    """A full HTML document; sections are (heading, inner html)."""
    body = "".join((f"<h2>{html.escape(h)}</h2>" if h else "") + inner for h, inner in sections)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p class='meta'>{html.escape(meta)}</p>{body}</body></html>"
    )


def paragraph(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"
