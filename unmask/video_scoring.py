"""Video files and frame manifests in infer.py / evaluate.py: score the sampled frames,
aggregate them per video, and the video-level metrics of an evaluation."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import pandas as pd

from data.canonical import Canonicalizer
from data.records import Record
from data.video import FrameSampler, VideoFrameDataset, record_video_id
from unmask.aggregate import ScoreAggregator, aggregate_videos
from unmask.metrics import grouped_metrics
from unmask.predict import predict
from unmask.tables import grouped_tables

log = logging.getLogger(__name__)


@dataclass
class VideoOptions:
    """``video`` in infer.yaml / evaluate.yaml (``configs/video/``)."""

    sampler: FrameSampler = field(default_factory=FrameSampler)
    aggregator: ScoreAggregator = field(default_factory=ScoreAggregator)
    face_crops: Callable | None = None  # the face pipeline's hook: frame -> face crops
    id_column: str = "video_id"

    @classmethod
    def from_config(cls, node) -> "VideoOptions":
        if node is None:
            return cls()
        from hydra.utils import instantiate

        return cls(
            sampler=instantiate(node.sampler) if node.get("sampler") else FrameSampler(),
            aggregator=instantiate(node.aggregate) if node.get("aggregate") else ScoreAggregator(),
            face_crops=instantiate(node.face_crops) if node.get("face_crops") else None,
            id_column=str(node.get("id_column") or "video_id"),
        )


def score_video_frames(
    detector,
    records: list[Record],
    canonical: Canonicalizer,
    options: VideoOptions,
    batch_size: int = 64,
    num_workers: int = 2,
    device: str = "auto",
    amp: bool = True,
    runtime=None,
    compile: bool = False,
) -> tuple[pd.DataFrame, float]:
    """One row per scored frame (or face crop) of the video files in ``records``, plus one
    failed row per undecodable video; columns as ``predict`` plus ``video_id``,
    ``timestamp``, ``frame_index``, ``crop_index``, ``video_seconds``."""
    dataset = VideoFrameDataset(records, canonical, options.sampler, options.face_crops, options.id_column)
    # A worker per video at most: an idle worker only costs start-up time.
    workers = min(int(num_workers), len(records))
    df, seconds = predict(
        detector, dataset, batch_size=batch_size, num_workers=workers, device=device, amp=amp, runtime=runtime, compile=compile
    )
    if not df.empty:
        df = df.sort_values(["video_id", "timestamp", "crop_index"], kind="stable", na_position="first").reset_index(drop=True)
    return df, seconds


def frame_video_ids(records: list[Record], id_column: str) -> dict[str, str]:
    """``path -> video id`` of image records that a manifest assigns to a video."""
    out = {}
    for r in records:
        vid = record_video_id(r, id_column)
        if vid is not None:
            out[r.path] = vid
    return out


def video_metrics_report(videos: pd.DataFrame, threshold: float, aggregator: ScoreAggregator) -> dict:
    """Metrics over videos (one aggregated score each), overall, per source and per generator."""
    scored = videos[videos["ok"]]
    return {
        "aggregate": aggregator.describe(),
        "n_videos": int(len(videos)),
        "n_undecodable": int((~videos["ok"]).sum()),
        **grouped_metrics(scored["label"].to_numpy(), scored["prob"].to_numpy(), scored["source"], scored["generator"], threshold),
    }


def render_video_markdown(report: dict) -> str:
    """The video section of report.md."""
    return "\n".join(
        [
            "## Video level",
            "",
            f"{report['n_videos']} videos, frame scores aggregated by {report['aggregate']}; "
            f"{report['n_undecodable']} undecodable videos left out of the metrics.",
            "",
            *grouped_tables(report, "###", ("Videos overall", "Videos by source", "Videos by generator")),
        ]
    )


__all__ = [
    "VideoOptions",
    "aggregate_videos",
    "frame_video_ids",
    "render_video_markdown",
    "score_video_frames",
    "video_metrics_report",
]


def add_video_scores(
    df: pd.DataFrame | None,
    detector,
    canonical: Canonicalizer,
    image_records: list[Record],
    video_records: list[Record],
    options: VideoOptions,
    batch_size: int = 64,
    num_workers: int = 2,
    device: str = "auto",
    runtime=None,
) -> tuple[pd.DataFrame | None, pd.DataFrame | None, float]:
    """For evaluate.py: the image predictions ``df`` plus the frames of the video files, a
    ``video_id`` column for every row that belongs to a video (video files, and images a
    manifest assigns to one), the per-video table (None when nothing belongs to a video),
    and the seconds spent scoring video frames. Without videos ``df`` comes back as it was."""
    ids = frame_video_ids(image_records, options.id_column)
    if not ids and not video_records:
        return df, None, 0.0
    parts = []
    if df is not None and not df.empty:
        parts.append(df.assign(video_id=df["path"].map(ids)) if ids else df)
    seconds = 0.0
    if video_records:
        frames, seconds = score_video_frames(
            detector, video_records, canonical, options, batch_size=batch_size, num_workers=num_workers, device=device, runtime=runtime
        )
        parts.append(frames)
    rows = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    videos = aggregate_videos(rows[rows["video_id"].notna()], options.aggregator)
    return rows, videos, seconds


def video_file_totals(rows: pd.DataFrame | None, video_records: list[Record]) -> tuple[float, int]:
    """``(total duration in seconds, frames scored)`` of the video files among ``rows``:
    the QPS_video numerator (an undecodable video adds no seconds)."""
    if rows is None or rows.empty or not video_records or "video_seconds" not in rows:
        return 0.0, 0
    files = rows[rows["path"].isin({r.path for r in video_records})]
    return float(files.groupby("path")["video_seconds"].max().fillna(0).sum()), int(files["ok"].sum())
