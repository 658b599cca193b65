"""Video-level metrics: every scored frame that belongs to a video (the sampled frames of
video files, and image files that a manifest assigns to a video through its ``video_id``
column) is aggregated into one score per video, then scored like files."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from data.io import atomic_write_text
from data.records import Record
from data.sample import usable_rows
from data.video import is_video, record_video_id
from unmask.core.metrics import grouped_metrics
from unmask.evaluation.base import Evaluator
from unmask.reports.safe import frame_csv
from unmask.reports.tables import grouped_tables
from unmask.scoring.combine import ScoreAggregator, aggregate_videos
from unmask.scoring.scorer import Scores


class VideoLevel(Evaluator):
    name = "video"

    def __init__(self, records: list[Record], aggregator: ScoreAggregator, id_column: str = "video_id") -> None:
        self.aggregator = aggregator
        # every record's video: a video file's own, or the one a manifest gives extracted frames
        self.video_ids = {r.path: vid for r in records if (vid := record_video_id(r, id_column))}
        self.videos = pd.DataFrame()

    def video_of(self, path: str) -> str | None:
        """The video a scored file belongs to (a video file is its own), or None."""
        return self.video_ids.get(path)

    def compute(self, scores: Scores, threshold: float) -> dict | None:
        parts = []
        files = scores.files
        if len(files):  # image files that belong to a video (a manifest of extracted frames)
            images = files[files["path"].isin(self.video_ids.keys()) & ~files["path"].map(is_video).astype(bool)]
            if len(images):
                parts.append(images.assign(video_id=images["path"].map(self.video_ids)))
        if len(scores.frames):
            parts.append(scores.frames)
        if not parts:
            return None
        self.videos = aggregate_videos(pd.concat(parts, ignore_index=True), self.aggregator)
        scored = self.videos[usable_rows(self.videos)]
        return {
            "aggregate": self.aggregator.describe(),
            "n_videos": int(len(self.videos)),
            "n_undecodable": int((~self.videos["ok"]).sum()),
            **grouped_metrics(scored["label"].to_numpy(), scored["prob"].to_numpy(), scored["source"], scored["generator"], threshold),
        }

    def markdown(self, result: dict) -> str:
        return "\n".join(
            [
                "## Video level",
                "",
                f"{result['n_videos']} videos, frame scores aggregated by {result['aggregate']}; "
                f"{result['n_undecodable']} undecodable videos left out of the metrics.",
                "",
                *grouped_tables(result, "###", ("Videos overall", "Videos by source", "Videos by generator")),
            ]
        )

    def write(self, result: dict, scores: Scores, out_dir: Path) -> None:
        atomic_write_text(Path(out_dir) / "videos.csv", frame_csv(self.videos))
