"""Self-contained HTML reports: tables and PNG figures in one file that works offline.

Images are embedded as base64 `data:` URIs and the style sheet is inline, so the file can be
mailed, archived or opened without a network or a server. Every text is HTML-escaped. The
only script is a few inline lines that sort a `Table(sortable=True)` when its column heading
is clicked (numbers by their raw value, kept in each cell's `data-sort`); without script the
table reads in the order it was written.

Example:
    >>> html = render_html(
    ...     "Search report",
    ...     [Section("Leaderboard", [Table(("trial", "accuracy"), [(1, 0.93)])])],
    ... )
    >>> Path("report.html").write_text(html)
"""

from __future__ import annotations

import base64
import dataclasses
import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["Cell", "Figure", "Paragraph", "Section", "Table", "png_data_uri", "render_html"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLUMN_STYLES = ("number", "wrap")

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem 1.5rem;
       color: #1b1f24; }
p, pre { max-width: 95ch; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.25rem; border-bottom: 1px solid #d0d7de; padding-bottom: 0.2rem;
     margin-top: 2rem; }
p.subtitle { color: #57606a; margin-top: 0; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #d0d7de; padding: 0.25rem 0.5rem; text-align: right; }
th { background: #f6f8fa; position: sticky; top: 0; }
td.text { text-align: left; font-family: ui-monospace, monospace; white-space: nowrap; }
td.number { font-family: ui-monospace, monospace; font-variant-numeric: tabular-nums;
            white-space: nowrap; }
td.wrap { text-align: left; white-space: normal; min-width: 18ch; max-width: 45ch; }
tr.bad td { color: #6e7781; background: #f6f8fa; }
tr.bad td.wrap { color: #9a3412; }
figure { margin: 0.5rem 0 1.5rem; }
figure img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
figure { max-width: 1400px; }
figcaption { color: #57606a; font-size: 0.85rem; }
div.scroll { overflow-x: auto; }
table.sorting th { cursor: pointer; user-select: none; }
table.sorting th::after { content: " \\2195"; color: #8c959f; font-size: 0.8em; }
table.sorting th[aria-sort="ascending"]::after { content: " \\25B2"; color: #1b1f24; }
table.sorting th[aria-sort="descending"]::after { content: " \\25BC"; color: #1b1f24; }
"""

# Sorts a table.sortable by the clicked column: cells compare by data-sort (numbers
# numerically), empty values last in either direction, ties in the original row order;
# a second click reverses. It marks the table "sorting" so the headings look clickable only
# where they are. No library, so the page works offline.
_SORT_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  var body = table.tBodies[0], heads = table.tHead.rows[0].cells;
  table.classList.add("sorting");
  Array.prototype.forEach.call(body.rows, function (row, i) { row.dataset.order = i; });
  function key(row, col) {
    var cell = row.cells[col];
    var raw = cell.hasAttribute("data-sort") ? cell.dataset.sort : cell.textContent.trim();
    if (raw === "") { return null; }
    var number = Number(raw);
    return isNaN(number) ? raw.toLowerCase() : number;
  }
  function sortBy(col, th) {
    var up = th.getAttribute("aria-sort") !== "ascending";
    Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", up ? "ascending" : "descending");
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a, col), y = key(b, col);
      if (x === null || y === null) {
        if (x === y) { return a.dataset.order - b.dataset.order; }
        return x === null ? 1 : -1;
      }
      if (typeof x !== typeof y) { x = String(x); y = String(y); }
      var order = x < y ? -1 : x > y ? 1 : 0;
      return (up ? order : -order) || a.dataset.order - b.dataset.order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  }
  Array.prototype.forEach.call(heads, function (th, col) {
    th.tabIndex = 0;
    th.title = "sort by " + th.textContent;
    th.addEventListener("click", function () { sortBy(col, th); });
    th.addEventListener("keydown", function (e) {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(col, th); }
    });
  });
});
"""


@dataclasses.dataclass(frozen=True)
class Cell:
    """A table cell shown as `text` and sorted by `sort` (e.g. "1.2M" sorted as 1200000).

    Attributes:
        text: what the cell shows.
        sort: the raw value a sortable table orders by (None: sorts last).
    """

    text: str
    sort: float | str | None


@dataclasses.dataclass(frozen=True)
class Table:
    """A table; cells are formatted by type (floats to 4 significant digits).

    Attributes:
        columns: column headings.
        rows: one sequence of cells per row, as long as `columns`.
        title: an optional caption.
        dim_rows: indices of rows to show greyed out (e.g. infeasible designs).
        table_id: the HTML id of the table element.
        column_styles: column heading -> "number" (text already formatted as a number:
            right-aligned, digits lined up) or "wrap" (prose such as a reason: left-aligned,
            wrapped instead of widening the table).
        sortable: clicking a heading sorts the rows by that column (ints, floats and
            `Cell.sort` values as numbers); the rows start in the order given.
    """

    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]
    title: str = ""
    dim_rows: frozenset[int] = frozenset()
    table_id: str = ""
    column_styles: Mapping[str, str] = dataclasses.field(default_factory=dict)
    sortable: bool = False

    def __post_init__(self) -> None:
        for column, style in self.column_styles.items():
            if column not in self.columns or style not in _COLUMN_STYLES:
                raise ValueError(
                    f"table {self.title!r}: column_styles[{column!r}] = {style!r}; expected a "
                    f"column of the table and one of {', '.join(_COLUMN_STYLES)}"
                )
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ValueError(
                    f"table {self.title!r} row {i} has {len(row)} cells, expected "
                    f"{len(self.columns)}"
                )


@dataclasses.dataclass(frozen=True)
class Figure:
    """A PNG image.

    Attributes:
        png: the PNG file's bytes.
        alt: alternative text.
        caption: an optional caption under the image.
    """

    png: bytes
    alt: str
    caption: str = ""

    def __post_init__(self) -> None:
        if not self.png.startswith(_PNG_SIGNATURE):
            raise ValueError(f"figure {self.alt!r}: not PNG data")


@dataclasses.dataclass(frozen=True)
class Paragraph:
    """A paragraph of plain text (`preformatted`: shown as is, in a fixed-width font)."""

    text: str
    preformatted: bool = False


@dataclasses.dataclass(frozen=True)
class Section:
    """A titled part of the report."""

    title: str
    blocks: Sequence[Table | Figure | Paragraph]


def png_data_uri(png: bytes) -> str:
    """A `data:image/png;base64,...` URI of PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _sort_attr(value: Any) -> str:
    """The `data-sort` attribute of a sortable table's cell ("" for text, which sorts by
    what it shows)."""
    if isinstance(value, Cell):
        value = value.sort
        if value is None:
            return ' data-sort=""'
    if isinstance(value, bool) or value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return ' data-sort=""'
    if isinstance(value, int | float):
        return f' data-sort="{value!r}"'
    return f' data-sort="{html.escape(str(value))}"' if isinstance(value, str) else ""


def _cell(value: Any) -> tuple[str, bool]:
    """(escaped text, is_text) of one table cell."""
    if isinstance(value, Cell):
        return html.escape(value.text), not isinstance(value.sort, int | float)
    if value is None:
        return "", False
    if isinstance(value, bool):
        return ("yes" if value else "no"), True
    if isinstance(value, float):
        if math.isnan(value):
            return "", False
        return f"{value:.4g}", False
    if isinstance(value, int):
        return f"{value:,}", False
    return html.escape(str(value)), True


def _render_table(table: Table) -> str:
    id_attr = f' id="{html.escape(table.table_id)}"' if table.table_id else ""
    id_attr += ' class="sortable"' if table.sortable else ""
    parts = ['<div class="scroll">', f"<table{id_attr}>"]
    if table.title:
        parts.append(f"<caption>{html.escape(table.title)}</caption>")
    parts.append("<thead><tr>")
    parts += [f"<th>{html.escape(str(col))}</th>" for col in table.columns]
    parts.append("</tr></thead><tbody>")
    styles = [table.column_styles.get(column) for column in table.columns]
    for i, row in enumerate(table.rows):
        parts.append('<tr class="bad">' if i in table.dim_rows else "<tr>")
        for value, style in zip(row, styles, strict=True):
            text, is_text = _cell(value)
            css = style or ("text" if is_text else "")
            sort = _sort_attr(value) if table.sortable else ""
            class_attr = f' class="{css}"' if css else ""
            parts.append(f"<td{class_attr}{sort}>{text}</td>")
        parts.append("</tr>")
    parts.append("</tbody></table></div>")
    return "".join(parts)


def _render_block(block: Table | Figure | Paragraph) -> str:
    if isinstance(block, Table):
        return _render_table(block)
    if isinstance(block, Figure):
        caption = f"<figcaption>{html.escape(block.caption)}</figcaption>" if block.caption else ""
        return (
            f'<figure><img src="{png_data_uri(block.png)}" alt="{html.escape(block.alt)}">'
            f"{caption}</figure>"
        )
    if isinstance(block, Paragraph):
        if block.preformatted:
            return f"<pre>{html.escape(block.text)}</pre>"
        return f"<p>{html.escape(block.text)}</p>"
    raise TypeError(f"cannot render {type(block).__name__}")


def render_html(title: str, sections: Sequence[Section], *, subtitle: str = "") -> str:
    """Renders a complete, self-contained HTML document.

    Args:
        title: the page title and heading.
        sections: the report's parts, in order.
        subtitle: an optional line under the heading.

    Returns:
        The HTML text (UTF-8, no external resources; inline script only to sort sortable
        tables).
    """
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if subtitle:
        parts.append(f'<p class="subtitle">{html.escape(subtitle)}</p>')
    for section in sections:
        parts.append(f"<section><h2>{html.escape(section.title)}</h2>")
        parts += [_render_block(block) for block in section.blocks]
        parts.append("</section>")
    sortable = any(
        isinstance(block, Table) and block.sortable
        for section in sections
        for block in section.blocks
    )
    if sortable:
        parts.append(f"<script>{_SORT_SCRIPT}</script>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
