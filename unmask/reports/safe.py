"""Text cells that are safe to open: every CSV, markdown table and text list a person reads.

Spreadsheet programs run a cell that starts with ``=``, ``+``, ``-``, ``@``, tab or carriage
return as a formula (a file named ``=cmd|' /C calc'!A0.jpg`` would start a program when the
scores are opened). Following OWASP's CSV-injection guidance such a *text* cell gets a leading
single quote, which the spreadsheet shows as text; numbers, and text that reads as a plain
number (``-0.5``), stay as they are. The contest file alone keeps names byte-exact (the contest
matches them); ``reports.contest`` warns about them there.

CSV text also needs every field holding a line break quoted (RFC 4180): Python's csv writer
(and pandas) quote ``\\n`` but not a lone ``\\r`` when lines end in ``\\n``, and readers then
split the row. ``frame_csv`` / ``rows_csv`` quote both and still end lines in ``\\n``.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence

import pandas as pd

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def looks_like_formula(value) -> bool:
    """A text a spreadsheet would evaluate instead of showing."""
    return isinstance(value, str) and value.startswith(FORMULA_START) and not is_number(value)


def safe_cell(value):
    """``value`` with a leading ``'`` when it is text a spreadsheet would read as a formula;
    anything else (numbers, missing values, plain text) unchanged."""
    return "'" + value if looks_like_formula(value) else value


def neutralise_formulas(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` whose text columns went through ``safe_cell``; numeric columns are
    not touched."""
    out = frame.copy()
    for column in out.columns:
        if out[column].dtype == object or pd.api.types.is_string_dtype(out[column]):
            out[column] = out[column].map(safe_cell)
    return out


def one_line(text: str) -> str:
    """``text`` for a one-line-per-entry list: tab, CR and LF written as ``\\t``, ``\\r``, ``\\n``."""
    return str(text).replace("\t", "\\t").replace("\r", "\\r").replace("\n", "\\n")


def _lf_line_ends(text: str) -> str:
    """CSV written with ``\\r\\n`` line ends (so that the writer quotes every field holding a
    CR or LF) back to ``\\n`` line ends: outside quotes the only CRs are line ends. Split at
    the quote character, the even pieces are outside quotes (a doubled quote inside a field
    leaves an empty piece between its two halves, so the parity holds)."""
    pieces = text.split('"')
    pieces[::2] = [p.replace("\r", "") for p in pieces[::2]]
    return '"'.join(pieces)


def rows_csv(rows: Iterable[Sequence]) -> str:
    """RFC 4180 CSV text of ``rows`` as they are (no formula neutralising), ``\\n`` line ends."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerows(rows)
    return _lf_line_ends(buf.getvalue())


def frame_csv(frame: pd.DataFrame, **to_csv) -> str:
    """``frame.to_csv(index=False, **to_csv)`` for a person to open: formulas neutralised,
    line breaks inside a field quoted, ``\\n`` line ends."""
    text = neutralise_formulas(frame).to_csv(index=False, lineterminator="\r\n", **to_csv)
    return _lf_line_ends(text)
