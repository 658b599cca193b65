"""The one table renderer and number formatter of every markdown a run writes (report.md,
robustness, leave-one-generator-out, localisation, attribution, benchmarks).

Text cells that a spreadsheet would read as a formula (a source, generator or file named
``=...``, ``+...``, ``-...``, ``@...``) get a leading ``'`` (``reports.safe``): tables are
pasted into spreadsheets. Numbers, and pre-formatted numbers such as ``"-0.25"``, do not."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from unmask.reports.safe import safe_cell

REPORT_COLUMNS = ("n", "acc", "balanced_acc", "real_acc", "fake_acc", "auc", "ap", "eer", "recall_at_90_real_pass")


def fmt(value, digits: int = 4) -> str:
    """Floats to ``digits`` decimals, missing values (None, NaN) as an em dash, the rest as text."""
    if value is None:
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)):
        return "—" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _cell(value) -> str:
    return fmt(safe_cell(value)).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A GitHub markdown table; cells go through ``fmt`` (pre-formatted strings pass as they
    are, but formula-looking text is neutralised: ``reports.safe.safe_cell``)."""
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def metrics_table(rows: Mapping[str, Mapping], first: str, columns: Sequence[str] = REPORT_COLUMNS) -> str:
    """One row per named group of metrics (``core.metrics.binary_metrics`` dicts)."""
    return markdown_table([first, *columns], ([name, *(m.get(c) for c in columns)] for name, m in rows.items()))


def grouped_tables(
    report: Mapping, heading: str = "##", titles: Sequence[str] = ("Overall", "By source", "By generator")
) -> list[str]:
    """The overall / per-source / per-generator tables of a ``core.metrics.grouped_metrics`` report."""
    overall, by_source, by_generator = titles
    return [
        f"{heading} {overall}",
        metrics_table({"all": report["overall"]}, "set"),
        "",
        f"{heading} {by_source}",
        metrics_table(report["by_source"], "source"),
        "",
        f"{heading} {by_generator}",
        metrics_table(report["by_generator"], "generator"),
        "",
    ]
