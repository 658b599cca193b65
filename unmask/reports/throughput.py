"""The spec's throughput figures for a whole run (infer.py, evaluate.py):

* ``QPS_image`` = image files scored / wall seconds,
* ``QPS_video`` = total duration of the video files scored (seconds) / wall seconds,

wall seconds running from the start of the run (checkpoint loading included) to the moment
its results are ready to be written.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class RunClock:
    start: float = field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        return time.perf_counter() - self.start


def throughput_report(
    wall_seconds: float, n_images: int, n_videos: int = 0, video_seconds: float = 0.0, n_video_frames: int = 0
) -> dict:
    wall = max(float(wall_seconds), 1e-9)
    return {
        "wall_seconds": float(wall_seconds),
        "n_images": int(n_images),
        "n_videos": int(n_videos),
        "n_video_frames": int(n_video_frames),
        "video_seconds": float(video_seconds),
        "qps_image": n_images / wall,
        "qps_video": video_seconds / wall,
        "video_frames_per_second": n_video_frames / wall,
    }


def format_throughput(t: dict) -> str:
    line = (
        f"QPS_image {t['qps_image']:.2f} ({t['n_images']} images / {t['wall_seconds']:.2f} s wall); "
        f"QPS_video {t['qps_video']:.2f} ({t['video_seconds']:.1f} video-seconds in {t['n_videos']} videos / {t['wall_seconds']:.2f} s wall)"
    )
    if t["n_video_frames"]:
        line += f"; {t['video_frames_per_second']:.1f} video frames/s"
    return line
