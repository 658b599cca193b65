"""The contest export: ``result_MMDDHHMM.xls`` holding CSV text, no header, one row per file
in ascending file-name order: ``name,1`` for AI-generated, ``name,0`` for real."""
from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from data.io import atomic_write_text


def contest_filename(now: dt.datetime | None = None) -> str:
    return f"result_{(now or dt.datetime.now()):%m%d%H%M}.xls"


def write_contest_csv(path: str | Path, names: Sequence[str], labels: Sequence[int]) -> Path:
    if len(names) != len(labels):
        raise ValueError("one label per name")
    if len(set(names)) != len(names):
        raise ValueError("duplicate file names")
    rows = sorted(zip(names, labels), key=lambda r: r[0])
    for name, label in rows:
        if label not in (0, 1):
            raise ValueError(f"label for {name!r} must be 0 or 1, got {label!r}")
    # csv quotes a name holding a comma, quote or line break (RFC 4180) instead of the
    # export refusing it: every file must keep its row. Plain names are written bare.
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows((name, int(label)) for name, label in rows)
    # A name that is not valid UTF-8 is written back as the bytes it has on disk.
    return atomic_write_text(path, buf.getvalue(), errors="surrogateescape")


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
    """``<result>.undecodable.txt``: name TAB reason, one line per file that got the fallback."""
    bad = files[~files["ok"].astype(bool)]
    if bad.empty:
        return None
    text = "".join(f"{n}\t{e}\n" for n, e in zip(bad["name"], bad["error"]))
    return atomic_write_text(sidecar(result, "undecodable.txt"), text, errors="surrogateescape")


def write_scores(result: Path, files: pd.DataFrame) -> Path:
    """``<result>.scores.csv``: per file the probability, the decision, and whatever the
    checkpoint adds (faces, forgery type, video frames), sorted by name like the result."""
    optional = [c for c in (*FACE_COLUMNS, *TYPE_COLUMNS) if c in files.columns]
    optional += [c for c in VIDEO_COLUMNS if c in files.columns and files[c].notna().any()]
    table = files[[*SCORE_COLUMNS, *optional]].sort_values("name")
    table = table.astype({c: "Int64" for c in ("n_frames", "n_faces") if c in table})  # not every row has one
    return atomic_write_text(sidecar(result, "scores.csv"), table.to_csv(index=False, float_format="%.6f"), errors="surrogateescape")


def write_frames(result: Path, frames: pd.DataFrame) -> Path:
    """``<result>.frames.csv``: the per-frame scores behind each video's row."""
    return atomic_write_text(
        sidecar(result, "frames.csv"), frames[list(FRAME_COLUMNS)].to_csv(index=False, float_format="%.6f"), errors="surrogateescape"
    )
