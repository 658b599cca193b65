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


SMALL_MARK = "†"  # beside n: too few files for the row's figures to mean much
CI_COLUMNS = ("acc 95 % CI", "auc 95 % CI")


def interval(low, high, digits: int = 3) -> str:
    """``[low, high]``, or an em dash when the interval is undefined."""
    if low is None or high is None or (isinstance(low, float) and math.isnan(low)) or (isinstance(high, float) and math.isnan(high)):
        return "—"
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def with_intervals(rows: Mapping[str, Mapping], small_n: int) -> dict[str, dict]:
    """Rows for a table with the ``CI_COLUMNS`` (from ``acc_ci_low/high``, ``auc_ci_low/high``)
    and ``n`` marked with ``SMALL_MARK`` below ``small_n`` files."""
    out = {}
    for name, m in rows.items():
        row = dict(m)
        n = m.get("n")
        if isinstance(n, (int, np.integer)) and 0 < n < small_n:
            row["n"] = f"{int(n)} {SMALL_MARK}"
        row[CI_COLUMNS[0]] = interval(m.get("acc_ci_low"), m.get("acc_ci_high"))
        row[CI_COLUMNS[1]] = interval(m.get("auc_ci_low"), m.get("auc_ci_high"))
        out[name] = row
    return out


def grouped_tables(
    report: Mapping, heading: str = "##", titles: Sequence[str] = ("Overall", "By source", "By generator"), small_n: int | None = None,
) -> list[str]:
    """The overall / per-source / per-generator tables of a ``core.metrics.grouped_metrics`` report.
    With ``small_n`` the rows carry their bootstrap intervals (``CI_COLUMNS``) and groups of
    fewer files are marked (``SMALL_MARK``)."""
    overall, by_source, by_generator = titles
    columns = REPORT_COLUMNS if small_n is None else (*REPORT_COLUMNS, *CI_COLUMNS)

    def table(rows: Mapping[str, Mapping], first: str) -> str:
        return metrics_table(rows if small_n is None else with_intervals(rows, small_n), first, columns)

    return [
        f"{heading} {overall}",
        table({"all": report["overall"]}, "set"),
        "",
        f"{heading} {by_source}",
        table(report["by_source"], "source"),
        "",
        f"{heading} {by_generator}",
        table(report["by_generator"], "generator"),
        "",
    ]


def _prob_text(p: float, threshold: float) -> tuple[str, str]:
    """``p`` and the threshold to 2 decimals, both to more where 2 would read as equal: the
    printed numbers never contradict the verdict (``p=0.499`` beside ``threshold 0.50``)."""
    for digits in (2, 3, 4, 5, 6):
        if round(p, digits) != round(threshold, digits):
            break
    return f"{p:.{digits}f}", f"{threshold:.{digits}f}"


def verdict_lines(files, threshold: float, fallback_label: int = 0) -> list[str]:
    """One human-readable line per scored file (infer.py prints them for a few files)::

        photo.jpg  AI-generated  p=0.82  (threshold 0.61, 1 face)

    ``files``: the result's rows (``name, prob, decision, ok, error`` and, where present,
    ``n_faces, face_fallback, n_frames``). Names are shown on one line (``safe.one_line``)."""
    from unmask.reports.safe import one_line

    rows = files.to_dict("records") if hasattr(files, "to_dict") else list(files)
    names = [one_line(r["name"]) for r in rows]
    width = max((len(n) for n in names), default=0)
    out = []
    for name, row in zip(names, rows):
        ok = bool(row.get("ok", True)) and row.get("prob") is not None and not math.isnan(float(row["prob"]))
        if not ok:
            label = "AI-generated" if int(fallback_label) == 1 else "real"
            reason = str(row.get("error") or "unreadable")
            path = str(row.get("path") or "")
            if path and reason.startswith(path):  # the name is already at the start of the line
                reason = reason[len(path):].lstrip(": ") or reason
            reason = one_line(reason)[:80]
            out.append(f"{name:<{width}}  undecodable   ({reason}; labelled {label} by fallback_label={int(fallback_label)})")
            continue
        verdict = "AI-generated" if int(row["decision"]) == 1 else "real"
        p_text, threshold_text = _prob_text(float(row["prob"]), float(threshold))
        details = [f"threshold {threshold_text}"]
        frames = row.get("n_frames")
        if frames is not None and not (isinstance(frames, float) and math.isnan(frames)):
            details.append(f"{int(frames)} frame{'s' if int(frames) != 1 else ''}")
        faces = row.get("n_faces")
        if faces is not None and not (isinstance(faces, float) and math.isnan(faces)):
            faces = int(faces)
            details.append("no face: whole image" if faces == 0 else f"{faces} face{'s' if faces != 1 else ''}")
        out.append(f"{name:<{width}}  {verdict:<12}  p={p_text}  ({', '.join(details)})")
    return out
