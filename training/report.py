"""The acceptance table of an evaluation summary: rows for the console (rich) and the model card (markdown)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from draftsmith.eval.report import drift_sentence


def _row(name: str, values: dict[str, Any], depth: int) -> list[str]:
    alpha = list(values.get("alpha") or [])
    alpha += [None] * (depth - len(alpha))
    speedup = values.get("speedup")
    return [
        name,
        f"{values['tau']:.2f}",
        *("-" if a is None else f"{a:.2f}" for a in alpha),
        "-" if speedup is None else f"{speedup:.2f}x",
        str(values.get("lossless_mismatches", "-")),
    ]


def acceptance_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (one per category, then ``all``) of an `eval.runner.evaluate` summary."""
    categories = summary.get("by_category") or {}
    depth = max([len(summary.get("alpha") or [])] + [len(c.get("alpha") or []) for c in categories.values()])
    header = ["category", "tau", *(f"alpha_{k}" for k in range(1, depth + 1)), "speedup", "lossless mismatches"]
    rows = [_row(name, values, depth) for name, values in sorted(categories.items())]
    rows.append(_row("all", summary, depth))
    return header, rows


def markdown_table(summary: dict[str, Any]) -> str:
    header, rows = acceptance_rows(summary)
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def print_acceptance(summary: dict[str, Any], title: str, console: Console | None = None) -> None:
    header, rows = acceptance_rows(summary)
    table = Table(title=title)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console = console or Console()
    console.print(table)
    drift = drift_sentence(summary)
    if drift:
        console.print(drift)
