"""The contest export: ``result_MMDDHHMM.xls`` holding CSV text, no header, one row per file
in ascending file-name order: ``name,1`` for AI-generated, ``name,0`` for real.

Names are written byte-exact (the contest matches them), quoted per RFC 4180 when they hold a
comma, a quote, a CR or an LF; a name a spreadsheet would run as a formula is kept too, with a
warning. Every other file here (the sidecars) is for a person: formulas neutralised
(``reports.safe``). A run never replaces an earlier result: ``reserve_result`` claims a free
name first (``result_MMDDHHMM_2.xls``... within the same minute) and the sidecars are named
after the result they belong to.
"""
from __future__ import annotations

import datetime as dt
import itertools
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from data.io import atomic_write_text, reserve_file, writable_dir
from unmask.reports.safe import frame_csv, looks_like_formula, one_line, rows_csv, safe_cell

log = logging.getLogger(__name__)


def contest_filename(now: dt.datetime | None = None) -> str:
    return f"result_{(now or dt.datetime.now()):%m%d%H%M}.xls"


def reserve_result(output_dir: str | Path, now: dt.datetime | None = None, need_bytes: int = 0) -> Path:
    """Claim the contest file of a new run in ``output_dir`` before any work: the folder is
    created and checked (``data.io.writable_dir``), then ``result_MMDDHHMM.xls`` or, when that
    name is taken, ``result_MMDDHHMM_2.xls``, ``_3``... (with a warning saying why) is created
    empty with O_EXCL, so two runs at once never get the same name; the contest writer
    replaces it atomically. A name is taken while its result or any sidecar of it
    (``result_MMDDHHMM.*``) exists, so a new result never sits beside another run's stale
    scores. A run that fails before its contest file is written removes the claim
    (``release_result``)."""
    folder = writable_dir(output_dir, need_bytes)
    first = Path(contest_filename(now))
    for i in itertools.count(1):
        path = folder / (first.name if i == 1 else f"{first.stem}_{i}{first.suffix}")
        if any(folder.glob(f"{path.stem}.*")) or not reserve_file(path):
            continue
        if i > 1:
            taken = sorted(p.name for p in folder.glob(f"{first.stem}*.*") if p != path)
            log.warning(
                "%s already holds %s from an earlier run: this run writes %s (and its sidecars) instead of replacing it",
                folder, ", ".join(taken[:5]), path.name,
            )
        return path
    raise AssertionError("unreachable")


def release_result(path: Path) -> None:
    """Remove the claim of ``reserve_result`` when the run failed before writing its result."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        path.unlink(missing_ok=True)


def write_contest_csv(path: str | Path, names: Sequence[str], labels: Sequence[int]) -> Path:
    if len(names) != len(labels):
        raise ValueError("one label per name")
    if len(set(names)) != len(names):
        raise ValueError("duplicate file names")
    rows = sorted(zip(names, labels), key=lambda r: r[0])
    for name, label in rows:
        if label not in (0, 1):
            raise ValueError(f"label for {name!r} must be 0 or 1, got {label!r}")
    formulas = [name for name, _ in rows if looks_like_formula(name)]
    if formulas:  # kept as they are: the contest matches names byte for byte
        log.warning(
            "%d file name(s) would run as a spreadsheet formula if %s is opened in a spreadsheet program "
            "(written unchanged, the contest needs the exact names): %s",
            len(formulas), Path(path).name, ", ".join(repr(n) for n in formulas[:10]),
        )
    # A name holding a comma, quote, CR or LF is quoted (RFC 4180) instead of the export
    # refusing it: every file must keep its row. Plain names are written bare.
    text = rows_csv((name, int(label)) for name, label in rows)
    # A name that is not valid UTF-8 is written back as the bytes it has on disk.
    return atomic_write_text(path, text, errors="surrogateescape")


# ---- sidecars: what a person reads beside the contest file ------------------------------------
SCORE_COLUMNS = ("name", "prob", "decision", "ok", "error")
FACE_COLUMNS = ("n_faces", "face_fallback", "whole_prob", "face_probs")  # with a face stage
TYPE_COLUMNS = ("type", "type_prob")  # with an attribution head
VIDEO_COLUMNS = ("n_frames", "video_seconds")  # with video files
FRAME_COLUMNS = ("name", "timestamp", "frame_index", "crop_index", "prob", "ok", "error")


def sidecar(result: Path, kind: str) -> Path:
    """``result_MMDDHHMM.<kind>``: the files that travel with a contest file."""
    return Path(result).with_suffix(f".{kind}")


def write_undecodable(result: Path, files: pd.DataFrame) -> Path | None:
    """``<result>.undecodable.txt``: name TAB reason, one line per file that got the fallback
    (tab, CR and LF inside a name or reason written as ``\\t``, ``\\r``, ``\\n``; formulas
    neutralised)."""
    bad = files[~files["ok"].astype(bool)]
    if bad.empty:
        return None
    text = "".join(f"{one_line(safe_cell(n))}\t{one_line(safe_cell(e))}\n" for n, e in zip(bad["name"], bad["error"]))
    return atomic_write_text(sidecar(result, "undecodable.txt"), text, errors="surrogateescape")


def write_scores(result: Path, files: pd.DataFrame) -> Path:
    """``<result>.scores.csv``: per file the probability, the decision, and whatever the
    checkpoint adds (faces, forgery type, video frames), sorted by name like the result.
    Formula-looking names and errors start with ``'`` (``reports.safe``)."""
    optional = [c for c in (*FACE_COLUMNS, *TYPE_COLUMNS) if c in files.columns]
    optional += [c for c in VIDEO_COLUMNS if c in files.columns and files[c].notna().any()]
    table = files[[*SCORE_COLUMNS, *optional]].sort_values("name")
    table = table.astype({c: "Int64" for c in ("n_frames", "n_faces") if c in table})  # not every row has one
    return atomic_write_text(sidecar(result, "scores.csv"), frame_csv(table, float_format="%.6f"), errors="surrogateescape")


def write_frames(result: Path, frames: pd.DataFrame) -> Path:
    """``<result>.frames.csv``: the per-frame scores behind each video's row."""
    return atomic_write_text(
        sidecar(result, "frames.csv"), frame_csv(frames[list(FRAME_COLUMNS)], float_format="%.6f"), errors="surrogateescape"
    )
