"""The report page: plain HTML with inline CSS; figures are PNGs beside it (relative paths)."""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1500px;
       padding: 0 24px 48px; color: #1a1a1a; line-height: 1.45; }
h1 { margin: 24px 0 4px; font-size: 26px; }
h2 { margin-top: 36px; border-bottom: 1px solid #ddd; padding-bottom: 4px; font-size: 20px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
p.meta { color: #555; margin-top: 0; }
p.note { color: #7a5c00; background: #fff8e1; border-left: 3px solid #f0c000; padding: 6px 10px; }
nav { background: #f6f6f6; padding: 8px 12px; border-radius: 4px; font-size: 14px; }
nav a { margin-right: 14px; }
div.gallery { display: flex; flex-wrap: wrap; gap: 8px 28px; align-items: flex-start; }
figure { margin: 14px 0 22px; max-width: 100%; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #444; font-size: 13px; margin-top: 4px; }
table { border-collapse: collapse; font-size: 12.5px; margin: 6px 0 14px; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f2f2f2; position: sticky; top: 0; }
td.key, th.key { text-align: left; }
td.wrap { white-space: normal; text-align: left; min-width: 260px; max-width: 460px; }
td.sig { font-weight: 600; }
td.pos { background: #e8f1fb; }
td.neg { background: #fdecea; }
details { margin: 6px 0; }
summary { cursor: pointer; font-weight: 600; }
code { background: #f3f3f3; padding: 0 3px; border-radius: 3px; }
"""


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


@dataclass
class Section:
    """One titled part of the page: a short explanation, then blocks of finished HTML."""

    title: str
    blurb: str = ""
    blocks: list[str] = field(default_factory=list)

    def figure(self, src: str, caption: str) -> None:
        self.blocks.append(f'<figure><img src="{esc(src)}" alt="{esc(caption)}" loading="lazy">'
                           f"<figcaption>{esc(caption)}</figcaption></figure>")

    def render(self) -> str:
        """The section's HTML; consecutive figures share a wrapping row, so narrow ones sit side by side."""
        parts = [f'<section id="{anchor(self.title)}"><h2>{esc(self.title)}</h2>']
        if self.blurb:
            parts.append(f"<p>{esc(self.blurb)}</p>")
        gallery: list[str] = []
        for block in [*self.blocks, ""]:
            if block.startswith("<figure>"):
                gallery.append(block)
                continue
            if gallery:
                parts.append('<div class="gallery">' + "".join(gallery) + "</div>")
                gallery = []
            if block:
                parts.append(block)
        parts.append("</section>")
        return "\n".join(parts)

    def note(self, text: str) -> None:
        self.blocks.append(f'<p class="note">{esc(text)}</p>')

    def heading(self, text: str) -> None:
        self.blocks.append(f"<h3>{esc(text)}</h3>")

    def raw(self, markup: str) -> None:
        self.blocks.append(markup)


def fmt(value: float, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{round(value, digits) + 0.0:.{digits}f}"  # + 0.0: no "-0.000"


def interval(mean: float, lo: float, hi: float, n: int, digits: int = 3) -> str:
    """'0.812 [0.790, 0.830]', or just the mean when one seed makes the interval a point."""
    if not math.isfinite(mean):
        return "–"
    if n <= 1:
        return fmt(mean, digits)
    return f"{fmt(mean, digits)} [{fmt(lo, digits)}, {fmt(hi, digits)}]"


Cell = str | tuple[str, str]  # text, or (text, css class)


def table(header: Sequence[str], rows: Sequence[Sequence[Cell]], n_keys: int = 0) -> str:
    """An HTML table; the first `n_keys` columns are left-aligned keys. Text is escaped here."""
    head = "".join(f'<th class="key">{esc(h)}</th>' if i < n_keys else f"<th>{esc(h)}</th>"
                   for i, h in enumerate(header))
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            text, cls = cell if isinstance(cell, tuple) else (cell, "")
            cls = " ".join(c for c in ("key" if i < n_keys else "", cls) if c)
            cells.append(f'<td class="{cls}">{esc(text)}</td>' if cls else f"<td>{esc(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def details(summary: str, content: str, open_: bool = False) -> str:
    return f"<details{' open' if open_ else ''}><summary>{esc(summary)}</summary>{content}</details>"


def page(title: str, meta: str, sections: Sequence[Section]) -> str:
    nav = " ".join(f'<a href="#{anchor(s.title)}">{esc(s.title)}</a>' for s in sections)
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>", f'<p class="meta">{esc(meta)}</p>', f"<nav>{nav}</nav>",
    ]
    parts.extend(s.render() for s in sections)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
