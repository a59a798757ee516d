"""Markdown tables, for the CLI and the reports."""

from __future__ import annotations


def markdown(rows: list[list], header: list[str]) -> str:
    """``rows`` under ``header`` as a Markdown table with padded columns."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(row):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
