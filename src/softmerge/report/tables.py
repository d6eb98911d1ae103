"""Plain-text and markdown tables of results (aligned, numeric columns right-aligned)."""

from __future__ import annotations

from typing import Any

import numpy as np

# --------------------------------------------------------------------------------------------
# tables


def _is_number(v: Any) -> bool:
    # bool is an int subclass but reads as a word, so it is aligned like text.
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(
        v, (bool, np.bool_)
    )


def _cell(v: Any, floatfmt: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, (float, np.floating)):
        return format(float(v), floatfmt)
    # Line breaks would tear a row apart in either table format.
    return str(v).replace("\r", " ").replace("\n", " ")


def _prepare(
    rows: list[dict[str, Any]], columns: list[str] | None, floatfmt: str
) -> tuple[list[str], list[list[str]], list[bool]]:
    """Columns, formatted cells, and per column whether it is numeric (right-aligned)."""
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_cell(row.get(c), floatfmt) for c in columns] for row in rows]
    numeric = []
    for c in columns:
        present = [row[c] for row in rows if row.get(c) is not None]
        numeric.append(bool(present) and all(_is_number(v) for v in present))
    return [str(c) for c in columns], cells, numeric


def _pad(text: str, width: int, right: bool) -> str:
    return text.rjust(width) if right else text.ljust(width)


def format_table(
    rows: list[dict[str, Any]], columns: list[str] | None = None, floatfmt: str = ".2f"
) -> str:
    """An aligned plain-text table: header, dashed separator, one line per row."""
    header, cells, numeric = _prepare(rows, columns, floatfmt)
    if not header:
        return ""
    widths = [max(len(s) for s in [h, *(r[j] for r in cells)]) for j, h in enumerate(header)]

    def line(values: list[str]) -> str:
        padded = (_pad(v, w, r) for v, w, r in zip(values, widths, numeric, strict=True))
        return "  ".join(padded).rstrip()

    separator = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), separator, *(line(r) for r in cells)])


def format_markdown_table(
    rows: list[dict[str, Any]], columns: list[str] | None = None, floatfmt: str = ".2f"
) -> str:
    """A GitHub markdown table with the same content; numeric columns are right-aligned."""
    header, cells, numeric = _prepare(rows, columns, floatfmt)
    if not header:
        return ""
    header = [h.replace("|", "\\|") for h in header]
    cells = [[v.replace("|", "\\|") for v in r] for r in cells]
    widths = [max(3, *(len(s) for s in [h, *(r[j] for r in cells)])) for j, h in enumerate(header)]

    def line(values: list[str]) -> str:
        padded = (_pad(v, w, r) for v, w, r in zip(values, widths, numeric, strict=True))
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * (w - 1) + ":" if r else "-" * w for w, r in zip(widths, numeric, strict=True)]
    return "\n".join([line(header), "| " + " | ".join(rule) + " |", *(line(r) for r in cells)])
