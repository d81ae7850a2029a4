"""Reports a person reads: aligned plain-text and Markdown tables, and matplotlib without a display.

Shared by `eval` and `inspect`, so their tables line up the same way and neither needs a GUI backend.
"""

from __future__ import annotations


def text_table(head: list[str], body: list[list[str]]) -> str:
    """First column left-aligned, the numbers right-aligned, a rule under the header."""
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([line(head), "  ".join("-" * w for w in widths), *map(line, body)])


def markdown_table(head: list[str], body: list[list[str]]) -> str:
    rows = [head, ["---"] + ["---:"] * (len(head) - 1), *body]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def pyplot():
    """matplotlib.pyplot on the Agg backend: plots are files, and servers and CI have no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
