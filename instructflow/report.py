"""Plain-text and markdown tables: the run summary that `instructflow run` and
the Prefect flow print, and the evaluation table (evaluate.summary_table)."""

from __future__ import annotations


def format_table(header: list[str], rows: list[list[str]], markdown: bool = False) -> str:
    """Columns aligned for a terminal, or a markdown table. The first column is
    left-aligned, the others right-aligned."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), *(line(r) for r in rows)])


def key_metrics(metrics: dict, keys: tuple[str, ...]) -> str:
    """`k=v` for each of `keys` that `metrics` holds."""
    return "  ".join(f"{k}={metrics[k]}" for k in keys if k in metrics)
