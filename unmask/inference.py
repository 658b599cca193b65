"""infer.py's job: score every file of a folder (or of a manifest) and write the contest file.

Video files (mp4, avi, mov, webm, mkv, m4v) get one row too: their sampled frames are scored
and aggregated to one score (``video`` in infer.yaml). The run's QPS_image / QPS_video are
printed (and written to ``result_*.metrics.json`` with ``metrics=true``).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from data.records import ListedFilesSource, UnlabelledFolderSource
from data.video import split_videos
from unmask.aggregate import aggregate_videos
from unmask.checkpoint import load_detector
from unmask.export import contest_filename, decide, parse_threshold, write_contest_csv
from unmask.io import atomic_write_json, atomic_write_text
from unmask.image_scoring import score_image_records
from unmask.runtime import build_runtime
from unmask.throughput import RunClock, format_throughput, throughput_report
from unmask.video_scoring import VideoOptions, score_video_frames, video_file_totals

log = logging.getLogger(__name__)


def input_records(path: Path) -> tuple[list, Path]:
    """Records of ``input`` and the folder names are relative to: a folder (every file
    below it) or a ``.csv`` manifest listing files (``relpath`` column)."""
    if path.is_file() and path.suffix.lower() == ".csv":
        source = ListedFilesSource(str(path))
        return source.records(), source.root
    return UnlabelledFolderSource(str(path)).records(), path


def _video_file_rows(frames: pd.DataFrame, options: VideoOptions) -> pd.DataFrame:
    """One row per video file (``path``) with the aggregated score."""
    videos = aggregate_videos(frames, options.aggregator, key="path")
    return videos.assign(path=videos["video_id"], label=-1)[
        ["path", "prob", "label", "ok", "error", "source", "generator", "n_frames", "video_seconds"]
    ]


def run_inference(cfg: DictConfig) -> Path:
    clock = RunClock()
    started = dt.datetime.now()
    if cfg.fallback_label not in (0, 1):
        raise ValueError(f"fallback_label must be 0 or 1, got {cfg.fallback_label!r}")
    parse_threshold(cfg.threshold)  # a bad value fails now, not after scoring the whole folder
    video = VideoOptions.from_config(cfg.get("video"))
    loaded = load_detector(cfg.ckpt)
    if loaded.faces is not None and video.face_crops is None:  # videos get the checkpoint's face stage too
        video = dataclasses.replace(video, face_crops=loaded.faces.frame_crops)
    root = Path(cfg.input)
    records, names_root = input_records(root)
    out_dir = Path(cfg.output_dir)
    out_path = out_dir / contest_filename(started)
    if not records:
        log.warning("input folder %s holds no files: writing an empty result", root)
        return write_contest_csv(out_path, [], [])

    runtime = build_runtime(
        cfg.get("runtime", "torch"), loaded, device=cfg.device, amp=cfg.amp, compile=cfg.get("compile", False), onnx_model=cfg.get("onnx_model")
    )
    image_records, video_records = split_videos(records)
    parts, seconds, frames = [], 0.0, pd.DataFrame()
    if image_records:
        images, seconds = score_image_records(
            loaded, image_records, batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=cfg.device, amp=cfg.amp,
            runtime=runtime,
        )
        parts.append(images)
    if video_records:
        frames, video_s = score_video_frames(
            loaded.detector, video_records, loaded.canonical, video, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
            device=cfg.device, amp=cfg.amp, runtime=runtime,
        )
        seconds += video_s
        parts.append(_video_file_rows(frames, video))
    df = parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)
    df["name"] = [Path(p).relative_to(names_root).as_posix() for p in df["path"]]
    labels, threshold = decide(df["prob"].to_numpy(), cfg.threshold, loaded.threshold)
    failed = labels < 0
    labels[failed] = int(cfg.fallback_label)
    df["decision"] = labels
    write_contest_csv(out_path, df["name"].tolist(), labels.tolist())

    if failed.any():
        bad = df[failed]
        sidecar = out_path.with_suffix(".undecodable.txt")
        atomic_write_text(
            sidecar, "".join(f"{n}\t{e}\n" for n, e in zip(bad["name"], bad["error"])), errors="surrogateescape"
        )
        log.warning(
            "%d file(s) could not be decoded and got fallback label %d: %s (listed in %s)",
            len(bad), cfg.fallback_label, ", ".join(bad["name"].head(10)), sidecar,
        )
    if cfg.scores:
        scores_path = out_path.with_suffix(".scores.csv")
        video_cols = ["n_frames", "video_seconds"] if video_records else []
        type_cols = [c for c in ("type", "type_prob") if c in df.columns]  # attribution head's forgery type
        face_cols = [c for c in ("n_faces", "face_fallback", "whole_prob", "face_probs") if c in df.columns]  # face stage
        cols = df[["name", "prob", "decision", "ok", "error", *face_cols, *type_cols, *video_cols]].sort_values("name")
        integer = {c: "Int64" for c in ("n_frames", "n_faces") if c in cols}  # not every row has one: keep them integer
        cols = cols.astype(integer)
        atomic_write_text(scores_path, cols.to_csv(index=False, float_format="%.6f"), errors="surrogateescape")
        log.info("scores written to %s", scores_path)
        if not frames.empty:  # per-frame scores behind each video's row
            frames_out = frames.assign(name=[Path(p).relative_to(names_root).as_posix() for p in frames["path"]])
            cols = ["name", "timestamp", "frame_index", "crop_index", "prob", "ok", "error"]
            atomic_write_text(
                out_path.with_suffix(".frames.csv"), frames_out[cols].to_csv(index=False, float_format="%.6f"), errors="surrogateescape"
            )
    n = len(df)
    print(
        f"wrote {out_path} ({n} rows, {int(np.sum(labels))} labelled AI-generated, threshold {threshold:.4f}); "
        f"{n / max(seconds, 1e-9):.1f} images/s ({seconds:.1f} s)"
    )
    video_seconds, n_frames = video_file_totals(frames, video_records)
    throughput = throughput_report(clock.seconds(), len(image_records), len(video_records), video_seconds, n_frames)
    print(f"throughput ({runtime.name} runtime): {format_throughput(throughput)}")
    if cfg.get("metrics", False):
        atomic_write_json(out_path.with_suffix(".metrics.json"), {"qps_image": throughput["qps_image"], "qps_video": throughput["qps_video"], "throughput": throughput, "runtime": runtime.name})
    if cfg.get("explain"):  # last, after the contest file and the timing: it can cost neither
        from unmask.explain_report import write_explanations_from_config

        write_explanations_from_config(loaded, image_records, df, out_path.with_suffix(".explain"), cfg, threshold)
    return out_path
