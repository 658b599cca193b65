"""The contest export: ``result_MMDDHHMM.xls`` holding CSV text, no header, one row per file
in ascending file-name order: ``name,1`` for AI-generated, ``name,0`` for real."""
from __future__ import annotations

import csv
import datetime as dt
import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from unmask.io import atomic_write_text


def contest_filename(now: dt.datetime | None = None) -> str:
    return f"result_{(now or dt.datetime.now()):%m%d%H%M}.xls"


def parse_threshold(spec) -> tuple[str, float | None]:
    """``None``/``stored`` -> the checkpoint's; a number; ``prior:P`` -> share P labelled fake."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "stored", "null", "none")):
        return "stored", None
    if isinstance(spec, bool):  # float(True) would silently become threshold 1.0
        raise ValueError(f"threshold must be empty (stored), a number or prior:P, got {spec!r}")
    if isinstance(spec, str) and spec.strip().lower().startswith("prior:"):
        try:
            share = float(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"threshold=prior:P needs a number P in [0, 1], got {spec!r}") from None
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"threshold=prior:P needs P in [0, 1], got {share}")
        return "prior", share
    try:
        value = float(spec)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be empty (stored), a number or prior:P, got {spec!r}") from None
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise ValueError(f"threshold must be a probability in [0, 1], got {value}")
    return "fixed", value


def decide(probs: Sequence[float], spec, stored: float) -> tuple[np.ndarray, float]:
    """0/1 decisions for the finite ``probs`` (NaN stays -1 for the caller's fallback) and the
    threshold used. ``prior:P`` labels the top ``round(P * n)`` scores fake, by rank, so ties
    cannot push the share off P."""
    probs = np.asarray(probs, dtype=np.float64)
    finite = np.isfinite(probs)
    labels = np.full(len(probs), -1, dtype=int)
    kind, value = parse_threshold(spec)
    if kind == "prior":
        idx = np.flatnonzero(finite)
        n_fake = int(round(value * len(idx)))
        order = idx[np.argsort(-probs[idx], kind="stable")]
        labels[idx] = 0
        labels[order[:n_fake]] = 1
        threshold = float(probs[order[n_fake - 1]]) if n_fake else math.inf
        return labels, threshold
    threshold = stored if kind == "stored" else float(value)
    labels[finite] = (probs[finite] >= threshold).astype(int)
    return labels, threshold


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
    csv.writer(buf, lineterminator="\n").writerows((n, int(l)) for n, l in rows)
    # A name that is not valid UTF-8 is written back as the bytes it has on disk.
    return atomic_write_text(path, buf.getvalue(), errors="surrogateescape")
