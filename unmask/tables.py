"""Markdown tables for report.md, shared by the clean, video and robustness reports."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

REPORT_COLUMNS = ("n", "acc", "balanced_acc", "real_acc", "fake_acc", "auc", "ap", "eer", "recall_at_90_real_pass")


def fmt_cell(v) -> str:
    if isinstance(v, (float, np.floating)):
        return "—" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def markdown_table(rows: dict[str, dict], first: str) -> str:
    lines = [f"| {first} | " + " | ".join(REPORT_COLUMNS) + " |", "|" + "---|" * (len(REPORT_COLUMNS) + 1)]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(fmt_cell(m.get(c)) for c in REPORT_COLUMNS) + " |")
    return "\n".join(lines)


def grouped_tables(
    report: dict, heading: str = "##", titles: Sequence[str] = ("Overall", "By source", "By generator")
) -> list[str]:
    """The overall / per-source / per-generator tables of a ``metrics.grouped_metrics`` report."""
    overall, by_source, by_generator = titles
    return [
        f"{heading} {overall}",
        markdown_table({"all": report["overall"]}, "set"),
        "",
        f"{heading} {by_source}",
        markdown_table(report["by_source"], "source"),
        "",
        f"{heading} {by_generator}",
        markdown_table(report["by_generator"], "generator"),
        "",
    ]
