"""Frame scores -> one video score, and per-video tables built from frame predictions.

A video is fake when some of its frames are: ``max`` catches a short manipulated segment but
is the most sensitive to one noisy frame, ``mean`` is the steadiest, ``topk_mean`` (mean of
the k highest frame scores) sits between the two. All work on probabilities, so the
checkpoint's threshold applies to a video score as it does to an image score.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


def mean_score(scores: np.ndarray, k: int) -> float:
    return float(np.mean(scores))


def max_score(scores: np.ndarray, k: int) -> float:
    return float(np.max(scores))


def topk_mean_score(scores: np.ndarray, k: int) -> float:
    # k larger than the number of frames: the mean of all of them (a short video is not an error)
    top = np.sort(scores)[::-1][: max(1, int(k))]
    return float(np.mean(top))


AGGREGATORS: dict[str, Callable[[np.ndarray, int], float]] = {
    "mean": mean_score,
    "max": max_score,
    "topk_mean": topk_mean_score,
}


@dataclass
class ScoreAggregator:
    """``video.aggregate`` in the configs: ``method`` is mean | max | topk_mean."""

    method: str = "mean"
    top_k: int = 3

    def __post_init__(self) -> None:
        if self.method not in AGGREGATORS:
            raise ValueError(f"video.aggregate.method must be one of {sorted(AGGREGATORS)}, got {self.method!r}")
        if int(self.top_k) < 1:
            raise ValueError(f"video.aggregate.top_k must be >= 1, got {self.top_k!r}")

    def __call__(self, scores) -> float:
        """One score from the finite frame scores; NaN when there are none (an undecodable
        video, or one whose every frame failed), so callers apply their fallback."""
        arr = np.asarray(scores, dtype=np.float64).ravel()
        arr = arr[np.isfinite(arr)]
        if arr.size == 0:
            return float("nan")
        return AGGREGATORS[self.method](arr, int(self.top_k))

    def describe(self) -> str:
        return f"top-{self.top_k} mean" if self.method == "topk_mean" else self.method


def _video_label(labels: pd.Series, video_id: str) -> int:
    values = labels[labels.isin([0, 1])]
    if values.empty:
        return -1
    counts = values.value_counts()
    if len(counts) > 1:
        log.warning("video %s has frames labelled both real and fake; it takes the majority label", video_id)
    return int(counts.index[0])


def aggregate_videos(frames: pd.DataFrame, aggregator: ScoreAggregator, key: str = "video_id") -> pd.DataFrame:
    """One row per ``key`` value from frame rows (``prob``, ``ok``, ``label`` and, when
    present, ``source``, ``generator``, ``error``, ``video_seconds``, ``path``).

    Returns ``video_id, prob, label, ok, n_frames, n_failed, video_seconds, source,
    generator, path, error``, sorted by ``video_id``. ``ok`` is False when no frame scored.
    """
    columns = ["video_id", "prob", "label", "ok", "n_frames", "n_failed", "video_seconds", "source", "generator", "path", "error"]
    if frames.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for vid, part in frames.groupby(key, sort=True):
        ok = part["ok"].astype(bool)
        prob = aggregator(part.loc[ok, "prob"])
        errors = part.loc[~ok, "error"] if "error" in part else pd.Series(dtype=str)
        rows.append(
            {
                "video_id": vid,
                "prob": prob,
                "label": _video_label(part["label"], str(vid)) if "label" in part else -1,
                "ok": bool(np.isfinite(prob)),
                "n_frames": int(ok.sum()),
                "n_failed": int((~ok).sum()),
                "video_seconds": float(part["video_seconds"].max()) if "video_seconds" in part else float("nan"),
                "source": part["source"].iloc[0] if "source" in part else "unknown",
                "generator": part["generator"].iloc[0] if "generator" in part else "unknown",
                "path": part["path"].iloc[0] if "path" in part else str(vid),
                "error": "" if np.isfinite(prob) else "; ".join(sorted({str(e) for e in errors if e})) or "no frame scored",
            }
        )
    return pd.DataFrame(rows, columns=columns)
