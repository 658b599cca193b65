"""How scored views become a file's score, and frames a video's.

Views -> file: without a face stage a file has one view. With one, its faces' scores are
reduced (``faces.face_combine``) and combined with the whole image's (``faces.image_combine``,
``FacePipeline.combine``); the view with the highest score *decides*: its forgery type,
forgery map and explanation stand for the file.

Frames -> video: a video is fake when some of its frames are: ``max`` catches a short
manipulated segment but is the most sensitive to one noisy frame, ``mean`` is the steadiest,
``topk_mean`` (mean of the k highest frame scores) sits between the two. All work on
probabilities, so the checkpoint's threshold applies to a video score as it does to an
image score.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from data.dataset import WHOLE_IMAGE
from data.faces.pipeline import FacePipeline
from data.video import FrameSampler

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


# ---- videos ------------------------------------------------------------------------------
@dataclass
class VideoOptions:
    """``video`` in the configs (``configs/video/``): which frames, how they combine, which
    manifest column names a frame's video; ``face_crops`` is the face stage's frame hook."""

    sampler: FrameSampler = field(default_factory=FrameSampler)
    aggregator: ScoreAggregator = field(default_factory=ScoreAggregator)
    face_crops: Callable | None = None  # frame -> face crops (and the whole frame)
    id_column: str = "video_id"

    @classmethod
    def from_config(cls, node) -> VideoOptions:
        if not node:
            return cls()
        from hydra.utils import instantiate

        return cls(
            sampler=instantiate(node.sampler) if node.get("sampler") else FrameSampler(),
            aggregator=instantiate(node.aggregate) if node.get("aggregate") else ScoreAggregator(),
            face_crops=instantiate(node.face_crops) if node.get("face_crops") else None,
            id_column=str(node.get("id_column") or "video_id"),
        )


def video_file_rows(frames: pd.DataFrame, aggregator: ScoreAggregator) -> pd.DataFrame:
    """One row per video *file* (``path``) from its frame rows, with the aggregated score."""
    videos = aggregate_videos(frames, aggregator, key="path")
    return videos.assign(path=videos["video_id"])[
        ["path", "prob", "label", "ok", "error", "source", "generator", "n_frames", "video_seconds"]
    ]


# ---- views -> files ------------------------------------------------------------------------
def deciding_view(probs: np.ndarray, ok: np.ndarray) -> int:
    """Position of the view that decides a file: the highest score among decodable views
    (the first on ties); 0 when none decoded."""
    scores = np.where(np.asarray(ok, bool), np.nan_to_num(np.asarray(probs, np.float64), nan=-1.0), -np.inf)
    return int(np.argmax(scores)) if len(scores) else 0


def combine_views(views: pd.DataFrame, faces: FacePipeline | None) -> pd.DataFrame:
    """Rows per (file, view) -> one row per file, in file order. The deciding view's row
    carries the per-view extras (forgery type...). With a face stage adds ``n_faces``,
    ``face_fallback`` (no face found: the whole image decided), ``whole_prob`` and
    ``face_probs`` (';'-joined, most confident face first)."""
    if views.empty:
        return views.drop(columns=["file", "view"], errors="ignore")
    if faces is None:  # one view per file
        return views.sort_values("file", kind="stable").drop(columns=["file", "view"]).reset_index(drop=True)
    out = []
    for _, part in views.groupby("file", sort=True):
        ok = part["ok"].to_numpy(bool)
        whole = part[part["view"] == WHOLE_IMAGE]
        crops = part[part["view"] >= 0].sort_values("view")
        whole_prob = float(whole["prob"].iloc[0]) if len(whole) and bool(whole["ok"].iloc[0]) else None
        face_probs = crops.loc[crops["ok"].astype(bool), "prob"].to_numpy(float)
        row = part.iloc[deciding_view(part["prob"].to_numpy(), ok)].to_dict()
        labels = part["label"].to_numpy()
        row.update(
            prob=faces.combine(face_probs, whole_prob) if ok.any() else float("nan"),
            label=1 if (labels == 1).any() else 0 if (labels == 0).any() else -1,  # any forged view: the file is forged
            ok=bool(ok.any()),
            error="" if ok.any() else str(part["error"].iloc[0]),
            n_faces=int(len(crops)),
            face_fallback=bool(len(crops) == 0),
            whole_prob=np.nan if whole_prob is None else whole_prob,
            face_probs=";".join(f"{p:.4f}" for p in face_probs),
        )
        for key in ("file", "view", "face_index", "face_found"):
            row.pop(key, None)
        out.append(row)
    return pd.DataFrame(out)
